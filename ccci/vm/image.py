"""Guest images: a kernel, an initramfs and a disk, built from Debian packages, content-addressed.

Each kind of image has its own builder module (``tiny``: busybox in an initramfs, for ccci's
own tests; ``docker``: Debian with Docker on its root disk, for real recipes). A builder names
its inputs and how to make the image from them; this module hashes the inputs, finds or
builds the image under the hash, once per hash across processes, and points the name at it::

    STATE_DIR/images/
      tiny.json, docker.json    name -> hash of the inputs it was last built from
      debs/                     kernel packages fetched with apt-get download
      <hash>/
        image.json              what is here, what it was built from, how it runs (RAM, warm-up)
        vmlinux                 the kernel, uncompressed ELF with a PVH entry (QEMU boots it directly)
        initramfs.cpio.gz       busybox, virtio modules, /init
        disk.qcow2              tiny: an empty data disk; docker: the root filesystem

The hash covers every input, so building again with the same inputs is a cache hit.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PermanentInfraError
from .extras import ImageExtras
from .tool import file_hash  # noqa: F401  (part of this module's interface)

Progress = Callable[[str], None]
# name -> builder module (in ccci.vm); each has NAME, SUMMARY and plan().
BUILDERS = {"tiny": "tiny", "docker": "docker_image"}


@dataclass
class Plan:
    """A build a builder proposes: the inputs it hashes, what it records, and how it makes the image.

    ``make(out, work, progress)`` writes vmlinux, initramfs.cpio.gz and disk.qcow2 into ``out``,
    using ``work`` for scratch; ``describe`` says what it builds from, for the progress line.
    """

    parts: list[bytes]
    meta: dict
    make: Callable[[Path, Path, Progress], None]
    describe: str = ""

    def digest(self) -> str:
        """Return the hash of the inputs: the image's name in the cache."""
        h = hashlib.sha256()
        for part in self.parts:
            h.update(hashlib.sha256(part).digest())
        return h.hexdigest()[:32]


@dataclass(frozen=True)
class ImageInfo:
    """A built guest image: where its parts are, which inputs made it, and how it wants to run."""

    name: str
    hash: str
    dir: Path
    kernel_package: str
    memory_mb: int = 256  # guest RAM unless the configuration says otherwise
    prepare: str = ""  # guest command that readies a warm base before the pipeline's setup
    mirror: str = ""  # guest command that points dockerd at a registry mirror (URL argument)
    heavy: bool = False  # a Docker machine: counts against the host's Docker slots
    extras: str = ""  # digest of the operator's extras it was built with ("" = none)
    cached: bool = False  # True when the build found it already there

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initramfs.cpio.gz"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @classmethod
    def load(cls, name: str, directory: Path, cached: bool = False) -> ImageInfo:
        """Read the image.json in ``directory``."""
        meta = json.loads((directory / "image.json").read_text())
        return cls(
            name=name,
            hash=meta["hash"],
            dir=directory.resolve(),
            kernel_package=meta["kernel_package"],
            memory_mb=int(meta.get("memory_mb", 256)),
            prepare=meta.get("prepare", ""),
            mirror=meta.get("mirror", ""),
            heavy=bool(meta.get("heavy", False)),
            extras=meta.get("extras", ""),
            cached=cached,
        )


def images_dir(state_dir: Path) -> Path:
    """Return the directory that holds every built image."""
    return Path(state_dir) / "images"


def find_image(name: str, state_dir: Path) -> ImageInfo | None:
    """Return the image last built under ``name``, or None if there is none."""
    pointer = images_dir(state_dir) / f"{name}.json"
    try:
        digest = json.loads(pointer.read_text())["hash"]
        info = ImageInfo.load(name, images_dir(state_dir) / digest)
    except (OSError, ValueError, KeyError):
        return None
    return info if all(p.exists() for p in (info.kernel, info.initrd, info.disk)) else None


def build_image(
    name: str, state_dir: Path, progress: Progress = print, *, extras: ImageExtras | None = None
) -> ImageInfo:
    """Build the guest image ``name`` into the cache, or return the cached one if inputs match.

    ``extras`` (the docker image only) are the operator's added files and packages.
    """
    if name not in BUILDERS:
        known = ", ".join(BUILDERS)
        raise PermanentInfraError(f"unknown image {name!r}; this ccci builds: {known} (see docs/vm.md)")
    builder = importlib.import_module(f"{__package__}.{BUILDERS[name]}")
    root = images_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    plan = builder.plan(root, progress, extras or ImageExtras())
    digest = plan.digest()
    target = root / digest
    if (target / "image.json").exists():
        progress(f"image {name}: cache hit {digest[:12]}")
        _point(root, name, digest)
        return ImageInfo.load(name, target, cached=True)
    # One builder per hash across processes: the others wait, then find it built.
    lock_fd = os.open(root / f".{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"image {name}: another process is building {digest[:12]}; waiting for it")
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if (target / "image.json").exists():
            _point(root, name, digest)
            return ImageInfo.load(name, target, cached=True)
        started = time.monotonic()
        progress(f"image {name}: building {digest[:12]} {plan.describe}".rstrip())
        _make(plan, name, digest, root, target, progress)
    finally:
        os.close(lock_fd)
    _point(root, name, digest)
    progress(f"image {name}: built {digest[:12]} in {time.monotonic() - started:.0f}s")
    return ImageInfo.load(name, target)


def _make(plan: Plan, name: str, digest: str, root: Path, target: Path, progress: Progress) -> None:
    # The sweep removes .build-<pid>-* directories of dead builders.
    with tempfile.TemporaryDirectory(prefix=f".build-{os.getpid()}-", dir=root) as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        plan.make(out, work, progress)
        meta = {"name": name, "hash": digest, **plan.meta}
        (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        for part in out.iterdir():
            part.chmod(0o444)
        out.rename(target)


def _point(root: Path, name: str, digest: str) -> None:
    tmp = root / f".{name}.json.{os.getpid()}"
    tmp.write_text(json.dumps({"hash": digest}) + "\n")
    tmp.replace(root / f"{name}.json")


def describe(info: ImageInfo) -> dict:
    """Return the image as plain data, for logs and JSON output."""
    data = asdict(info)
    data["dir"] = str(info.dir)
    return data
