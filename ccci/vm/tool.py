"""Host tools that build guest images: running them (failures as sentences), hashing, the agent."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from ..errors import PermanentInfraError

GUEST_DIR = Path(__file__).resolve().parent / "guest"  # the guest's own sources: agent, init scripts


def run_tool(argv: list[str], cwd: Path | None = None, *, package: str = "") -> str:
    """Run ``argv`` and return its stdout; raise PermanentInfraError naming what is missing or failed."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        hint = f" (Debian package {package})" if package else ""
        raise PermanentInfraError(f"{argv[0]} is not installed{hint}; it is needed to build guest images") from None
    if done.returncode != 0:
        raise PermanentInfraError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def file_hash(path: Path) -> str:
    """Return the SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compile_agent(target: Path) -> None:
    """Compile ccci's guest agent (``guest/agent.c``) into a static binary at ``target``."""
    run_tool(["gcc", "-static", "-Os", "-o", str(target), str(GUEST_DIR / "agent.c")], package="gcc libc6-dev")
