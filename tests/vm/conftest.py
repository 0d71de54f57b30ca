"""Fixtures for the QEMU executor tests: one image and one warm base per session, cached.

The guest image and warm bases live in a stable cache (``CCCI_TEST_VM_CACHE``, default
``~/.cache/ccci-test-vm``) so that reruns are cache hits; each test gets its own state directory
whose ``images`` and ``vm/bases`` point there, so its fork files are its own. Every QEMU a test
started is killed when the test ends, whatever happened.

The docker image is built into the same cache on first use (about a minute), with abra in it
(``image_extras_for_tests``: the real abra if ``scripts/abra`` builds it, else ``tests/fakes/abra``),
and its warm base booted once (about two minutes under TCG); later sessions find both. Docker tests take the
host-wide Docker slot (one at a time), so they never crowd each other on the cores.

The soak is not part of the default run: ``.venv/bin/pytest -m soak tests/vm``; nor are the
``own_base`` tests, which boot a warm base of their own (``-m own_base``).
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
from ccci.vm.sweep import processes_using
from tests.vm.vmhelpers import (
    CACHE,
    WEBAPP_IMAGES,
    busybox_rootfs,
    image_extras_for_tests,
    registry_cli,
    shared_vm_state,
)

DOCKER_TOOLS = ("mmdebstrap", "docker-registry", "umoci", "skopeo")


def pytest_collection_modifyitems(config, items):
    for marker, why in (("soak", "soak"), ("own_base", "own_base (boots a warm base of its own)")):
        if marker in (config.option.markexpr or ""):
            continue
        skip = pytest.mark.skip(reason=f"{why}: run with .venv/bin/pytest -m {marker} tests/vm")
        for item in items:
            if marker in item.keywords:
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
    leaked = processes_using(state) + processes_using(state.resolve())
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


@pytest.fixture(scope="session")
def docker_cache(vm_cache) -> Path:
    """The stable cache, with the docker image built in it too."""
    missing = [tool for tool in DOCKER_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/install installs them)")
    build_image("docker", CACHE, progress=lambda _m: None, extras=image_extras_for_tests())
    return CACHE


@pytest.fixture(scope="session")
def registry(tmp_path_factory, docker_cache) -> str:
    """A test registry on loopback holding hello:1 (busybox, serving 8080) and the test recipe's
    images (busybox with /www and /data); returns its address."""
    root = tmp_path_factory.mktemp("registry")
    address = registry_cli("start", root / "data")["address"]
    try:
        rootfs = busybox_rootfs(root / "rootfs.tar")
        registry_cli("push", root / "data", str(rootfs), "library/hello:1", "httpd", "-f", "-p", "8080")
        webapp = busybox_rootfs(root / "webapp.tar", dirs=("www", "data"))
        for image in WEBAPP_IMAGES:
            registry_cli("push", root / "data", str(webapp), image, "httpd", "-f", "-p", "8080", "-h", "/www")
        yield address
    finally:
        registry_cli("stop", root / "data")


@pytest.fixture
def docker_executor(state_dir: Path, registry: str) -> QemuExecutor:
    """A QEMU executor of the docker image, pulling through the test registry, one Docker slot."""
    return QemuExecutor(
        state_dir, image="docker", registry_mirror=registry, slots=1, kill_grace=30.0, extras=image_extras_for_tests()
    )
