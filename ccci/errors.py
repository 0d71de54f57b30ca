"""The small error tree: what went wrong, and whether trying again can help.

CcciError
├── ConfigError          a setting is missing or malformed; fix the config, then restart
├── SpecError            a recipe's ci.yml is invalid; fix the file, nothing ran
├── InfraError           the infrastructure could not run the work (not the recipe's fault)
│   ├── TransientInfraError   may succeed if tried again (VM restore, agent not ready, forge 5xx)
│   └── PermanentInfraError   will fail the same way again (missing image, bad kernel)
└── ForgeError           the forge refused or failed a request
"""


class CcciError(Exception):
    """Base of every error ccci raises on purpose."""


class ConfigError(CcciError):
    """A setting is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class SpecError(CcciError):
    """A ci.yml is invalid; the message names the file, the step and the key."""


class InfraError(CcciError):
    """The infrastructure could not provide a place to run a step."""

    transient = False


class TransientInfraError(InfraError):
    """An infrastructure failure worth retrying: the step's command never ran."""

    transient = True


class PermanentInfraError(InfraError):
    """An infrastructure failure that will recur; retrying would only waste time."""


class ForgeError(CcciError):
    """The forge answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient


class RunInterrupted(BaseException):
    """The run must stop now: canceled (SIGTERM/SIGINT, exit 143/130) or out of time (exit 142).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it. The
    harness' lifetime guard raises it from a signal handler in the main thread; the pipeline
    scheduler absorbs it, stops in-flight steps, runs the teardown steps and reports the run
    with ``status``; the harness then exits with ``exit_code``.
    """

    def __init__(self, status: str, exit_code: int, reason: str = ""):
        super().__init__(reason or status)
        self.status = status  # "canceled" | "timed_out"
        self.exit_code = exit_code
        self.reason = reason
