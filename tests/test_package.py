"""The wheel carries everything ccci needs: built, installed into a fresh virtualenv, run from elsewhere.

This is what ``pipx install .`` does: build a wheel from the source tree, install it with its
declared dependencies (from PyPI) into a virtualenv of its own, and put ``ccci`` on PATH. The
installed command then runs ``ccci test hello`` and ``ccci serve`` with nothing of this checkout
in reach: another working directory, no PYTHONPATH, a HOME of its own.
Cost: about 30 s with a warm pip cache (building the wheel, creating the venv, installing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from ccci import __version__
from tests.support import ROOT, free_port, stop, wait_for_port

pytestmark = pytest.mark.slow
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "var")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build a wheel of this source tree and install it into a fresh virtualenv; return its bin/."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)  # building writes build/ into the tree
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(source)], check=True, timeout=600)
    [wheel] = (tmp / "dist").glob("ccci-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ccci/recipes/hello/ci.yml" in names and "ccci/recipes/_default/ci.yml" in names
    assert "ccci/web/templates/run.html" in names and "ccci/vm/guest/agent.c" in names
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    venv_pip = [str(tmp / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*venv_pip, "install", str(wheel)], check=True, timeout=600)
    return tmp / "venv" / "bin"


@pytest.fixture
def elsewhere(tmp_path) -> dict[str, str]:
    """An environment that knows nothing of this checkout: its own HOME, no PYTHONPATH, no CCCI_*."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCCI_", "PYTHON", "VIRTUAL_ENV", "XDG_"))}
    return {**env, "HOME": str(home), "CCCI_EXECUTOR": "bwrap", "CCCI_LOCK_DIR": str(tmp_path / "locks")}


def test_the_installed_command_names_itself_and_its_version(installed, elsewhere, tmp_path):
    done = subprocess.run([installed / "ccci", "--version"], env=elsewhere, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == f"ccci {__version__}"
    usage = subprocess.run([installed / "ccci", "--help"], env=elsewhere, cwd=tmp_path, capture_output=True,
                           text=True, timeout=60).stdout  # fmt: skip
    assert usage.startswith("usage: ccci ")
    module = subprocess.run([installed / "python", "-m", "ccci", "--help"], env=elsewhere, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert module.startswith("usage: python -m ccci ")


def test_the_installed_command_runs_the_hello_recipe(installed, elsewhere, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "README.md").write_text("a recipe\n")
    done = subprocess.run([installed / "ccci", "test", "hello", "--json"], env=elsewhere, cwd=checkout,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "passed"
    where = subprocess.run([installed / "python", "-c", "import ccci; print(ccci.__file__)"], env=elsewhere,
                           cwd=checkout, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "site-packages" in where and str(ROOT) not in where  # the wheel's ccci, not this checkout


def test_the_installed_command_serves(installed, elsewhere, tmp_path):
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([installed / "ccci", "serve", "--bind", f"127.0.0.1:{port}"], env=elsewhere,
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for_port(port, proc, "ccci serve")
        assert requests.get(f"http://127.0.0.1:{port}/runs/1", timeout=10).status_code == 404
        assert "ccci_" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stop(proc)
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
