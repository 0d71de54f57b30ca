"""scripts/gitea itself: the pinned build and its cache, one instance started and stopped by directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ccci.pids import process_start_time
from tests.e2e.conftest import ROOT
from tests.realgitea import build, instance

SCRIPT = ROOT / "scripts" / "gitea"


def _gitea(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_a_second_build_is_a_cache_hit(tmp_path):
    done = _gitea("build", cwd=tmp_path)  # scripts/test built it before pytest started
    assert done.returncode == 0, done.stderr
    assert "cache hit" in done.stderr
    binary = Path(done.stdout.strip())
    assert binary == build.cache_dir() / "gitea" and os.access(binary, os.X_OK)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(f"gitea version {build.VERSION} ")


def test_two_builders_at_once_build_once(tmp_path):
    # A cache of its own, but Go's build cache stays the warm one (it would follow XDG_CACHE_HOME).
    go_cache = subprocess.run(["go", "env", "GOCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "GOCACHE": go_cache}
    builders = [
        subprocess.Popen([str(SCRIPT), "build"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        results = [(*b.communicate(timeout=240), b.returncode) for b in builders]
    finally:
        for b in builders:
            if b.poll() is None:
                b.kill()
                b.wait()
    assert [code for _, _, code in results] == [0, 0], [err for _, err, _ in results]
    [path] = {out.strip() for out, _, _ in results}
    assert path == str(tmp_path / "cache" / "ccci" / "gitea" / build.VERSION / "gitea")
    stderr = "".join(err for _, err, _ in results)
    assert stderr.count("matches the pin") == 1 and "built by another process" in stderr, stderr


def test_a_module_whose_checksum_differs_from_the_pin_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "MODULE_SUM", "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(build.GiteaBuildError, match="refusing to build it"):
        build.ensure_built(progress=lambda message: None)
    assert not (build.cache_dir() / "gitea").exists() and not (build.cache_dir() / "build.json").exists()


def test_start_prints_one_json_line_and_stop_leaves_nothing(tmp_path):
    data = tmp_path / "instance"
    started = _gitea("start", str(data), cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        [line] = started.stdout.splitlines()
        creds = json.loads(line)
        assert list(creds) == ["url", "admin_user", "admin_token", "bot_user", "bot_token"]
        assert requests.get(creds["url"] + "/api/v1/version", timeout=10).json() == {"version": build.VERSION}
        admin = {"Authorization": f"token {creds['admin_token']}"}
        users = requests.get(creds["url"] + "/api/v1/admin/users", headers=admin, timeout=10).json()
        assert {u["login"] for u in users} == {creds["admin_user"], creds["bot_user"]}
        # The bot's token has exactly the scopes ccci's README asks for: anything else is refused, and says so.
        refused = requests.get(
            creds["url"] + "/api/v1/user", headers={"Authorization": f"token {creds['bot_token']}"}, timeout=10
        )
        assert refused.status_code == 403
        assert "token scope=read:organization,write:issue,write:repository" in refused.json()["message"]
        again = _gitea("start", str(data), cwd=tmp_path)
        assert again.returncode == 1 and "still running" in again.stderr
    finally:
        pid = json.loads((data / "credentials.json").read_text())["pid"] if (data / "credentials.json").exists() else 0
        stopped = _gitea("stop", str(data), cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert pid and process_start_time(pid) is None  # gone (a zombie not yet reaped by init counts as gone)
    assert instance.stragglers(data) == []
    assert list(data.iterdir()) == []


def test_the_bot_scopes_are_the_ones_the_readme_asks_for():
    readme = (ROOT / "README.md").read_text()
    wanted = ", ".join(f"`{scope}`" for scope in instance.BOT_SCOPES)
    assert f"({wanted})" in readme


def test_scripts_gitea_needs_a_verb(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "build,start,stop" in done.stderr
