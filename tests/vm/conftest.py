"""Fixtures for the QEMU executor tests: one image and one warm base per session, cached.

The guest image and warm bases live in a stable cache (``CCCI_TEST_VM_CACHE``, default
``~/.cache/ccci-test-vm``) so that reruns are cache hits; each test gets its own state directory
whose ``images`` and ``vm/bases`` point there, so its fork files are its own. Every QEMU a test
started is killed when the test ends, whatever happened.

The soak is not part of the default run: ``.venv/bin/pytest -m soak tests/vm``.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from ccci.vm.host import qemu_binary
from ccci.vm.image import build_image
from ccci.vm.qemu import QemuExecutor
from ccci.vm.sweep import _processes_using
from tests.vm.vmhelpers import CACHE, shared_vm_state


def pytest_collection_modifyitems(config, items):
    if "soak" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="soak: run with .venv/bin/pytest -m soak tests/vm")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vm_cache() -> Path:
    """The stable cache, with the tiny image built in it."""
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/install installs it)")
    build_image("tiny", CACHE, progress=lambda _m: None)
    return CACHE


@pytest.fixture
def state_dir(tmp_path: Path):
    """A state directory of this test's own, sharing the cached images and warm bases."""
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/install installs it)")
    state = shared_vm_state(tmp_path)
    yield state
    # Reap every QEMU this test left (a failed assertion must not leak a VM), then say so.
    leaked = _processes_using(state) + _processes_using(state.resolve())
    for pid in set(leaked):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(state / "vm", ignore_errors=True)
    assert not leaked, f"QEMU processes left running by the test: {leaked}"


@pytest.fixture
def executor(state_dir: Path) -> QemuExecutor:
    """A QEMU executor on this test's state directory (warm base from the session cache)."""
    return QemuExecutor(state_dir, kill_grace=10.0)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small recipe checkout to copy into machines."""
    ws = tmp_path / "checkout"
    (ws / "tests").mkdir(parents=True)
    (ws / "compose.yml").write_text("version: '3.8'\n")
    (ws / "tests" / "smoke.sh").write_text("#!/bin/sh\necho smoke ok\n")
    (ws / "tests" / "smoke.sh").chmod(0o755)
    return ws
