"""Guest images: a kernel, an initramfs with busybox and ccci's agent, and a data disk.

An image is built from Debian packages (the cloud kernel, busybox-static) plus the agent
sources in ``ccci/vm/guest/``, into a content-addressed directory::

    STATE_DIR/images/
      tiny.json                 name -> hash of the inputs it was built from
      debs/                     kernel packages fetched with apt-get download
      <hash>/
        image.json              what is here and what it was built from
        vmlinux                 the kernel, uncompressed ELF with a PVH entry (QEMU boots it directly)
        initramfs.cpio.gz       busybox, virtio modules, /init, /sbin/ccci-agent
        disk.qcow2              ext4 data disk, mounted at /var/lib/ccci in the guest

The hash covers every input, so building again with the same inputs is a cache hit.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PermanentInfraError

GUEST_DIR = Path(__file__).resolve().parent / "guest"
BUILDER_VERSION = "1"  # bump when the build steps change in a way the inputs do not show
KERNEL_META = "linux-image-cloud-amd64"
# The virtio transport, the agent's serial port and the data disk; ext4 and 8250 are built in.
MODULES = ("virtio_mmio", "virtio_console", "virtio_blk")
DISK_SIZE = "4G"  # sparse: only what the guest writes takes space
IMAGES = {"tiny": "busybox userland, the agent, an empty ext4 data disk"}
LZ4_MAGIC = b"\x02\x21\x4c\x18"


@dataclass(frozen=True)
class ImageInfo:
    """A built guest image: where its parts are and which inputs made it."""

    name: str
    hash: str
    dir: Path
    kernel_package: str
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


def images_dir(state_dir: Path) -> Path:
    """Return the directory that holds every built image."""
    return Path(state_dir) / "images"


def find_image(name: str, state_dir: Path) -> ImageInfo | None:
    """Return the image last built under ``name``, or None if there is none."""
    pointer = images_dir(state_dir) / f"{name}.json"
    try:
        digest = json.loads(pointer.read_text())["hash"]
        meta = json.loads((images_dir(state_dir) / digest / "image.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    info = ImageInfo(name, digest, (images_dir(state_dir) / digest).resolve(), meta["kernel_package"])
    return info if all(p.exists() for p in (info.kernel, info.initrd, info.disk)) else None


def build_image(name: str, state_dir: Path, progress: Callable[[str], None] = print) -> ImageInfo:
    """Build the guest image ``name`` into the cache, or return the cached one if inputs match."""
    if name not in IMAGES:
        known = ", ".join(IMAGES)
        raise PermanentInfraError(f"unknown image {name!r}; this ccci builds: {known} (see docs/vm.md)")
    root = images_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    kernel_deb = _kernel_deb(root / "debs", progress)
    busybox = _static_busybox()
    digest = _inputs_hash(name, kernel_deb, busybox)
    package = kernel_deb.name.split("_")[0]
    target = root / digest
    if (target / "image.json").exists():
        progress(f"image {name}: cache hit {digest[:12]} ({package})")
        _point(root, name, digest)
        return ImageInfo(name, digest, target, package, cached=True)
    progress(f"image {name}: building {digest[:12]} from {kernel_deb.name}")
    with tempfile.TemporaryDirectory(prefix=f".build-{os.getpid()}-", dir=root) as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        extracted = work / "kernel"
        _run(["dpkg-deb", "-x", str(kernel_deb), str(extracted)])
        _write_vmlinux(extracted, out / "vmlinux")
        progress(f"image {name}: kernel unpacked")
        agent = work / "ccci-agent"
        _run(["gcc", "-static", "-Os", "-o", str(agent), str(GUEST_DIR / "agent.c")])
        _write_initramfs(out / "initramfs.cpio.gz", busybox, agent, _modules(extracted))
        progress(f"image {name}: initramfs written")
        raw = work / "disk.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "ccci-data", str(raw), DISK_SIZE])
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")])
        meta = {"name": name, "hash": digest, "kernel_package": package, "kernel_deb": kernel_deb.name}
        (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        for part in out.iterdir():
            part.chmod(0o444)
        try:
            out.rename(target)
        except OSError:
            # Another builder finished the same inputs first; theirs is identical.
            if not (target / "image.json").exists():
                raise
    _point(root, name, digest)
    progress(f"image {name}: built {digest[:12]}")
    return ImageInfo(name, digest, target, package)


def _point(root: Path, name: str, digest: str) -> None:
    tmp = root / f".{name}.json.{os.getpid()}"
    tmp.write_text(json.dumps({"hash": digest}) + "\n")
    tmp.replace(root / f"{name}.json")


def _inputs_hash(name: str, kernel_deb: Path, busybox: Path) -> str:
    h = hashlib.sha256()
    for part in (
        f"builder={BUILDER_VERSION} image={name} modules={','.join(MODULES)} disk={DISK_SIZE}".encode(),
        file_hash(kernel_deb).encode(),
        file_hash(busybox).encode(),
        (GUEST_DIR / "agent.c").read_bytes(),
        (GUEST_DIR / "init").read_bytes(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


def file_hash(path: Path) -> str:
    """Return the SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _kernel_deb(debs: Path, progress: Callable[[str], None]) -> Path:
    """Find the current cloud kernel package in the apt cache or ours, else apt-get download it."""
    package = _resolve_kernel_package()
    caches = (debs, Path("/var/cache/apt/archives"))
    for cache in caches:
        found = sorted(cache.glob(f"{package}_*.deb")) if cache.is_dir() else []
        if found:
            return found[-1]
    debs.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {package} with apt-get download")
    # Download privately, then rename into place: a concurrent builder never sees half a .deb.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
        _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        fetched = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not fetched:
            raise PermanentInfraError(f"apt-get download {package} produced no .deb")
        os.replace(fetched[-1], debs / fetched[-1].name)
    return debs / fetched[-1].name


def _resolve_kernel_package() -> str:
    """Follow the linux-image-cloud-amd64 metapackage to today's versioned kernel package."""
    if not shutil.which("apt-cache"):
        raise PermanentInfraError("apt-cache is missing: the guest kernel comes from Debian packages")
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise PermanentInfraError(f"apt-cache does not know {KERNEL_META}; run apt-get update")


def _static_busybox() -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            head = candidate.read_bytes()[:65536]
            if b"ld-linux" not in head:  # a dynamic busybox would need its libc in the guest
                return candidate
    raise PermanentInfraError("no static busybox: install busybox-static")


def _write_vmlinux(extracted: Path, target: Path) -> None:
    """Unpack the bzImage's payload: an ELF kernel with a PVH note boots without a decompressor."""
    vmlinuz = sorted((extracted / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise PermanentInfraError("the kernel package holds no /boot/vmlinuz-*")
    data = vmlinuz[-1].read_bytes()
    start = data.find(LZ4_MAGIC)
    if start < 0:
        raise PermanentInfraError(f"{vmlinuz[-1].name}: no lz4 payload (only lz4 kernels are supported)")
    with target.open("wb") as out:
        # lz4 stops at the end of the frame; the bzImage trailer after it is ignored (exit 0 or
        # a warning about trailing bytes, depending on the version, so check the result instead).
        subprocess.run(["lz4", "-dc"], input=data[start:], stdout=out, stderr=subprocess.DEVNULL)
    if target.read_bytes()[:4] != b"\x7fELF":
        raise PermanentInfraError(f"{vmlinuz[-1].name}: the unpacked payload is not an ELF kernel")


def _modules(extracted: Path) -> list[tuple[str, bytes]]:
    """Return the needed modules with their dependencies, in load order, uncompressed."""
    trees = sorted((extracted / "lib" / "modules").glob("*/kernel"))
    if not trees:
        raise PermanentInfraError("the kernel package holds no lib/modules/*/kernel")
    files = {}
    for path in trees[-1].rglob("*.ko*"):
        files[path.name.split(".ko")[0].replace("-", "_")] = path
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(mod: str) -> None:
        if mod in seen:
            return
        seen.add(mod)
        if mod not in files:
            raise PermanentInfraError(f"kernel module {mod} is not in the kernel package")
        path = files[mod]
        blob = path.read_bytes()
        if path.name.endswith(".xz"):
            blob = lzma.decompress(blob)
        elif path.name.endswith(".gz"):
            blob = gzip.decompress(blob)
        elif not path.name.endswith(".ko"):
            raise PermanentInfraError(f"{path.name}: unsupported module compression")
        m = re.search(rb"depends=([\w,-]*)\0", blob)
        for dep in filter(None, (m.group(1).decode() if m else "").split(",")):
            add(dep.replace("-", "_"))
        ordered.append((mod, blob))

    for mod in MODULES:
        add(mod)
    return ordered


def _write_initramfs(target: Path, busybox: Path, agent: Path, modules: list[tuple[str, bytes]]) -> None:
    cpio = _Cpio()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "etc/ccci",
        "etc/ccci/init.d",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var",
        "var/lib",
    ):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        if applet not in ("bin/busybox", "sbin/init", "linuxrc"):
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", (GUEST_DIR / "init").read_bytes(), 0o755)
    cpio.file("sbin/ccci-agent", agent.read_bytes(), 0o755)
    cpio.file("etc/ccci/modules", "".join(f"{m}\n" for m, _ in modules).encode(), 0o644)
    for mod, blob in modules:
        cpio.file(f"lib/modules/{mod}.ko", blob, 0o644)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    cpio.file("etc/group", b"root:x:0:\n", 0o644)
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)
    with target.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
        out.write(cpio.finish())


class _Cpio:
    """A newc archive written in memory (the kernel's initramfs format), no cpio tool needed."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4) + data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name.lstrip("/"), 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.buf.getvalue()


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PermanentInfraError(f"{argv[0]} is not installed (needed to build guest images)") from None
    if done.returncode != 0:
        raise PermanentInfraError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def describe(info: ImageInfo) -> dict:
    """Return the image as plain data, for logs and JSON output."""
    data = asdict(info)
    data["dir"] = str(info.dir)
    return data
