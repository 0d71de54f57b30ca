"""Choosing an executor: QEMU microVM forks when they can run here, else the process sandbox."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from ..pipeline.executor import Executor
from .host import detect_accel, qemu_binary
from .image import find_image

DEFAULT_IMAGE = "tiny"


def choose_executor(
    settings: Settings, log: Callable[[str], None], *, writable: Iterable[Path] = (), setup: str = ""
) -> Executor:
    """Return the executor ``settings.EXECUTOR`` asks for, logging which one and why.

    ``writable``: host paths the process sandbox must leave writable besides the workspace
    (the run's ABRA_DIR and the operator's abra directory it links to). ``setup``: the
    pipeline's command for the QEMU executor's warm base.
    """
    wanted = settings.EXECUTOR
    if wanted == "local":
        return _process(log, "EXECUTOR=local", writable)
    reason = _qemu_unavailable(settings)
    if reason is None:
        from .qemu import QemuExecutor

        accel = detect_accel()
        log(f"executor: qemu microVM forks ({accel.name}: {accel.reason})")
        return QemuExecutor(settings.STATE_DIR, image=DEFAULT_IMAGE, setup=setup, log=log)
    if wanted == "qemu":
        raise ConfigError("EXECUTOR", f"qemu was asked for but cannot run: {reason}")
    return _process(log, f"EXECUTOR=auto and {reason}", writable)


def _qemu_unavailable(settings: Settings) -> str | None:
    if qemu_binary() is None:
        return "qemu-system-x86_64 is not installed"
    if find_image(DEFAULT_IMAGE, settings.STATE_DIR) is None:
        return f"the {DEFAULT_IMAGE!r} guest image is not built (python -m ccci image build {DEFAULT_IMAGE})"
    return None


def _process(log: Callable[[str], None], why: str, writable: Iterable[Path]) -> Executor:
    from .process import ProcessExecutor

    executor = ProcessExecutor(writable=tuple(writable))
    log(f"executor: process sandbox ({why}; isolated_forks={executor.isolated_forks})")
    return executor
