"""The executor interface: what the scheduler needs from a place that runs steps.

An Executor boots one Machine per run. A Machine runs step commands and can take a Checkpoint
of its current state; a Checkpoint forks new Machines that start from exactly that state
(``fork_from`` in ci.yml: "deploy once, test many"). The QEMU executor makes forks real
copy-on-write microVMs; the process sandbox cannot copy a machine, so its forks share the
parent's sandbox and run one at a time, and it says so through ``Executor.isolated_forks``.

Ownership: whoever receives a Machine or a Checkpoint closes it; ``close`` is idempotent and
must free everything (processes, files) on every path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Called with ("stdout" | "stderr", chunk) as output arrives; chunks are raw bytes.
OutputSink = Callable[[str, bytes], None]

TIMEOUT_EXIT = 124  # the exit code a step reports when its own timeout killed it
# Files steps leave here, relative to the workspace, are kept with the run (reports, screenshots).
# An executor whose machines hold their own copy of the workspace brings this directory back
# to the host workspace when a machine closes.
ARTIFACTS = Path(".ccci/artifacts")


@dataclass
class ExecRequest:
    """One step command to run in a machine, in the machine's workspace (the recipe checkout)."""

    command: str  # run by /bin/sh -c
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds; None means no per-step limit
    on_output: OutputSink | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class ExecResult:
    """How a step command ended. Infrastructure failures raise ``InfraError`` instead."""

    exit_code: int
    timed_out: bool = False  # killed by ExecRequest.timeout (exit_code is TIMEOUT_EXIT)
    canceled: bool = False  # killed because ExecRequest.cancel was set
    infra_retries: int = 0  # transient infrastructure failures retried before it ran


class Checkpoint(Protocol):
    """A frozen copy of a machine's state that new machines can fork from."""

    def fork(self) -> Machine:
        """Start a new machine from this state; raise InfraError if none can be provided."""
        ...

    def close(self) -> None:
        """Free the checkpoint; machines already forked from it keep running."""
        ...


class Machine(Protocol):
    """One running place where steps execute: a VM fork or a sandbox directory."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path | None:
        """Where the machine's own log is kept, if it keeps one."""
        ...

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command to completion, streaming its output; safe to call from threads."""
        ...

    def checkpoint(self) -> Checkpoint:
        """Freeze the current state (the machine must be idle) so that forks can start from it."""
        ...

    def close(self) -> None:
        """Stop the machine and remove everything it owns."""
        ...


class Executor(Protocol):
    """A kind of machine: QEMU microVM forks, or the process sandbox."""

    name: str
    isolated_forks: bool  # False: fork_from steps run in the parent's sandbox, one at a time

    @property
    def own_swarm(self) -> bool:
        """True: every machine runs a Docker swarm of its own, so an app deployed there is the machine's."""
        ...

    def boot(self, workspace: Path, image: str | None = None) -> Machine:
        """Provide a fresh machine whose workspace holds a copy of ``workspace``."""
        ...
