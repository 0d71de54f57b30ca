"""The small error tree: what went wrong, and whether trying again can help.

CcciError
├── ConfigError          a setting is missing or malformed; fix the config, then restart
├── SpecError            a recipe's ci.yml is invalid; fix the file, nothing ran
├── InfraError           the infrastructure could not run the work (not the recipe's fault)
│   ├── TransientInfraError   may succeed if tried again (VM restore, agent not ready, forge 5xx)
│   │   └── QmpError          QEMU's monitor refused or failed a command (vm/qmp.py)
│   └── PermanentInfraError   will fail the same way again (missing image, bad kernel)
├── ForgeError           the forge refused or failed a request; ``transient`` says whether to retry
├── AppBusy              the app stayed locked by another run past LOCK_WAIT (harness/applock.py)
└── Stopped              code that waited saw the run's stop request and gave up (pipeline/stop.py)

Outside the tree, on purpose: ``MalformedEvent`` (a ValueError of intake/event.py: the webhook
answers 400), and the guest agent's ``AgentLost`` and ``AgentRefused`` (vm/agent.py), which the
QEMU executor turns into infrastructure errors before they leave it. A stop request is never an
exception thrown from a signal handler: signals set the run's stop switch (harness/lifetime.py).
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
