"""The host as QEMU sees it: which accelerator works here, the TSC rate, the QEMU binary.

KVM is used only where the CPU has real VMX or SVM. Some hosts expose a ``/dev/kvm`` backed by
``kvm_pvm`` (a paravirtual hypervisor that only runs PVM-built guest kernels): stock Debian
kernels hang there, so such a host gets TCG and a reason that says why.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class Accel:
    """The accelerator QEMU will use on this host, and why it was chosen."""

    name: str  # "kvm" | "tcg"
    reason: str

    def qemu_args(self, tb_size_mb: int = 0) -> list[str]:
        """Return the accelerator and CPU arguments; the CPU must match between base and forks.

        ``tb_size_mb`` caps TCG's translation buffer (0: QEMU's default); KVM has none.
        """
        if self.name == "kvm":
            # -arch-capabilities: some hosts refuse to set that MSR for the guest.
            return ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
        tcg = f"tcg,tb-size={tb_size_mb}" if tb_size_mb > 0 else "tcg"
        return ["-accel", tcg, "-cpu", "max"]


@cache
def detect_accel() -> Accel:
    """Choose KVM when the CPU virtualises natively and /dev/kvm is usable, else TCG."""
    forced = os.environ.get("CCCI_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return Accel(forced, f"forced by CCCI_VM_ACCEL={forced}")
    flags = _cpu_flags()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "no usable /dev/kvm")
    if "vmx" not in flags and "svm" not in flags:
        pvm = " (kvm_pvm: runs only PVM guest kernels)" if _kvm_pvm_loaded() else ""
        return Accel("tcg", f"/dev/kvm is present but the CPU has no vmx/svm{pvm}; stock kernels hang there")
    if _kvm_pvm_loaded():
        return Accel("tcg", "/dev/kvm is kvm_pvm, which runs only PVM guest kernels")
    return Accel("kvm", "the CPU has " + ("vmx" if "vmx" in flags else "svm") + " and /dev/kvm is usable")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _kvm_pvm_loaded() -> bool:
    try:
        modules = Path("/proc/modules").read_text()
    except OSError:
        modules = ""
    if "kvm_pvm" in modules or Path("/sys/module/kvm_pvm").exists():
        return True
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_KVM_PVM=y" in f.read()
    except OSError:
        return False


@cache
def tsc_khz() -> int:
    """Return the host TSC rate: a TCG guest reads the host TSC and must be told its rate."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 1_000_000


def qemu_binary() -> str | None:
    """Return the path of qemu-system-x86_64, or None when QEMU is not installed."""
    return shutil.which(QEMU)
