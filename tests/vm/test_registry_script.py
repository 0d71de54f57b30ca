"""scripts/test-registry: start prints one JSON line, push makes a pullable image, stop leaves nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.vm.vmhelpers import TEST_REGISTRY, busybox_rootfs

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("docker-registry", "umoci", "skopeo")),
    reason="docker-registry, umoci and skopeo are not installed (scripts/install installs them)",
)
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(TEST_REGISTRY), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def registry_pids(directory: Path) -> list[int]:
    """Live (not zombie) processes serving ``directory``'s registry."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            serving = entry.name.isdigit() and str(directory).encode() in (entry / "cmdline").read_bytes()
            if serving and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def get(url: str, accept: str = "") -> tuple[dict, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read()), reply.headers.get("Content-Type", "")


def test_start_push_stop_from_another_directory(tmp_path):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    rootfs = busybox_rootfs(tmp_path / "rootfs.tar")
    started = cli("start", "../data", cwd=elsewhere)  # relative to where it is run
    data = (tmp_path / "data").resolve()
    try:
        assert started.returncode == 0, started.stderr
        [line] = started.stdout.splitlines()
        address = json.loads(line)["address"]
        assert address.startswith("127.0.0.1:") and registry_pids(data)
        again = cli("start", str(data), cwd=elsewhere)
        assert again.returncode == 1 and "already runs" in again.stderr
        pushed = cli("push", str(data), str(rootfs), "coop/hello:1.0", "httpd", "-f", "-p", "8080", cwd=elsewhere)
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout) == {"image": f"{address}/coop/hello:1.0"}
        manifest, kind = get(f"http://{address}/v2/coop/hello/manifests/1.0", MANIFEST)
        assert kind == MANIFEST and len(manifest["layers"]) == 1
        config, _ = get(f"http://{address}/v2/coop/hello/blobs/{manifest['config']['digest']}")
        assert config["config"]["Cmd"] == ["httpd", "-f", "-p", "8080"]
        assert config["architecture"] == "amd64" and config["os"] == "linux"
        refused = cli("push", str(data), str(rootfs), "Not:A:Name", cwd=elsewhere)
        assert refused.returncode == 1 and "is not NAME:TAG" in refused.stderr
    finally:
        stopped = cli("stop", str(data), cwd=elsewhere)
    assert stopped.returncode == 0, stopped.stderr
    assert registry_pids(data) == []
    assert cli("stop", str(data), cwd=elsewhere).returncode == 0  # stopping twice is fine
    missing = cli("push", str(data), str(rootfs), "coop/hello:2", cwd=elsewhere)
    assert missing.returncode == 1 and "no registry runs" in missing.stderr


def test_usage_errors_say_how_to_call_it(tmp_path):
    done = cli("serve", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("usage: test-registry start DIR")
