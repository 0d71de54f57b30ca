"""Small helpers shared by the VM tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ccci.pipeline.executor import ExecRequest, ExecResult


def run(machine, command: str, **kwargs) -> tuple[ExecResult, str, str]:
    """Run ``command`` in ``machine``; return its result, stdout and stderr."""
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    result = machine.exec(ExecRequest(command, on_output=lambda s, c: out[s].append(c), **kwargs))
    return result, b"".join(out["stdout"]).decode(), b"".join(out["stderr"]).decode()


def sha256(path: Path) -> str:
    """Hash a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fork_files(state_dir: Path) -> list[Path]:
    """Return the fork and checkpoint directories under a state directory."""
    vm = state_dir / "vm"
    return sorted(p for p in vm.iterdir() if p.name.startswith(("fork-", "ckpt-"))) if vm.is_dir() else []
