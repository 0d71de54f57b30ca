"""Small helpers shared by the VM tests."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

from ccci.pipeline.executor import ExecRequest, ExecResult
from ccci.vm.extras import ABRA_IN_GUEST, ImageExtras
from ccci.vm.image import build_image
from ccci.vm.image import file_hash as sha256  # noqa: F401  (re-exported for the tests)

# Images and warm bases are cached across sessions, so reruns and other suites find them built.
CACHE = Path(os.environ.get("CCCI_TEST_VM_CACHE", Path.home() / ".cache" / "ccci-test-vm"))


def shared_vm_state(tmp_path: Path) -> Path:
    """Return a fresh STATE_DIR whose images and warm bases are the cached ones (built if needed).

    The fork files under its ``vm/`` are the test's own; only the expensive parts are shared.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    build_image("tiny", CACHE, progress=lambda _m: None)
    (CACHE / "vm" / "bases").mkdir(parents=True, exist_ok=True)
    (CACHE / "vm" / "slots").mkdir(parents=True, exist_ok=True)
    state = tmp_path / "state"
    (state / "vm").mkdir(parents=True)
    (state / "images").symlink_to(CACHE / "images")
    (state / "vm" / "bases").symlink_to(CACHE / "vm" / "bases")
    # Docker slots are host-wide, as in production: Docker tests of every worker (and every
    # session on this machine) queue for them instead of crowding the cores.
    (state / "vm" / "slots").symlink_to(CACHE / "vm" / "slots")
    return state


def run(machine, command: str, **kwargs) -> tuple[ExecResult, str, str]:
    """Run ``command`` in ``machine``; return its result, stdout and stderr."""
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    result = machine.exec(ExecRequest(command, on_output=lambda s, c: out[s].append(c), **kwargs))
    return result, b"".join(out["stdout"]).decode(), b"".join(out["stderr"]).decode()


def fork_files(state_dir: Path) -> list[Path]:
    """Return the fork and checkpoint directories under a state directory."""
    vm = state_dir / "vm"
    return sorted(p for p in vm.iterdir() if p.name.startswith(("fork-", "ckpt-"))) if vm.is_dir() else []


REPO = Path(__file__).resolve().parents[2]
TEST_REGISTRY = REPO / "scripts" / "test-registry"
FAKE_ABRA = REPO / "tests" / "fakes" / "abra"


def abra_binary() -> Path:
    """Return the abra the tests put into the docker image: the real one if scripts/abra can build
    it (cached), else the test double tests/fakes/abra (the Go module proxy refuses abra here)."""
    built = subprocess.run([str(REPO / "scripts" / "abra")], capture_output=True, text=True, timeout=1800)
    if built.returncode == 0 and built.stdout.strip():
        return Path(built.stdout.strip())
    return FAKE_ABRA


def image_extras_for_tests() -> ImageExtras:
    """The extras of the tests' docker image: abra only, so that every docker test shares one base."""
    return ImageExtras(files=((ABRA_IN_GUEST, abra_binary()),))


STACK = Path(__file__).resolve().parent / "stack"


def busybox_rootfs(target: Path, busybox: Path = Path("/bin/busybox"), dirs: tuple[str, ...] = ()) -> Path:
    """Write a root filesystem tarball of the host's static busybox (Debian's busybox-static),
    with the empty directories ``dirs`` besides bin, tmp and etc."""
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(target, "w") as tar:
        for d in ("bin", "tmp", "etc", *dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in applets:
            if applet != "busybox":
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
    return target


def registry_cli(command: str, directory: Path, *args: str) -> dict:
    """Run scripts/test-registry; return the JSON line it printed ({} for stop)."""
    done = subprocess.run([str(TEST_REGISTRY), command, str(directory), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"test-registry {command} failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout) if done.stdout.strip() else {}


WEBAPP = Path(__file__).resolve().parents[1] / "data" / "webapp"
WEBAPP_IMAGES = ("ccci/webapp:1.0", "ccci/webapp:1.1")  # what the test registry serves for it


def recipe_files(name: str = "webapp") -> dict[str, str]:
    """Return the test recipe's files (tests/data/webapp), renamed to the recipe ``name`` (its
    images stay ``ccci/webapp``: the ones the test registry serves)."""
    files = {}
    for path in sorted(WEBAPP.rglob("*")):
        if path.is_file():
            text = path.read_text().replace("webapp", name).replace(f"ccci/{name}:", "ccci/webapp:")
            files[str(path.relative_to(WEBAPP))] = text
    return files
