"""The docker image: Debian bookworm with Docker on its root disk, where real recipes run.

    initramfs /init (busybox) ─ insmod virtio_mmio virtio_blk ─ mount /dev/vda ─ switch_root
      └▶ /sbin/ccci-init: cgroup2, the user-mode network, then tini ─▶ /sbin/ccci-agent
    warm base: /usr/lib/ccci/warm-base (dockerd, swarm, proxy network, a warm-up container)
    each fork: /usr/lib/ccci/set-mirror URL when REGISTRY_MIRROR is configured

The root filesystem is made by ``mmdebstrap`` from the mirror the host's apt names, with
Docker, the stock cloud kernel (so ``modprobe`` finds its own ``/lib/modules``), and ccci's
agent and guest scripts. The top-level packages are pinned to the versions in the host's apt
lists, so the hash names what is installed; ``apt-get update`` moves it on. The kernel QEMU
boots is the one in that root filesystem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError, PermanentInfraError
from . import debian
from .extras import ImageExtras
from .image import Plan, Progress
from .initramfs import write_initramfs
from .kernel import modules_in_load_order, write_vmlinux
from .tool import GUEST_DIR, compile_agent, run_tool

NAME = "docker"
SUMMARY = "Debian bookworm, Docker with a ready swarm, the cloud kernel (real recipes)"
BUILDER_VERSION = "1"  # bump when the build steps change in a way the inputs do not show
PACKAGES = (
    "docker.io", "iptables", "ca-certificates", "curl", "git", "iproute2", "kmod", "procps",
    "netbase", "tini", "busybox-static",  # busybox: the initramfs, and the warm-up image
)  # fmt: skip
BOOT_MODULES = ("virtio_mmio", "virtio_blk")  # the rest is modprobe'd from the root disk
DISK_SIZE = "16G"  # sparse: only what the guest writes takes space
MEMORY_MB = 1024
# Files of ccci/vm/guest/ and where they go in the root filesystem.
GUEST_FILES = {
    "docker-init": "sbin/ccci-init",
    "docker-warm": "usr/lib/ccci/warm-base",
    "docker-mirror": "usr/lib/ccci/set-mirror",
}
# Documentation, manuals and translations are not needed in a CI machine (about 75 MB).
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


def plan(root: Path, progress: Progress, extras: ImageExtras) -> Plan:
    """Resolve the package versions and mirror from the host's apt, and say how to build from them."""
    sources = debian.sources()
    kernel = debian.kernel_package()
    pins = []
    wanted = [*PACKAGES, kernel, *extras.packages]
    for package, version in debian.versions(wanted).items():
        if version is None and package in extras.packages:
            raise ConfigError("IMAGE_PACKAGES", f"{package} is not in Debian {debian.SUITE} as apt here knows it")
        if version is None:
            raise PermanentInfraError(f"apt here does not know {package} in Debian {debian.SUITE}; run apt-get update")
        pins.append(f"{package}={version}")
    extras_digest = extras.digest()
    parts = [
        f"builder={BUILDER_VERSION} image={NAME} suite={debian.SUITE} disk={DISK_SIZE} "
        f"modules={','.join(BOOT_MODULES)} excludes={','.join(DPKG_EXCLUDES)}".encode(),
        "\n".join(sources).encode(),
        "\n".join(pins).encode(),
        (GUEST_DIR / "agent.c").read_bytes(),
        (GUEST_DIR / "docker-boot").read_bytes(),
        *[(GUEST_DIR / name).read_bytes() + dest.encode() for name, dest in sorted(GUEST_FILES.items())],
        extras_digest.encode(),
    ]
    meta = {
        "kernel_package": kernel,
        "memory_mb": MEMORY_MB,
        "prepare": "/" + GUEST_FILES["docker-warm"],
        "mirror": "/" + GUEST_FILES["docker-mirror"],
        "heavy": True,
        "extras": extras_digest,
        "packages": pins,
        "sources": sources,
    }

    def make(out: Path, work: Path, progress: Progress) -> None:
        rootfs = work / "rootfs"
        _bootstrap(rootfs, sources, pins, progress)
        _install_guest_files(rootfs, work, extras)
        progress(f"image {NAME}: guest files installed")
        release = write_vmlinux(rootfs, out / "vmlinux")
        busybox = rootfs / "usr" / "bin" / "busybox"
        init = (GUEST_DIR / "docker-boot").read_bytes()
        write_initramfs(out / "initramfs.cpio.gz", busybox, init, modules_in_load_order(rootfs, BOOT_MODULES))
        progress(f"image {NAME}: kernel {release} and initramfs written")
        for initrd in (rootfs / "boot").glob("initrd.img-*"):
            initrd.unlink()  # Debian's own initramfs; ours replaces it
        raw = work / "disk.raw"
        run_tool(["mkfs.ext4", "-q", "-F", "-L", "ccci-root", "-d", str(rootfs), str(raw), DISK_SIZE],
                 package="e2fsprogs")  # fmt: skip
        shutil.rmtree(rootfs)
        run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], package="qemu-utils")
        raw.unlink()
        progress(f"image {NAME}: root disk written")

    return Plan(parts, meta, make, f"from Debian {debian.SUITE} ({len(pins)} packages pinned)")


def _bootstrap(rootfs: Path, sources: list[str], pins: list[str], progress: Progress) -> None:
    """Run mmdebstrap into ``rootfs``, passing its progress lines on."""
    if os.geteuid() != 0:
        raise PermanentInfraError("building the docker image needs root (mmdebstrap --mode=root, mkfs.ext4 -d)")
    if shutil.which("mmdebstrap") is None:
        raise PermanentInfraError("mmdebstrap is not installed (Debian package mmdebstrap); scripts/install adds it")
    argv = [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
        f"--include={','.join(pins)}",
        *[f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES],
        debian.SUITE, str(rootfs), *sources,
    ]  # fmt: skip
    progress(f"image {NAME}: mmdebstrap {debian.SUITE} from {sources[0].split()[1]} (about a minute)")
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            tail = (tail + [line])[-30:]
            if line.startswith("I: "):
                progress(f"image {NAME}: mmdebstrap: {line[3:]}")
    if proc.returncode != 0:
        detail = "\n".join(tail)
        if "was not found" in detail or "Unable to locate" in detail:
            raise PermanentInfraError(
                f"the Debian mirror no longer has a pinned version (this machine's apt lists are older "
                f"than the mirror): run apt-get update, then build again.\n{detail}"
            )
        raise PermanentInfraError(f"mmdebstrap failed (exit {proc.returncode}):\n{detail}")


def _install_guest_files(rootfs: Path, work: Path, extras: ImageExtras) -> None:
    agent = rootfs / "sbin" / "ccci-agent"
    compile_agent(work / "ccci-agent")
    shutil.copyfile(work / "ccci-agent", agent)
    agent.chmod(0o755)
    for name, dest in GUEST_FILES.items():
        target = rootfs / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GUEST_DIR / name, target)
        target.chmod(0o755)
    (rootfs / "etc" / "docker").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "hostname").write_text("ccci\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    resolv = rootfs / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("nameserver 10.0.2.3\n")  # the resolver of QEMU's user-mode network
    for guest, host in extras.files:
        target = rootfs / guest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copyfile(host, target)
        target.chmod(host.stat().st_mode & 0o7777)
