"""Warm bases and snapshots: frozen machine states that forks start from.

A warm base is the image booted once and readied — the image's own warm-up (the docker image
starts dockerd and its swarm), image archives loaded into Docker, the pipeline's setup, a
``sync`` — then saved with its RAM in a shared file and only the device state in the migration
stream (``x-ignore-shared``). It is cached by the hash of everything that went into it (image,
device set, RAM size, preloaded archives, setup, QEMU version), so later runs never boot::

    STATE_DIR/vm/bases/<key>/
      mem         guest RAM (read-only; forks map it privately, copy-on-write)
      state       device state, a few tens of KB
      disk.qcow2  the base's writable disk layer, frozen (forks get an overlay on it)
      meta.json   what it was made from
      pin         forks hold a shared flock on it while they run; pruning needs it exclusive

A checkpoint of a running fork (``fork_from``) is the same shape in ``STATE_DIR/vm/ckpt-*``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PermanentInfraError, TransientInfraError
from .agent import AgentLost
from .instance import DEVICES, Layout, Vm
from .owner import claim, new_tag
from .tool import file_hash

BOOT_TIMEOUT = 120.0  # a cold TCG boot takes ~4 s (tiny) to ~10 s (docker); this is for a loaded host
PREPARE_TIMEOUT = 1800.0  # the docker warm-up takes ~2 min under TCG on an idle host
SETUP_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


@dataclass(frozen=True)
class Snapshot:
    """A frozen machine state: RAM file, device state and disk that forks start from."""

    dir: Path
    layout: Layout
    cached: bool = False
    is_base: bool = False  # a warm base (a fork of it needs per-fork setup), not a checkpoint

    @property
    def mem(self) -> Path:
        return self.dir / "mem"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    def pin(self) -> int:
        """Hold this snapshot against pruning; return the fd whose closing releases it."""
        fd = os.open(self.dir / "pin", os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(self.dir / "pin")  # last use, for pruning by age
        return fd


def vm_dir(state_dir: Path) -> Path:
    """Return the directory of fork files, checkpoints and warm bases."""
    return Path(state_dir) / "vm"


def logs_dir(state_dir: Path) -> Path:
    """Return the directory of per-machine logs."""
    return vm_dir(state_dir) / "logs"


def base_key(layout: Layout, setup: str, preload: tuple[Path, ...] = ()) -> str:
    """Return the cache key of the warm base for this image, machine shape, preloads and setup."""
    h = hashlib.sha256()
    parts = [layout.image.hash, layout.accel.name, str(layout.memory_mb), setup, _qemu_version(), DEVICES]
    for part in [*parts, *(file_hash(p) for p in preload)]:
        h.update(hashlib.sha256(part.encode()).digest())
    return h.hexdigest()[:24]


def warm_base(
    layout: Layout, setup: str, state_dir: Path, log: Callable[[str], None], preload: tuple[Path, ...] = ()
) -> Snapshot:
    """Return the warm base for ``layout``, ``preload`` and ``setup``, booting and saving it if not cached.

    ``preload``: image archives (``docker save`` or OCI tarballs) to ``docker load`` in the base.
    """
    bases = vm_dir(state_dir) / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    for archive in preload:
        if not archive.is_file():
            raise PermanentInfraError(f"DOCKER_PRELOAD: {archive} is not a file")
    key = base_key(layout, setup, preload)
    target = bases / key
    if (target / "meta.json").exists():
        return Snapshot(target, layout, cached=True, is_base=True)
    # One builder per key, across processes; the others wait and then find it built.
    lock_fd = os.open(bases / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if (target / "meta.json").exists():
            return Snapshot(target, layout, cached=True, is_base=True)
        started = time.monotonic()
        building = bases / new_tag("building")
        building.mkdir()
        try:
            claim(building)
            _boot_and_save(layout, setup, preload, building, logs_dir(state_dir), log)
            meta = {"image": layout.image.hash, "accel": layout.accel.name, "memory_mb": layout.memory_mb,
                    "devices": DEVICES, "preload": [str(p) for p in preload], "setup": setup,
                    "boot_s": round(time.monotonic() - started, 3)}  # fmt: skip
            (building / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            (building / "owner").unlink()
            building.rename(target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        log(f"warm base {key} saved in {time.monotonic() - started:.1f}s")
        return Snapshot(target, layout, is_base=True)
    finally:
        os.close(lock_fd)


def _boot_and_save(
    layout: Layout, setup: str, preload: tuple[Path, ...], into: Path, logs: Path, log: Callable[[str], None]
) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    overlay(layout.image.disk, into / "disk.qcow2")
    name = into.name
    vm = Vm(name, layout.argv(into / "mem", shared=True, disk=into / "disk.qcow2", incoming=False),
            logs / f"{name}.log")  # fmt: skip
    try:
        vm.qmp.handshake()
        try:
            vm.agent.wait_ready(BOOT_TIMEOUT)
        except AgentLost as exc:
            raise TransientInfraError(f"the base never came up: {exc}\n{vm.log_tail()}") from None
        log(f"warm base {into.name}: booted image {layout.image.name}")
        if layout.image.prepare:
            _step(vm, layout.image.prepare, f"the {layout.image.name} image's warm-up", log, PREPARE_TIMEOUT)
        for archive in preload:
            log(f"warm base {into.name}: docker load < {archive}")
            _step(vm, "docker load", f"docker load of {archive}", log, PREPARE_TIMEOUT, stdin=_blocks(archive))
        if setup:
            _step(vm, setup, "the warm base's setup", log, None)
        _step(vm, "sync", "sync", log, BOOT_TIMEOUT)  # the frozen disk layer holds what the page cache says
        save(vm, into / "state", device_only=True)
    finally:
        vm.kill()
    (into / "pin").touch()
    for part in ("mem", "state", "disk.qcow2"):
        (into / part).chmod(0o444)


def _step(vm: Vm, command: str, what: str, log: Callable[[str], None], timeout: float | None, stdin=None) -> None:
    """Run one command of the base's preparation, passing its output lines to ``log``."""
    output: list[bytes] = []
    pending = bytearray()

    def sink(_stream: str, chunk: bytes) -> None:
        output.append(chunk)
        pending.extend(chunk)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            if line.strip():
                log(line.decode(errors="replace"))

    outcome = vm.agent.run(command, "/", SETUP_ENV, stdin=stdin, on_output=sink, timeout=timeout)
    if outcome.timed_out:
        raise TransientInfraError(f"{what} did not finish within {timeout:.0f}s")
    if outcome.status != 0:
        tail = b"".join(output)[-2000:].decode(errors="replace")
        raise PermanentInfraError(f"{what} exited {outcome.status}:\n{tail}")


def _blocks(path: Path, size: int = 1 << 20):
    with path.open("rb") as f:
        yield from iter(lambda: f.read(size), b"")


def save(vm: Vm, state: Path, device_only: bool) -> None:
    """Stop ``vm`` and write its state to ``state``: device state only when RAM is a shared file."""
    vm.qmp.execute("stop")
    # Set explicitly either way: a fork restored with it on would otherwise keep it.
    ignore_shared(vm, device_only)
    # QEMU 7.2 has no file: migration URI (it came in 8.2); exec: is the portable way.
    vm.qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
    vm.qmp.wait_migration(timeout=120)


def restore(vm: Vm, state: Path, device_only: bool) -> None:
    """Load ``state`` into a QEMU started with ``-incoming defer``, and let it run."""
    vm.qmp.handshake()
    ignore_shared(vm, device_only)
    vm.qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
    status = vm.qmp.wait_status(("inmigrate",), timeout=60)
    if status != "running":
        vm.qmp.execute("cont")  # the source was stopped before saving, so the fork lands paused


def ignore_shared(vm: Vm, on: bool) -> None:
    """Leave RAM in shared files out of the migration stream (on), or send all of it (off)."""
    vm.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": on}])


def overlay(backing: Path, path: Path) -> None:
    """Create a qcow2 overlay at ``path`` whose reads fall through to ``backing``."""
    # The backing path is stored in the overlay: resolve it, so that no symlink it was reached
    # through can later strand the overlay.
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", "qcow2", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise TransientInfraError(f"qemu-img create {path.name}: {done.stderr.strip()}")


_qemu_version_cache: list[str] = []


def _qemu_version() -> str:
    # Device state is only loadable by the QEMU that wrote it: the version is part of the key.
    if not _qemu_version_cache:
        try:
            out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
        except OSError:
            out = ""
        _qemu_version_cache.append(out.splitlines()[0] if out else "unknown")
    return _qemu_version_cache[0]
