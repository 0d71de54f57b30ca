"""deploy/: the files an operator installs are valid for the tools that read them, and agree with ccci.

gunicorn loads its config and the app; systemd accepts the units and their commands run; nginx
accepts the site and, in front of real gunicorn, exposes only the public paths and refuses
bodies larger than MAX_BODY at the edge; the Drone runner settings route recipe-ci builds here
and give them settings that load.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ccci.config import Settings, load_settings
from ccci.store import Store
from ccci.worker import SWEEP_EVERY
from tests.support import ROOT, free_port, stop, wait_for_port

DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
INSTALL_ROOT = "/opt/ccci"  # where the units expect the checkout
CERT = "/etc/letsencrypt/live/ci.example.org/fullchain.pem"
KEY = "/etc/letsencrypt/live/ci.example.org/privkey.pem"


def app_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment for ccci with its state under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_") and k != "GUNICORN_CMD_ARGS"}
    env.update(CCCI_STATE_DIR=str(tmp_path / "state"), CCCI_LOCK_DIR=str(tmp_path / "locks"), PYTHONPATH=str(ROOT))
    return env


# -- gunicorn ----------------------------------------------------------------------------------


def test_gunicorn_config_loads_the_app(tmp_path):
    result = subprocess.run(
        [VENV_BIN / "gunicorn", "--check-config", "-c", "deploy/gunicorn.conf.py", "app:app"],
        cwd=ROOT, env=app_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_gunicorn_config_refuses_bad_settings_at_start(tmp_path):
    # preload_app: a configuration error stops gunicorn before any worker forks, naming the key.
    env = {**app_env(tmp_path), "CCCI_DISPATCH": "carrier-pigeon"}
    result = subprocess.run(
        [VENV_BIN / "gunicorn", "--check-config", "-c", "deploy/gunicorn.conf.py", "app:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DISPATCH" in result.stderr


@pytest.fixture
def gunicorn(tmp_path) -> Iterator[int]:
    """Serve app:app with deploy/gunicorn.conf.py (2 workers, a free port); yield the port."""
    port = free_port()
    env = {**app_env(tmp_path), "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port} --workers 2"}
    with (tmp_path / "gunicorn.log").open("wb") as log:
        proc = subprocess.Popen(
            [VENV_BIN / "gunicorn", "-c", "deploy/gunicorn.conf.py", "app:app"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port(port, proc, "gunicorn")
        yield port
    finally:
        stop(proc)
    assert proc.returncode == 0, (tmp_path / "gunicorn.log").read_text()[-3000:]


# -- systemd -----------------------------------------------------------------------------------


def read_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into {section: {key: [values]}}; keys such as Environment= repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{name}: not a key=value line in a section: {line!r}"
        current.setdefault(key, []).append(value)
    return sections


def unit_env(name: str) -> dict[str, str]:
    """Return the unit's Environment= assignments."""
    return dict(p.split("=", 1) for value in read_unit(name)["Service"]["Environment"] for p in shlex.split(value))


@pytest.mark.parametrize("name", ["ccci-web.service", "ccci-worker.service", "ccci-sweep.service", "ccci-sweep.timer"])
def test_systemd_unit_verifies(tmp_path, name):
    # systemd-analyze checks every key and value and that ExecStart's binary exists; point the
    # install root at this checkout so it can.
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the units' commands are still run below")
    unit = tmp_path / name
    unit.write_text((DEPLOY / "systemd" / name).read_text().replace(INSTALL_ROOT, str(ROOT)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values, but says so on stderr.
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("name", ["ccci-web.service", "ccci-worker.service", "ccci-sweep.service"])
def test_systemd_unit_paths_agree_with_ccci_settings(name):
    service = read_unit(name)["Service"]
    env = unit_env(name)
    settings = load_settings({k: v for k, v in env.items() if k != "CCCI_CONFIG"})
    # The directories systemd creates and opens up are the ones ccci is told to use.
    assert Path("/var/lib", *service["StateDirectory"]) == settings.STATE_DIR
    if "CCCI_LOCK_DIR" in env:
        assert Path("/run", *service["RuntimeDirectory"]) == settings.LOCK_DIR
    assert service["WorkingDirectory"] == [INSTALL_ROOT]
    assert env["CCCI_CONFIG"] == "/etc/ccci/config.toml"


def test_systemd_web_unit_command_serves(tmp_path):
    # The web unit's exact ExecStart, from this checkout, loads the config and the app.
    argv = shlex.split(read_unit("ccci-web.service")["Service"]["ExecStart"][0].replace(INSTALL_ROOT, str(ROOT)))
    assert Path(argv[0]).is_file(), f"{argv[0]} is not installed"
    result = subprocess.run(
        [argv[0], "--check-config", *argv[1:]], cwd=ROOT, env=app_env(tmp_path), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_systemd_worker_unit_command_is_the_worker(tmp_path):
    argv = shlex.split(read_unit("ccci-worker.service")["Service"]["ExecStart"][0].replace(INSTALL_ROOT, str(ROOT)))
    assert Path(argv[0]).is_file(), f"{argv[0]} is not installed"
    result = subprocess.run(
        [*argv, "--help"], cwd=ROOT, env=app_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m ccci worker" in result.stdout


def test_systemd_sweep_unit_sweeps_and_its_timer_starts_it(tmp_path):
    argv = shlex.split(read_unit("ccci-sweep.service")["Service"]["ExecStart"][0].replace(INSTALL_ROOT, str(ROOT)))
    env = {**app_env(tmp_path), "CCCI_LOCK_DIR": str(tmp_path / "locks"), "CCCI_EXECUTOR": "bwrap"}
    result = subprocess.run([*argv, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["errors"] == []
    timer = read_unit("ccci-sweep.timer")
    # the worker's own period, so both kinds of host free leaks as fast
    assert timer["Timer"]["OnUnitActiveSec"] == [f"{SWEEP_EVERY / 60:g}min"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]


# -- nginx -------------------------------------------------------------------------------------

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (Debian package nginx)",
)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed for a test certificate")


def nginx_binary() -> str:
    """Return the nginx binary (Debian puts it in /usr/sbin, which may not be on PATH)."""
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_setup(tmp_path: Path, *, upstream: int = 8080) -> tuple[Path, int]:
    """Write a main config around deploy/nginx.conf with a test certificate; return it and the TLS port."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ci.example.org",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    http_port, tls_port = free_port(), free_port()
    site = (DEPLOY / "nginx.conf").read_text()
    for placeholder, value in (
        (CERT, tmp_path / "cert.pem"),
        (KEY, tmp_path / "key.pem"),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;"),
    ):
        assert str(placeholder) in site, f"deploy/nginx.conf no longer has {placeholder}"
        site = site.replace(str(placeholder), str(value))
    site = re.sub(r"^\s*listen \[::\].*$", "", site, flags=re.M)  # no IPv6 needed here
    (tmp_path / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # request bodies spill to temp files under tmp_path
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"{user}pid {tmp_path}/nginx.pid;\nerror_log stderr;\ndaemon off;\nevents {{}}\n"
        f"http {{ access_log off; include {tmp_path}/site.conf; }}\n"
    )
    return main, tls_port


@needs_nginx
@needs_openssl
def test_nginx_config_is_valid(tmp_path):
    main, _ = nginx_setup(tmp_path)
    result = subprocess.run(
        [nginx_binary(), "-t", "-c", str(main), "-p", str(tmp_path), "-e", "stderr"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture
def proxy(tmp_path, gunicorn) -> Iterator[int]:
    """deploy/nginx.conf in front of real gunicorn; yield nginx's TLS port."""
    main, tls_port = nginx_setup(tmp_path, upstream=gunicorn)
    with (tmp_path / "nginx.log").open("wb") as log:
        proc = subprocess.Popen(
            [nginx_binary(), "-c", str(main), "-p", str(tmp_path), "-e", "stderr"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port(tls_port, proc, "nginx")
        yield tls_port
    finally:
        stop(proc, signal.SIGQUIT)  # graceful: workers finish, the master exits 0


def request(
    port: int, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None, source: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTPS request to the proxy (from ``source``, another loopback address); return the answer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the throwaway self-signed certificate
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=30, context=context, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def body_too_large(port: int, size: int) -> tuple[int, dict[str, str]]:
    """Announce a body of ``size`` bytes without sending it; return nginx's answer to the headers alone."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        conn.putrequest("POST", "/hooks/forge")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


@needs_nginx
@needs_openssl
def test_nginx_exposes_public_paths_and_restricts_admin(proxy, tmp_path):
    status, headers, body = request(proxy, "GET", "/healthz")
    # Only gunicorn runs here, no worker: health says so, through the proxy.
    assert status == 503 and b"never completed a pass" in body, body
    Store(tmp_path / "state" / "ccci.db").beat("worker")
    status, headers, body = request(proxy, "GET", "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True, body
    status, _, body = request(proxy, "POST", "/hooks/forge", body=b"{}", headers={"Content-Type": "application/json"})
    assert status == 401, body  # gunicorn answered: no signature
    status, _, _ = request(proxy, "GET", "/runs/1")
    assert status == 404  # ccci's own 404: no such run
    # Paths ccci does not publish stop at the edge.
    assert request(proxy, "GET", "/")[0] == 404
    assert request(proxy, "GET", "/hooks/forge")[0] == 403
    # Metrics and the admin API answer the allow list (127.0.0.1) and nobody else (127.0.0.2).
    status, _, body = request(proxy, "GET", "/metrics")
    assert status == 200 and b"ccci_runs_finished_total" in body
    assert request(proxy, "GET", "/metrics", source="127.0.0.2")[0] == 403
    assert request(proxy, "GET", "/admin/runs")[0] == 401  # ccci wants its token too
    assert request(proxy, "GET", "/admin/runs", source="127.0.0.2")[0] == 403


@needs_nginx
@needs_openssl
def test_nginx_body_limit_matches_max_body(proxy):
    limit = Settings().MAX_BODY
    status, headers = body_too_large(proxy, limit + 1)
    assert status == 413 and headers.get("server", "").startswith("nginx")
    # A body of exactly MAX_BODY passes the edge and reaches ccci, which checks the signature.
    status, headers, body = request(
        proxy, "POST", "/hooks/forge", body=b" " * limit, headers={"Content-Type": "application/json"}
    )
    assert status == 401, body


# -- Drone runner ------------------------------------------------------------------------------


def runner_env() -> dict[str, str]:
    """Parse deploy/drone-runner.env: KEY=VALUE lines, comments and blank lines."""
    env = {}
    for number, line in enumerate((DEPLOY / "drone-runner.env").read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"line {number} is not KEY=VALUE: {line!r}"
        assert value == value.strip() and not value.startswith(("'", '"')), f"line {number}: quotes or spaces"
        assert key not in env, f"line {number}: {key} set twice"
        env[key] = value
    return env


def test_drone_runner_env_is_key_value_with_the_rpc_settings():
    env = runner_env()
    for key in ("DRONE_RPC_HOST", "DRONE_RPC_PROTO", "DRONE_RPC_SECRET", "DRONE_RUNNER_CAPACITY"):
        assert env.get(key), f"{key} is missing"
    assert env["DRONE_RPC_PROTO"] in ("http", "https")
    assert "://" not in env["DRONE_RPC_HOST"]  # a host, the scheme is DRONE_RPC_PROTO
    assert int(env["DRONE_RUNNER_CAPACITY"]) >= 1


def test_drone_runner_takes_the_recipe_ci_pipeline():
    pipelines = {doc["name"]: doc for doc in yaml.safe_load_all((ROOT / ".drone.yml").read_text()) if doc}
    wanted = pipelines["recipe-ci"]["node"]
    labels = dict(pair.split(":", 1) for pair in runner_env()["DRONE_RUNNER_LABELS"].split(","))
    # Drone routes a pipeline to a runner only when every node label it asks for is offered.
    assert all(labels.get(k) == v for k, v in wanted.items()), (wanted, labels)


def test_drone_runner_gives_builds_settings_that_do_not_depend_on_home():
    builds = dict(pair.split(":", 1) for pair in runner_env()["DRONE_RUNNER_ENVIRON"].split(","))
    assert builds["CCCI_CONFIG"] == "/etc/ccci/config.toml"
    # The exec runner gives each build a throwaway HOME and workspace: the settings whose defaults
    # resolve against them (~/.local/state/ccci, ~/.abra) must be given explicitly, as absolute paths.
    env = {**builds, "CCCI_CONFIG": str(DEPLOY / "config.example.toml")}  # standing in for /etc/ccci
    settings = load_settings(env)
    for key in ("STATE_DIR", "LOCK_DIR", "ABRA_HOME"):
        assert "CCCI_" + key in builds, f"builds would use the default {key}"
        assert getattr(settings, key) == Path(builds["CCCI_" + key]) and getattr(settings, key).is_absolute()
    assert Path(builds["ABRA_DIR"]).is_absolute() and Path(builds["DOCKER_CONFIG"]).is_absolute()
    assert builds["DOCKER_HOST"].startswith(("unix://", "tcp://", "ssh://"))


def test_recipe_ci_runs_the_hosts_installed_ccci_and_installs_nothing():
    pipelines = {doc["name"]: doc for doc in yaml.safe_load_all((ROOT / ".drone.yml").read_text()) if doc}
    recipe_ci = pipelines["recipe-ci"]
    assert recipe_ci["clone"] == {"disable": True}  # the code is the host's, not the build's
    [step] = recipe_ci["steps"]
    [command] = step["commands"]
    worker = shlex.split(read_unit("ccci-worker.service")["Service"]["ExecStart"][0])
    assert command.startswith(f"{Path(worker[0]).parent}/ccci run ")  # the same install as the units'
    assert not any(setup in command for setup in ("scripts/install", "pip ", "-m venv", "&&", ";"))


def test_a_production_install_leaves_the_test_tools_out():
    def listed(*args: str) -> dict[str, list[str]]:
        out = subprocess.run([ROOT / "scripts" / "install", "--list", *args], capture_output=True, text=True,
                             check=True, cwd="/", timeout=60).stdout  # fmt: skip
        return {k: v.split() for k, v in (line.split(": ", 1) for line in out.splitlines())}

    run, test = listed(), listed("--test")
    test_only = {"chromium", "nginx", "openssl"}
    assert not test_only & set(run["debian"]) and test_only <= set(test["debian"])
    assert {"qemu-system-x86", "bubblewrap", "git"} <= set(run["debian"])
    runtime = (ROOT / run["python"][0]).read_text()
    assert "pytest" not in runtime and "ruff" not in runtime and "gunicorn==" in runtime
    assert "-r requirements.txt" in (ROOT / test["python"][0]).read_text()
