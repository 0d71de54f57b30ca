"""Small helpers shared by the VM tests."""

from __future__ import annotations

import os
from pathlib import Path

from ccci.pipeline.executor import ExecRequest, ExecResult
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
    state = tmp_path / "state"
    (state / "vm").mkdir(parents=True)
    (state / "images").symlink_to(CACHE / "images")
    (state / "vm" / "bases").symlink_to(CACHE / "vm" / "bases")
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
