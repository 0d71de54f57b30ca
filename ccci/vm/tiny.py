"""The tiny image: busybox and ccci's agent in an initramfs, and an empty ext4 data disk.

It boots in a few seconds and runs nothing but a shell: ccci's own tests use it. It has no
network driver and no Docker, so real recipes never run here (they ask for ``docker``).
The hash covers the kernel package, the busybox binary, the agent and init sources and the
builder version; operator extras do not apply to it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PermanentInfraError
from . import debian
from .extras import ImageExtras
from .image import Plan, Progress
from .initramfs import write_initramfs
from .kernel import modules_in_load_order, write_vmlinux
from .tool import GUEST_DIR, compile_agent, file_hash, run_tool

NAME = "tiny"
SUMMARY = "busybox userland, the agent, an empty ext4 data disk (ccci's own tests)"
BUILDER_VERSION = "1"  # bump when the build steps change in a way the inputs do not show
# The virtio transport, the agent's serial port and the data disk; ext4 and 8250 are built in.
MODULES = ("virtio_mmio", "virtio_console", "virtio_blk")
DISK_SIZE = "4G"  # sparse: only what the guest writes takes space
MEMORY_MB = 256


def plan(root: Path, progress: Progress, extras: ImageExtras) -> Plan:
    """Find the inputs of a tiny build (fetching the kernel package if needed) and how to make it."""
    if extras.files or extras.packages:
        progress(f"image {NAME}: IMAGE_FILES and IMAGE_PACKAGES apply to the docker image only; ignored")
    kernel_deb = debian.download(debian.kernel_package(), root / "debs", progress)
    busybox = static_busybox()
    parts = [
        f"builder={BUILDER_VERSION} image={NAME} modules={','.join(MODULES)} disk={DISK_SIZE}".encode(),
        file_hash(kernel_deb).encode(),
        file_hash(busybox).encode(),
        (GUEST_DIR / "agent.c").read_bytes(),
        (GUEST_DIR / "init").read_bytes(),
    ]
    package = kernel_deb.name.split("_")[0]
    meta = {"kernel_package": package, "kernel_deb": kernel_deb.name, "memory_mb": MEMORY_MB}

    def make(out: Path, work: Path, progress: Progress) -> None:
        extracted = work / "kernel"
        run_tool(["dpkg-deb", "-x", str(kernel_deb), str(extracted)], package="dpkg")
        write_vmlinux(extracted, out / "vmlinux")
        progress(f"image {NAME}: kernel unpacked")
        agent = work / "ccci-agent"
        compile_agent(agent)
        files = {"sbin/ccci-agent": (agent.read_bytes(), 0o755)}
        init = (GUEST_DIR / "init").read_bytes()
        write_initramfs(out / "initramfs.cpio.gz", busybox, init, modules_in_load_order(extracted, MODULES), files)
        progress(f"image {NAME}: initramfs written")
        raw = work / "disk.raw"
        run_tool(["mkfs.ext4", "-q", "-F", "-L", "ccci-data", str(raw), DISK_SIZE], package="e2fsprogs")
        run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], package="qemu-utils")

    return Plan(parts, meta, make, f"from {kernel_deb.name}")


def static_busybox() -> Path:
    """Return the host's static busybox (busybox-static), which the tiny guest runs as its userland."""
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            head = candidate.read_bytes()[:65536]
            if b"ld-linux" not in head:  # a dynamic busybox would need its libc in the guest
                return candidate
    raise PermanentInfraError("no static busybox: install busybox-static")
