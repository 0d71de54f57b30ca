"""Benchmark a recipe's whole lifecycle: ccci's fork path against a fresh VM, forked checks against re-deploys.

    .venv/bin/python bench/recipe_bench.py [--state-dir DIR] [--out bench/results/recipe.md]
                                           [--checks N] [--abra PATH] [--quick]

Every figure comes from this one run on this host, and the ratios are computed from them:
- the default pipeline (``ccci/recipes/_default/ci.yml``: new, secrets, the latest release, the upgrade to
  the PR head, health, the recipe's own tests, undeploy, remove) on the test recipe
  (``tests/data/webapp``, an upgrade PR over its release 1.0.0+1.0), in forks of the cached warm
  docker base, against the same pipeline on a freshly booted VM (no warm base: QEMU boots the
  image, starts dockerd, inits the swarm, then runs the pipeline);
- N checks after one deploy, each in its own fork of the deployed, healthy app (``fork_from``),
  against N sequential re-deploys, one per check.
Images come from the test registry (``scripts/test-registry``); abra in the guest is ``--abra``
(default: what the tests use, the real abra if ``scripts/abra`` builds it, else the test double).
``--quick`` runs only one check each way (no lifecycle, no fresh VM): the quick test runs it that way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vm_bench import measured_by, table, write_results  # bench/ is on sys.path: the benchmarks run as scripts

from ccci.pipeline.report import Report
from ccci.pipeline.scheduler import run_pipeline
from ccci.pipeline.spec import load_pipeline
from ccci.vm.extras import ABRA_IN_GUEST, ImageExtras
from ccci.vm.image import build_image
from ccci.vm.qemu import QemuExecutor
from tests.fakes.gitrepo import git, make_recipe_repo
from tests.vm.vmhelpers import WEBAPP_IMAGES, abra_binary, busybox_rootfs, recipe_files, registry_cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CI = ROOT / "ccci" / "recipes" / "_default" / "ci.yml"
DOMAIN = "webapp.ci.localhost"
CHECK = (
    'stack=$(printf %s "$APP_DOMAIN" | tr . _ | cut -c1-45)\n'
    'c=$(docker ps -q --filter "label=com.docker.swarm.service.name=${stack}_app" | head -n 1)\n'
    "docker exec \"$c\" sh -c 'echo $CCCI_STEP >> /data/state && cat /data/state'\n"
)


def pipeline_file(scratch: Path, name: str, steps: list[dict], *, keep: tuple[str, ...] = ()) -> Path:
    """Write a ci.yml of the default pipeline's steps named in ``keep`` (all if empty), plus ``steps``."""
    ci = yaml.safe_load(DEFAULT_CI.read_text())
    every = {s["name"]: s for s in ci["steps"]}
    ci["steps"] = [s for s in ci["steps"] if not keep or s["name"] in keep] + steps
    names = {s["name"] for s in ci["steps"]}

    def kept(needs: list[str]) -> list[str]:  # a dropped step's dependants need what it needed
        return [m for n in needs for m in ([n] if n in names else kept(every[n].get("needs", [])))]

    for step in ci["steps"]:
        if "needs" in step:
            step["needs"] = kept(step["needs"])
    path = scratch / name / "ci.yml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(ci, sort_keys=False))
    return path


def checkout(scratch: Path, tag: str, *, upgrade: bool) -> tuple[Path, str]:
    """The test recipe's repository, released; return a checkout at an upgrade PR (or main) and its sha."""
    repo = make_recipe_repo(scratch / tag / "git", name="webapp", files=recipe_files())
    repo.tag("1.0.0+1.0")
    files = recipe_files()
    head = repo.open_pr(1, {
        "compose.yml": files["compose.yml"].replace("ccci/webapp:1.0", "ccci/webapp:1.1"),
        "index.html": files["index.html"].replace("1.0 is up", "1.1 is up"),
        "abra.sh": "export INDEX_VERSION=v2\n",
    }) if upgrade else repo.rev("main")  # fmt: skip
    # Where the harness puts it: $ABRA_DIR/recipes/<recipe>, copied into the guest at that path.
    dest = scratch / tag / "abra" / "recipes" / "webapp"
    git("clone", "-q", str(repo.bare), str(dest))
    git("checkout", "-q", "--detach", head, cwd=dest)
    return dest, head


def run(executor: QemuExecutor, ci: Path, workspace: Path, sha: str, run_id: str) -> tuple[float, Report]:
    """Run ``ci`` on ``workspace`` as the harness would in fork mode; return its wall time and report."""
    env = {"RECIPE": "webapp", "APP_DOMAIN": DOMAIN, "ABRA_DIR": str(workspace.parent.parent),
           "CCCI_RUN": run_id, "CCCI_SHA": sha, "CCCI_MODE": "fork"}  # fmt: skip
    started = time.monotonic()
    report = run_pipeline(
        load_pipeline(ci), executor, workspace, env, host_env={}, run=run_id, recipe="webapp", sha=sha
    )
    wall = time.monotonic() - started
    if report.status != "passed":
        failing = report.failing_step()
        detail = f"{failing.name}: {failing.stdout[-1500:]}{failing.stderr[-1500:]}" if failing else report.notes
        raise SystemExit(f"{run_id}: the pipeline {report.status}: {detail}")
    return wall, report


def abra_label(abra: Path) -> str:
    """Name the abra the image holds: relative to the repository when it is the tests' double."""
    return str(abra.relative_to(ROOT)) + " (the test double)" if abra.is_relative_to(ROOT / "tests") else str(abra)


def fresh_state(scratch: Path, cache: Path) -> Path:
    """A STATE_DIR sharing the cache's images but with no warm base: its first machine boots afresh."""
    state = scratch / "fresh-state"
    (state / "vm" / "bases").mkdir(parents=True)
    (state / "images").symlink_to(cache / "images")
    return state


def main() -> int:
    """Run the benchmark and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path.home() / ".cache" / "ccci-test-vm")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "recipe.md")
    parser.add_argument("--checks", type=int, default=3, help="checks after deploy (default 3)")
    parser.add_argument("--abra", type=Path, help="abra to put into the image (default: what the tests use)")
    parser.add_argument("--quick", action="store_true", help="one check each way; no lifecycle, no fresh VM")
    args = parser.parse_args()
    checks = 1 if args.quick else args.checks
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    extras = ImageExtras(files=((ABRA_IN_GUEST, args.abra or abra_binary()),))
    info = build_image("docker", args.state_dir, progress=say, extras=extras)

    with tempfile.TemporaryDirectory(prefix="ccci-recipe-bench-") as tmp:
        scratch = Path(tmp)
        # Every pipeline is written (and so checked) before the first minute of VM time is spent.
        once = ("new", "secrets", "deploy", "health", "undeploy", "remove")
        forked_checks = [{"name": f"check-{i}", "needs": ["health"], "fork_from": "health", "run": CHECK}
                         for i in range(checks)]  # fmt: skip
        lifecycle = pipeline_file(scratch, "lifecycle", [])
        forked = pipeline_file(scratch, "forked", forked_checks, keep=once)
        redeploy = pipeline_file(scratch, "redeploy", [{"name": "check", "needs": ["health"], "run": CHECK}], keep=once)
        for ci in (lifecycle, forked, redeploy):
            load_pipeline(ci)
        address = registry_cli("start", scratch / "registry")["address"]
        try:
            webapp = busybox_rootfs(scratch / "webapp.tar", dirs=("www", "data"))
            for image in WEBAPP_IMAGES:
                registry_cli("push", scratch / "registry", str(webapp), image, "httpd", "-f", "-p", "8080")

            def executor(state: Path) -> QemuExecutor:
                return QemuExecutor(state, image="docker", registry_mirror=address, extras=extras, slots=1, log=say)

            warm = executor(args.state_dir)
            base_started = time.monotonic()
            base = warm.warm_base()
            base_s = None if base.cached else time.monotonic() - base_started
            fork_s = fresh_s = None
            durations: dict[str, float] = {}
            if not args.quick:
                ws, sha = checkout(scratch, "fork-path", upgrade=True)
                fork_s, fork_report = run(warm, lifecycle, ws, sha, "fork-path")
                durations = {s.name: s.duration_ms / 1000 for s in fork_report.steps if s.duration_ms is not None}
                say(f"lifecycle in forks of the warm base: {fork_s:.1f}s")
                ws, sha = checkout(scratch, "fresh-vm", upgrade=True)
                fresh_s, _ = run(executor(fresh_state(scratch, args.state_dir)), lifecycle, ws, sha, "fresh-vm")
                say(f"lifecycle on a freshly booted VM: {fresh_s:.1f}s")

            ws, sha = checkout(scratch, "forked", upgrade=False)
            forked_s, forked_report = run(warm, forked, ws, sha, "forked")
            say(f"deploy once, {checks} checks in forks: {forked_s:.1f}s")
            redeploy_s = 0.0
            for i in range(checks):
                ws, sha = checkout(scratch, f"redeploy-{i}", upgrade=False)
                wall, _ = run(warm, redeploy, ws, sha, f"redeploy-{i}")
                redeploy_s += wall
            say(f"{checks} re-deploys, one check each: {redeploy_s:.1f}s")
        finally:
            registry_cli("stop", scratch / "registry")

    check_times = [s.duration_ms / 1000 for s in forked_report.steps if s.name.startswith("check-") and s.duration_ms]
    rows = [
        ("Lifecycle in forks of the warm base (new → secrets → release → upgrade → health → own tests → teardown)",
         f"{fork_s:.1f} s" if fork_s else "skipped (--quick)",
         ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())),
        ("The same pipeline on a freshly booted VM (boot, dockerd, swarm, then the pipeline)",
         f"{fresh_s:.1f} s" if fresh_s else "skipped (--quick)",
         f"fork path {fork_s / fresh_s:.2f} × the fresh VM" if fork_s and fresh_s else ""),
        (f"Deploy once, {checks} check(s) in forks of the deployed app", f"{forked_s:.1f} s",
         f"checks took {', '.join(f'{t:.1f}' for t in check_times)} s, in parallel"),
        (f"{checks} sequential re-deploys, one check each", f"{redeploy_s:.1f} s",
         f"forked {forked_s / redeploy_s:.2f} × re-deploys"),
    ]  # fmt: skip
    lines = [
        "# Recipe lifecycle benchmark" + (" (quick)" if args.quick else ""),
        "",
        measured_by("recipe_bench.py", args.quick, warm.accel),
        f"Guest: image `docker` {info.hash[:12]} with abra from `{abra_label(extras.files[0][1])}`, "
        f"{base.layout.memory_mb} MiB RAM, 1 vCPU;"
        + (f" its warm base was booted and readied in {base_s:.0f} s for this run." if base_s else " base cached."),
        "",
        *table(rows),
        "",
        "The test recipe is `tests/data/webapp` (compose 3.8, a Traefik-labelled `app`, a healthcheck, a",
        "versioned config and secret, the `proxy` network, a volume). Every deploy is abra's `app deploy`",
        "(`docker stack deploy` in the guest), and health waits for the stack to converge and answer HTTP",
        "from the `proxy` network. Checks in forks start from the healthy app and run at once; a re-deploy",
        "pays new, deploy and health again for each check.",
        "",
    ]
    return write_results(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
