"""Docker forks in real QEMU (TCG here): the docker image, its warm base, the stack a recipe is.

Slow by nature (a stack takes a minute or two to answer under TCG), so the checks share few
fork lifetimes: one test runs two forks at once through everything a recipe needs. The image
and the warm base come from the session cache (see conftest.py).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ccci.pipeline.scheduler import run_pipeline
from ccci.pipeline.spec import parse_pipeline
from ccci.pipeline.stop import Stop
from ccci.vm.image import build_image
from ccci.vm.qemu import QemuExecutor
from ccci.vm.slots import acquire_slot
from ccci.vm.sweep import processes_using
from tests.e2e.conftest import wait_until
from tests.vm.vmhelpers import REPO, STACK, abra_binary, fork_files, image_extras_for_tests, run

# The first test may build the image and boot the base. One xdist worker runs them all (they
# would queue for the one Docker slot anyway) while the others run the rest of the suite.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800), pytest.mark.xdist_group("docker")]
DAY = 86400


def api(machine, path: str) -> object:
    """GET a Docker API path inside the fork, through its socket (curl: cheap under TCG)."""
    result, out, err = run(machine, f"curl -fsS --unix-socket /var/run/docker.sock 'http://docker{path}'")
    assert result.exit_code == 0, err
    return json.loads(out)


def stack_workspace(tmp_path: Path, name: str) -> Path:
    """A copy of the test stack (compose file and scripts) to copy into a fork."""
    ws = tmp_path / name
    shutil.copytree(STACK, ws)
    return ws


def metrics(out: str) -> dict[str, float]:
    """Return the ``::metric key=value`` lines of a step's output."""
    pairs = (line.removeprefix("::metric ").partition("=") for line in out.splitlines() if line.startswith("::metric "))
    return {key: float(value) for key, _, value in pairs}


STACK_CONTAINERS = "/containers/json?all=1&filters=%7B%22label%22%3A%5B%22com.docker.stack.namespace%3Dapp%22%5D%7D"
WEB_SECRET = "docker exec $(docker ps -q -f label=com.docker.swarm.service.name=app_web) cat /run/secrets/token"


def test_the_docker_image_is_cached_and_names_what_it_holds(docker_cache):
    info = build_image("docker", docker_cache, progress=lambda _m: None, extras=image_extras_for_tests())
    assert info.cached and info.heavy and info.memory_mb == 1024
    meta = json.loads((info.dir / "image.json").read_text())
    pinned = {p.split("=")[0] for p in meta["packages"]}
    assert {"docker.io", "iptables", "curl", "git", "tini", info.kernel_package} <= pinned
    assert all(line.startswith("deb ") for line in meta["sources"])  # read from this machine's apt


def test_two_forks_deploy_the_same_stack_at_once_without_seeing_each_other(docker_executor, tmp_path, state_dir):
    """One fork checks everything a recipe needs; the other, whose base is "a year old", too."""
    base = docker_executor.warm_base()
    release = base.layout.image.kernel_package.removeprefix("linux-image-")

    def fork(name: str, aged: bool) -> dict:
        seen: dict = {"name": name}
        with docker_executor.boot(stack_workspace(tmp_path, name)) as machine:
            seen["hostname"] = run(machine, "hostname")[1].strip()
            if aged:
                # A base saved long ago: the fork's clock jumps far past the snapshot's. The
                # swarm's node certificates (10 years) must still be good, dockerd still answer.
                assert run(machine, f"date -s @$(( $(date +%s) + {365 * DAY} ))")[0].exit_code == 0
            _, uname, _ = run(machine, "uname -r")
            seen["kernel"] = uname.strip()
            info = api(machine, "/info")
            seen["swarm"] = (info["Swarm"]["LocalNodeState"], info["Swarm"]["ControlAvailable"])
            seen["mirrors"] = info["RegistryConfig"]["Mirrors"]
            [node] = api(machine, "/nodes")
            seen["node"] = (node["Status"]["State"], node["ManagerStatus"]["Reachability"])
            nets = api(machine, "/networks?filters=%7B%22name%22%3A%5B%22proxy%22%5D%7D")
            seen["proxy"] = [(n["Name"], n["Driver"], n["Scope"]) for n in nets]
            image = "ccci/busybox:latest"
            if not aged:
                result, out, _ = run(machine, "docker run --rm ccci/busybox:latest echo hello from a container")
                seen["run"] = (result.exit_code, out)
                result, out, err = run(machine, "docker pull hello:1")  # Docker Hub's name, via the mirror
                seen["pull"] = (result.exit_code, out + err)
                image = "hello:1"
            result, out, err = run(machine, "./deploy.sh", env={"IMAGE": image, "MARKER": name}, timeout=1200)
            seen["deploy"] = (result.exit_code, out, err)
            seen["deploy_metrics"] = metrics(out)
            _, seen["backend"], _ = run(machine, "curl -fsS http://127.0.0.1:8080/cgi-bin/backend")
            _, seen["secret"], _ = run(machine, WEB_SECRET)
            result, out, err = run(machine, "./undeploy.sh", timeout=900)
            seen["undeploy"] = (result.exit_code, out, err)
            seen["left"] = api(machine, STACK_CONTAINERS)
        return seen

    with ThreadPoolExecutor(2) as pool:
        fresh, aged = pool.map(lambda args: fork(*args), [("fork-a", False), ("fork-b", True)])
    for seen in (fresh, aged):
        name = seen["name"]
        assert seen["kernel"] == release  # the image's own kernel, not the host's
        assert seen["swarm"] == ("active", True), seen
        assert seen["node"] == ("ready", "reachable"), seen
        assert seen["proxy"] == [("proxy", "overlay", "swarm")]
        assert seen["mirrors"] == [f"http://10.0.2.2:{docker_executor.mirror_url.rsplit(':', 1)[1]}/"]
        code, out, err = seen["deploy"]
        assert code == 0, f"{name}: deploy failed:\n{out}\n{err}"
        # Its own page through the routing mesh: the other fork's identical stack is invisible.
        assert f"<h1>{name}</h1>" in out and ("fork-b" if name == "fork-a" else "fork-a") not in out
        assert seen["backend"].startswith("backend of ")  # web -> backend over the overlay network
        assert len(seen["secret"]) == 48  # the external secret, mounted
        assert seen["undeploy"][0] == 0, seen["undeploy"]
        assert seen["left"] == []
    assert fresh["run"] == (0, "hello from a container\n")
    assert fresh["pull"][0] == 0 and "Downloaded newer image for hello:1" in fresh["pull"][1]
    assert fresh["hostname"] != aged["hostname"]
    print(f"stack timings (s): fresh {fresh['deploy_metrics']}, aged {aged['deploy_metrics']}")
    assert fork_files(state_dir) == []


def test_cancel_mid_deploy_leaves_no_qemu_and_no_fork_file(docker_executor, tmp_path, state_dir):
    stop = Stop()
    spec = {
        "image": "docker",
        "steps": [
            {"name": "deploy", "run": "./deploy.sh", "timeout": 900},
            {"name": "after", "needs": ["deploy"], "run": "echo never"},
            {"name": "teardown", "teardown": True, "run": "docker info --format '{{.Swarm.LocalNodeState}}'"},
        ],
    }

    def on_event(event):
        if event.kind == "output" and "Creating service" in (event.text or ""):
            stop.request("canceled", "canceled mid-deploy by the test")  # the stack is being deployed right now

    ws = stack_workspace(tmp_path, "cancel")
    pipeline = parse_pipeline(spec, ws / "ci.yml")
    report = run_pipeline(pipeline, docker_executor, ws, {"RECIPE": "stack"}, stop=stop, on_event=on_event, host_env={})
    steps = {s.name: s for s in report.steps}
    assert stop.is_set() and report.status == "canceled", report
    assert steps["deploy"].status == "canceled" and steps["after"].status == "canceled"
    assert steps["teardown"].status == "passed" and steps["teardown"].stdout == "active\n"  # the fork still worked
    assert fork_files(state_dir) == []
    assert processes_using(state_dir) == [] and processes_using(state_dir.resolve()) == []


OWNER = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from ccci.pipeline.executor import ExecRequest
    from ccci.vm.qemu import QemuExecutor
    machine = QemuExecutor(Path(sys.argv[2]), image="docker", slots=1).boot(Path(sys.argv[3]))
    started = threading.Event()
    sink = lambda _s, chunk: b"Creating" in chunk and started.set()
    threading.Thread(target=machine.exec, args=(ExecRequest("./deploy.sh", on_output=sink),), daemon=True).start()
    started.wait(600)
    print(machine.pid, flush=True)
    sys.stdin.read()
    """
)


def test_sigkill_of_the_owner_mid_deploy_then_sweep_leaves_nothing(docker_cache, state_dir, tmp_path):
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(REPO), str(state_dir), str(stack_workspace(tmp_path, "killed"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        qemu_pid = int(owner.stdout.readline())
        pidfd = os.pidfd_open(qemu_pid)
    finally:
        owner.kill()
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()
    try:
        assert select.select([pidfd], [], [], 30)[0], "QEMU outlived its SIGKILLed owner"
    finally:
        os.close(pidfd)
    assert any(f"-{owner.pid}-" in p.name for p in fork_files(state_dir))
    env = {**os.environ, "CCCI_STATE_DIR": str(state_dir), "CCCI_LOCK_DIR": str(tmp_path / "locks")}
    done = subprocess.run([sys.executable, "-m", "ccci", "sweep"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert fork_files(state_dir) == []
    assert processes_using(state_dir) == [] and processes_using(state_dir.resolve()) == []


def test_ccci_test_runs_a_recipe_in_a_docker_fork_after_waiting_visibly_for_a_slot(docker_cache, state_dir, tmp_path):
    """Through the harness: the pipeline's default image is docker; a busy host queues the run."""
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "ci.yml").write_text(  # no image: key, so the docker image
        "steps:\n  - name: swarm\n    run: docker info --format '{{.Swarm.LocalNodeState}} {{.Driver}}'\n"
    )
    env = {**os.environ, "CCCI_STATE_DIR": str(state_dir), "CCCI_LOCK_DIR": str(tmp_path / "locks"),
           "CCCI_ABRA_HOME": str(tmp_path / "abra"), "CCCI_EXECUTOR": "auto", "CCCI_DOCKER_SLOTS": "1",
           "CCCI_ABRA_BIN": str(abra_binary())}  # fmt: skip
    release = acquire_slot(state_dir / "vm" / "slots", 1)  # another run holds the host's one slot
    released = False
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ccci", "test", str(recipe), "--source", str(recipe), "--json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_until(lambda: any("waiting for a Docker slot" in e.get("text", "") for e in _events(state_dir)),
                   timeout=120, what="the run to say it waits for a Docker slot")  # fmt: skip
        release()
        released = True
        out, err = proc.communicate(timeout=600)
    finally:
        if not released:
            release()
    assert proc.returncode == 0, err[-3000:]
    [step] = json.loads(out)["steps"]
    assert step["stdout"] == "active overlay2\n"
    assert "qemu microVM forks of the docker image" in err
    assert any(e.get("text", "").startswith("got a Docker slot after") for e in _events(state_dir))


def _events(state_dir: Path) -> list[dict]:
    events = []
    for path in (state_dir / "runs").glob("*/events.jsonl"):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return events


@pytest.mark.own_base
def test_an_image_archive_is_preloaded_into_the_warm_base(docker_cache, state_dir, registry, tmp_path):
    """DOCKER_PRELOAD: a docker-archive made without Docker (skopeo) is in every fork's image store."""
    archive = tmp_path / "hello.tar"
    copy = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                           f"docker://{registry}/library/hello:1", f"docker-archive:{archive}:preloaded/hello:1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert copy.returncode == 0, copy.stderr
    # Its own bases directory: this base is keyed by the archive and not worth sharing.
    (state_dir / "vm" / "bases").unlink()
    (state_dir / "vm" / "bases").mkdir()
    executor = QemuExecutor(state_dir, image="docker", preload=(archive,), slots=1)
    base = executor.warm_base()
    assert json.loads((base.dir / "meta.json").read_text())["preload"] == [str(archive)]
    with executor.fork_from(base, None) as machine:
        _, out, _ = run(machine, "docker image ls --format '{{.Repository}}:{{.Tag}}' preloaded/hello")
        assert out == "preloaded/hello:1\n"
