"""Choosing an executor: QEMU microVM forks when the pipeline's image can run here, else the process sandbox.

A pipeline names its guest image (ci.yml ``image:``, default ``docker``). ``EXECUTOR=auto`` uses
QEMU only when that very image is built (and built with the configured extras), so building
``tiny`` never sends a real recipe to a machine without Docker; the choice and its reason are
logged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from ..pipeline.executor import Executor
from ..pipeline.spec import DEFAULT_IMAGE
from .bwrap import BwrapExecutor, Confinement
from .extras import ImageExtras
from .host import detect_accel, qemu_binary
from .image import BUILDERS, find_image


def choose_executor(
    settings: Settings,
    log: Callable[[str], None],
    *,
    confinement: Confinement | None = None,
    setup: str = "",
    image: str | None = None,
    artifacts_dir: Path | None = None,
    on_wait: Callable[[str], None] | None = None,
    interrupted: Callable[[], bool] | None = None,
    needs_abra: bool = False,
) -> Executor:
    """Return the executor ``settings.EXECUTOR`` asks for, logging which one and why.

    ``confinement``: what the process sandbox lets steps touch (vm/bwrap.py). ``setup``: the
    pipeline's command for the QEMU executor's warm base. ``image``: the pipeline's guest image.
    ``artifacts_dir``: where QEMU machines bring the steps' artifacts out to. ``on_wait`` hears
    that the run waits for a Docker slot; ``interrupted`` ends that wait. ``needs_abra``: the
    pipeline runs abra, so a docker image without it is refused, naming ABRA_BIN.
    """
    wanted = settings.EXECUTOR
    image = image or DEFAULT_IMAGE
    confinement = confinement or Confinement()
    if wanted == "bwrap":
        return _process(log, "EXECUTOR=bwrap", confinement)
    extras = ImageExtras.from_settings(settings)
    reason = _qemu_unavailable(settings, image, extras)
    if reason is None:
        from .qemu import QemuExecutor

        info = find_image(image, settings.STATE_DIR)
        if needs_abra and not extras.has_abra and info is not None and info.heavy:
            raise ConfigError(
                "ABRA_BIN",
                f"this recipe's ci.yml runs abra, and the {image} image has none; set ABRA_BIN to an abra executable "
                f"(scripts/abra builds one) and run: python -m ccci image build {image}",
            )
        accel = detect_accel()
        log(f"executor: qemu microVM forks of the {image} image ({accel.name}: {accel.reason})")
        return QemuExecutor(
            settings.STATE_DIR,
            image=image,
            setup=setup,
            log=log,
            memory_mb=settings.VM_MEMORY_MB,
            tb_size_mb=settings.VM_TB_SIZE_MB,
            registry_mirror=settings.REGISTRY_MIRROR,
            preload=tuple(Path(p).expanduser() for p in settings.DOCKER_PRELOAD),
            extras=extras,
            slots=settings.DOCKER_SLOTS,
            on_wait=on_wait,
            interrupted=interrupted,
            artifacts_dir=artifacts_dir,
        )
    if wanted == "qemu":
        raise ConfigError("EXECUTOR", f"qemu was asked for but cannot run: {reason}")
    return _process(log, f"EXECUTOR=auto and {reason}", confinement)


def _qemu_unavailable(settings: Settings, image: str, extras: ImageExtras) -> str | None:
    if qemu_binary() is None:
        return "qemu-system-x86_64 is not installed"
    if image not in BUILDERS:
        return f"ci.yml asks for image {image!r}, which this ccci does not build (it builds {', '.join(BUILDERS)})"
    info = find_image(image, settings.STATE_DIR)
    if info is None:
        return f"the {image!r} guest image is not built (python -m ccci image build {image})"
    if info.heavy and info.extras != extras.digest():
        return (
            f"the {image!r} guest image was built with other IMAGE_FILES/IMAGE_PACKAGES than configured "
            f"(python -m ccci image build {image})"
        )
    return None


def _process(log: Callable[[str], None], why: str, confinement: Confinement) -> Executor:
    executor = BwrapExecutor(confinement=confinement)
    log(f"executor: process sandbox ({why}; isolated_forks={executor.isolated_forks})")
    return executor
