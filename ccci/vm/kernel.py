"""The guest kernel: a Debian kernel package's tree unpacked into what QEMU boots and loads.

Both images boot the same way: QEMU starts the uncompressed ELF ``vmlinux`` through its PVH
entry (no decompressor, no firmware), and the initramfs loads the few virtio modules the boot
needs with ``insmod``, in an order read from each module's own ``depends=`` field, so no
``depmod`` and no ``modules.dep`` are needed.
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
from pathlib import Path

from ..errors import PermanentInfraError

LZ4_MAGIC = b"\x02\x21\x4c\x18"


def write_vmlinux(tree: Path, target: Path) -> str:
    """Unpack the bzImage under ``tree/boot`` to an ELF kernel at ``target``; return its release."""
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise PermanentInfraError("the kernel package holds no /boot/vmlinuz-*")
    data = vmlinuz[-1].read_bytes()
    start = data.find(LZ4_MAGIC)
    if start < 0:
        raise PermanentInfraError(f"{vmlinuz[-1].name}: no lz4 payload (only lz4 kernels are supported)")
    with target.open("wb") as out:
        # lz4 stops at the end of the frame; the bzImage trailer after it is ignored (exit 0 or
        # a warning about trailing bytes, depending on the version, so check the result instead).
        try:
            subprocess.run(["lz4", "-dc"], input=data[start:], stdout=out, stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            raise PermanentInfraError("lz4 is not installed (needed to unpack the guest kernel)") from None
    if target.read_bytes()[:4] != b"\x7fELF":
        raise PermanentInfraError(f"{vmlinuz[-1].name}: the unpacked payload is not an ELF kernel")
    return vmlinuz[-1].name.removeprefix("vmlinuz-")


def modules_in_load_order(tree: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Return ``wanted`` modules of the tree with their dependencies, in load order, uncompressed."""
    trees = sorted(p for p in (tree / "lib" / "modules").glob("*/kernel") if p.is_dir())
    if not trees:
        trees = sorted(p for p in (tree / "usr" / "lib" / "modules").glob("*/kernel") if p.is_dir())
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

    for mod in wanted:
        add(mod)
    return ordered
