"""Choosing an executor: QEMU microVM forks when they can run here, else the process sandbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from ..pipeline.executor import Executor
from .host import detect_accel, qemu_binary
from .image import find_image
from .process import Confinement, ProcessExecutor

DEFAULT_IMAGE = "tiny"


def choose_executor(
    settings: Settings,
    log: Callable[[str], None],
    *,
    confinement: Confinement | None = None,
    setup: str = "",
    artifacts_dir: Path | None = None,
) -> Executor:
    """Return the executor ``settings.EXECUTOR`` asks for, logging which one and why.

    ``confinement``: what the process sandbox lets steps touch (vm/process.py). ``setup``: the
    pipeline's command for the QEMU executor's warm base. ``artifacts_dir``: where QEMU machines
    bring the steps' artifacts out to.
    """
    wanted = settings.EXECUTOR
    confinement = confinement or Confinement()
    if wanted == "local":
        return _process(log, "EXECUTOR=local", confinement)
    reason = _qemu_unavailable(settings)
    if reason is None:
        from .qemu import QemuExecutor

        accel = detect_accel()
        log(f"executor: qemu microVM forks ({accel.name}: {accel.reason})")
        return QemuExecutor(settings.STATE_DIR, image=DEFAULT_IMAGE, setup=setup, log=log, artifacts_dir=artifacts_dir)
    if wanted == "qemu":
        raise ConfigError("EXECUTOR", f"qemu was asked for but cannot run: {reason}")
    return _process(log, f"EXECUTOR=auto and {reason}", confinement)


def _qemu_unavailable(settings: Settings) -> str | None:
    if qemu_binary() is None:
        return "qemu-system-x86_64 is not installed"
    if find_image(DEFAULT_IMAGE, settings.STATE_DIR) is None:
        return f"the {DEFAULT_IMAGE!r} guest image is not built (python -m ccci image build {DEFAULT_IMAGE})"
    return None


def _process(log: Callable[[str], None], why: str, confinement: Confinement) -> Executor:
    executor = ProcessExecutor(confinement=confinement)
    log(f"executor: process sandbox ({why}; isolated_forks={executor.isolated_forks})")
    return executor
