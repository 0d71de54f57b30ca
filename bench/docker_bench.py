"""Benchmark Docker forks: warm-base fork vs cold boot to a healthy stack, memory, concurrency.

    .venv/bin/python bench/docker_bench.py [--state-dir DIR] [--out bench/results/docker.md] [--quick]

Every figure comes from this one run on this host, and the ratios are computed from them:
- fork of the warm docker base → the test stack healthy and answering through the routing mesh,
  against cold boot → dockerd → swarm → deploy → healthy (target: the fork under 1/3 of cold);
- fork start → first command;
- the memory a Docker fork alone holds after the deploy (its anonymous memory: see ``memory``),
  with the capped TCG translation buffer and with QEMU's default one (target: under 512 MiB capped);
- two forks deploying at once: wall time against one alone;
- where a fork's time goes: the deploy's own phases (``::metric`` lines of ``deploy.sh``), and the
  same deploy a second time in the same fork, when QEMU has translated all its code already.
The stack is the one the tests deploy (``tests/vm/stack``: two services, a secret, a versioned
config, an overlay network, a healthcheck, a port on the ingress mesh). ``--quick`` runs a
``docker run`` instead of the stack and skips the cold boot: the quick test runs it that way.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vm_bench import (  # bench/ is on sys.path: the benchmarks run as scripts
    first_output_time,
    measured_by,
    table,
    write_results,
)

from ccci.config import Settings
from ccci.pipeline.executor import ExecRequest
from ccci.pipeline.output import parse_metric
from ccci.vm.extras import ABRA_IN_GUEST, ImageExtras
from ccci.vm.image import build_image
from ccci.vm.instance import Layout, Vm
from ccci.vm.qemu import QemuExecutor, QemuMachine
from ccci.vm.snapshot import logs_dir, overlay

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "tests" / "vm" / "stack"
TB_CAPPED = Settings.VM_TB_SIZE_MB
TB_QEMU_DEFAULT = 1024
TB_COMPARED = (64, 128, 256, TB_QEMU_DEFAULT)  # translation buffer sizes the full run compares
MIB = 1024


def memory(pid: int) -> dict[str, int]:
    """Return Rss, Pss, Private, Private_Dirty and Anonymous (KiB) of one process.

    Anonymous is what a fork alone costs the host: the guest pages it has written (its copies of
    the base's), QEMU's heap and TCG's translation buffer, all freed when it exits. Private counts
    besides the base RAM pages the fork has only read while no other process maps them: those are
    the base file's page cache, shared as soon as a second fork reads them and kept after the fork
    ends, so they cost nothing per fork (two forks at once show it: their Private drops).
    """
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous"):
            fields[key] = int(value.split()[0])
    fields["Private"] = fields.pop("Private_Clean", 0) + fields["Private_Dirty"]
    return fields


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) QEMU ``pid`` has used: less noisy than wall time on a shared host."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(machine: QemuMachine, command: str, env: dict[str, str] | None = None) -> str:
    """Run ``command`` in the fork, fail loudly if it fails, return its output."""
    out: list[bytes] = []
    result = machine.exec(ExecRequest(command, env=env or {}, timeout=1800, on_output=lambda _s, c: out.append(c)))
    text = b"".join(out).decode(errors="replace")
    if result.exit_code != 0:
        raise RuntimeError(f"{command!r} exited {result.exit_code}:\n{text[-3000:]}")
    return text


def workload(machine: QemuMachine, quick: bool, marker: str, compose: str = "compose.yml") -> dict[str, float]:
    """Deploy the stack until it answers through the mesh (or, quick: run one container).

    Returns the deploy's phases, seconds from its start: ``deploy_cli_s`` (the secret and `docker
    stack deploy`), ``healthy_s``, ``http_s`` (answering through the mesh); none when quick.
    """
    if quick:
        run(machine, "docker run --rm ccci/busybox:latest true")
        return {}
    out = run(machine, "./deploy.sh", env={"MARKER": marker, "COMPOSE": compose, "STACK": marker})
    assert f"<h1>{marker}</h1>" in out, out
    return {key: float(value) for key, value in filter(None, map(parse_metric, out.encode().splitlines()))}


def fork_to_ready(
    executor: QemuExecutor, workspace: Path, quick: bool, marker: str, compose: str = "compose.yml"
) -> tuple[float, dict]:
    """Fork the warm base, run the workload; return the seconds from spawn and the QEMU's memory (and CPU)."""
    started = time.monotonic()
    with executor.boot(workspace) as machine:
        phases = workload(machine, quick, marker, compose)
        took = time.monotonic() - started
        assert machine.pid is not None
        return took, {**memory(machine.pid), "cpu_s": round(cpu_seconds(machine.pid), 1), **phases}


def deploy_twice(executor: QemuExecutor, workspace: Path) -> tuple[dict[str, float], dict[str, float]]:
    """In one fork: deploy, remove, deploy again; return both deploys' phases.

    QEMU translates guest code once per process; if the fork's time were that translation, the
    second deploy would be much quicker than the first.
    """
    with executor.boot(workspace) as machine:
        first = workload(machine, False, "first")
        run(machine, "./undeploy.sh", env={"STACK": "first"})
        return first, workload(machine, False, "again")


def cold_to_ready(executor: QemuExecutor, workspace: Path, scratch: Path, quick: bool) -> tuple[float, float]:
    """Boot the image from nothing, start dockerd and the swarm, run the workload; return wall and CPU seconds."""
    layout: Layout = executor.warm_base().layout
    disk, mem = scratch / "cold.qcow2", scratch / "cold.mem"
    overlay(layout.image.disk, disk)
    logs_dir(executor.state_dir).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    vm = Vm("bench-cold", layout.argv(mem, shared=False, disk=disk, incoming=False),
            logs_dir(executor.state_dir) / "bench-cold.log")  # fmt: skip
    try:
        vm.qmp.handshake()
        vm.agent.wait_ready(300)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        # Only what the work needs: dockerd, the swarm, `proxy`, the image; not the base's warm-ups.
        assert vm.agent.run(f"{layout.image.prepare} essentials", "/", env, timeout=1800).status == 0, "warm-up failed"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(workspace, arcname=".")
        assert vm.agent.run("mkdir -p /stack && tar -xf - -C /stack", "/", env, stdin=buf.getvalue()).status == 0
        command = "docker run --rm ccci/busybox:latest true" if quick else "/stack/deploy.sh"
        out: list[bytes] = []
        outcome = vm.agent.run(command, "/stack", {**env, "MARKER": "cold"}, timeout=1800,
                               on_output=lambda _s, c: out.append(c))  # fmt: skip
        assert outcome.status == 0, b"".join(out)[-3000:]
        return time.monotonic() - started, cpu_seconds(vm.pid)
    finally:
        vm.kill()


def first_command(executor: QemuExecutor, count: int) -> list[float]:
    """Fork ``count`` times; return seconds from spawn to the first command's output."""
    return [_first_command(executor) for _ in range(count)]


def _first_command(executor: QemuExecutor) -> float:
    started = time.monotonic()
    with executor.fork_from(executor.warm_base(), None) as machine:
        seen: list[float] = []
        machine.exec(ExecRequest("echo hi", on_output=first_output_time(seen)))
        return seen[0] - started


def concurrent(executor: QemuExecutor, workspace: Path, quick: bool) -> tuple[float, list[tuple[float, dict]]]:
    """Two forks run the workload at once; return the wall time and each one's (seconds, memory)."""
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        each = list(pool.map(lambda i: fork_to_ready(executor, workspace, quick, f"pair-{i}"), range(2)))
    return time.monotonic() - started, each


def main() -> int:
    """Run the benchmark and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path.home() / ".cache" / "ccci-test-vm")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "docker.md")
    parser.add_argument("--quick", action="store_true", help="a container run instead of the stack; no cold boot")
    parser.add_argument("--abra", type=Path, help="abra to put into the image (as ABRA_BIN; the tests' image has one)")
    args = parser.parse_args()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    build_image("tiny", args.state_dir, progress=say)
    extras = ImageExtras(files=((ABRA_IN_GUEST, args.abra),)) if args.abra else ImageExtras()
    info = build_image("docker", args.state_dir, progress=say, extras=extras)
    sizes = sorted({TB_CAPPED, TB_QEMU_DEFAULT} | (set() if args.quick else set(TB_COMPARED)))
    executors = {tb: QemuExecutor(args.state_dir, image="docker", tb_size_mb=tb, slots=1, log=say) for tb in sizes}
    capped = executors[TB_CAPPED]
    base_started = time.monotonic()
    base = capped.warm_base()
    base_s = None if base.cached else time.monotonic() - base_started
    say(f"accel: {capped.accel.name} ({capped.accel.reason})")
    what = "`docker run --rm` of the busybox image" if args.quick else "the test stack healthy and answering HTTP"

    with tempfile.TemporaryDirectory(prefix="ccci-docker-bench-") as tmp:
        scratch = Path(tmp)
        workspace = scratch / "stack"
        shutil.copytree(STACK, workspace)
        firsts = first_command(capped, 3)
        say(f"fork → first command: {[round(f, 2) for f in firsts]}")
        by_tb: dict[int, tuple[float, dict]] = {}
        for tb in sizes:
            by_tb[tb] = fork_to_ready(executors[tb], workspace, args.quick, f"tb{tb}")
            say(f"fork (tb-size {tb}) → {what}: {by_tb[tb][0]:.1f}s, memory {by_tb[tb][1]}")
        fork_s, fork_mem = by_tb[TB_CAPPED]
        wide_s, wide_mem = by_tb[TB_QEMU_DEFAULT]
        one = None if args.quick else fork_to_ready(capped, workspace, False, "one", "compose.one.yml")
        if one is not None:
            say(f"fork → one-service stack ready: {one[0]:.1f}s, memory {one[1]}")
        pair_wall, pair = concurrent(capped, workspace, args.quick)
        say(f"two forks at once: wall {pair_wall:.1f}s, each {[round(s, 1) for s, _ in pair]}")
        twice = None if args.quick else deploy_twice(capped, workspace)
        if twice is not None:
            say(f"one fork, the deploy's phases the first time {twice[0]}, the second {twice[1]}")
        cold_s, cold_cpu = (None, None) if args.quick else cold_to_ready(capped, workspace, scratch, args.quick)
        if cold_s is not None:
            say(f"cold boot → {what}: {cold_s:.1f}s, QEMU CPU {cold_cpu:.1f}s")

    def mib(kib: int) -> str:
        return f"{kib / MIB:.0f} MiB"

    fork_own = fork_mem["Anonymous"]
    pair_own = statistics.median(m["Anonymous"] for _, m in pair)
    pair_private = statistics.median(m["Private"] for _, m in pair)
    rows = [
        ("Fork → first command (median of 3)", f"{statistics.median(firsts) * 1000:.0f} ms", ""),
        (f"Fork of the warm base → {what}", f"{fork_s:.1f} s",
         f"{fork_s / cold_s:.2f} of cold (target < 0.33): {'met' if fork_s < cold_s / 3 else 'MISSED'}"
         if cold_s else "cold boot skipped (--quick)"),
        (f"Cold boot → dockerd → swarm → {what}", f"{cold_s:.1f} s" if cold_s else "skipped", ""),
        ("The same two, in QEMU CPU seconds (less noisy on a shared host)",
         f"fork {fork_mem['cpu_s']:.0f} s, cold {cold_cpu:.0f} s" if cold_cpu else f"fork {fork_mem['cpu_s']:.0f} s",
         f"{fork_mem['cpu_s'] / cold_cpu:.2f} of cold" if cold_cpu else ""),
        (f"Memory only that fork holds (anonymous), tb-size {TB_CAPPED}", mib(fork_own),
         f"private {mib(fork_mem['Private'])} with the base pages it alone maps now, PSS {mib(fork_mem['Pss'])}"),
        *([] if one is None else [
            (f"One-service stack (compose.one.yml), tb-size {TB_CAPPED}: fork → ready, memory only it holds",
             f"{one[0]:.1f} s, {mib(one[1]['Anonymous'])}",
             f"target < 512 MiB: {'met' if one[1]['Anonymous'] < 512 * MIB else 'MISSED'}; "
             f"private {mib(one[1]['Private'])}, QEMU CPU {one[1]['cpu_s']:.0f} s")]),
        *[(f"Same fork with tb-size {tb}" + (" (QEMU's default)" if tb == TB_QEMU_DEFAULT else ""),
           mib(m["Anonymous"]), f"{s:.1f} s to ready ({s / fork_s:.2f} of the configured {TB_CAPPED}); "
           f"private {mib(m['Private'])}") for tb, (s, m) in by_tb.items() if tb != TB_CAPPED],
        ("Configured cap against QEMU's default buffer", f"{fork_own / wide_mem['Anonymous']:.2f} × memory",
         f"{fork_s / wide_s:.2f} × time"),
        *([] if twice is None else [
            ("Where that fork's time goes: the deploy's phases, from its start",
             f"stack deploy {fork_mem['deploy_cli_s']:.1f} s, healthy {fork_mem['healthy_s']:.1f} s, "
             f"answering {fork_mem['http_s']:.1f} s", "the rest is QEMU's spawn and the restore"),
            ("The same deploy a second time in one fork (QEMU's translations warm)",
             f"{twice[1]['http_s']:.1f} s", f"{twice[1]['http_s'] / twice[0]['http_s']:.2f} of the first "
             f"({twice[0]['http_s']:.1f} s): the time is the deploy's own work under emulation")]),
        ("Two forks at once → both ready (wall)", f"{pair_wall:.1f} s",
         f"{pair_wall / fork_s:.2f} × one fork alone; each {', '.join(f'{s:.1f}' for s, _ in pair)} s; "
         f"memory each holds alone: median {mib(pair_own)}, private {mib(pair_private)}"),
    ]  # fmt: skip
    lines = [
        "# Docker fork benchmark" + (" (quick)" if args.quick else ""),
        "",
        measured_by("docker_bench.py", args.quick, capped.accel),
        f"Guest: image `docker` {info.hash[:12]} ({info.kernel_package}), {base.layout.memory_mb} MiB RAM, 1 vCPU;"
        + (f" its warm base was booted and readied in {base_s:.0f} s for this run." if base_s else " base cached."),
        "",
        *table(rows),
        "",
        f"Raw: first commands {', '.join(f'{f:.2f}' for f in firsts)} s; memory (KiB) by tb-size "
        f"{ {tb: m for tb, (_, m) in by_tb.items()} }, pair {[m for _, m in pair]}"
        + (f", one-service {one[1]}." if one else "."),
        "",
        "A fork restores the warm base (dockerd running, swarm active, `proxy` network, the busybox",
        "image, a container and a mesh service already run once) and runs the workload; the cold path",
        "boots the image with no snapshot, runs what the work needs of the base's script (`warm-base",
        "essentials`: dockerd, `swarm init`, `proxy`, the image import), then the same workload. Times",
        "run from QEMU's spawn; CPU is the QEMU process's user + system time. The memory a fork alone",
        "holds is its anonymous memory: the guest pages it wrote (copies of the base's), QEMU's heap and",
        "TCG's translation buffer, all freed when it ends. Private memory adds the base RAM pages it has",
        "only read while no other process maps them: the base file's page cache, shared by the next",
        "fork that reads them and kept after this one ends (two forks at once: their Private drops).",
        "",
    ]
    return write_results(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
