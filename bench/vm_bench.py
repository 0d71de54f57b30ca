"""Benchmark the QEMU executor: cold boot vs fork, fan-out, memory per fork, agent round trip.

    .venv/bin/python bench/vm_bench.py [--state-dir DIR] [--out bench/results/vm.md] [--quick]

``--quick`` measures each figure once or twice (a smoke run: tests keep the benchmark runnable
with it); the results file says so, and its ratios are then only indicative.

Every figure comes from this one run on this host, and the ratios are computed from them:
fork-to-first-output against cold-boot-to-first-output (target: at most 1/10), and the private
memory of a fork against the guest's RAM (target: at most 1/8).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ccci.pipeline.executor import ExecRequest
from ccci.vm.host import Accel
from ccci.vm.image import build_image
from ccci.vm.instance import Layout, Vm
from ccci.vm.qemu import QemuExecutor, QemuMachine
from ccci.vm.snapshot import logs_dir


@dataclass(frozen=True)
class Sizes:
    """How many times each figure is measured."""

    cold: int
    forks: int
    fans: tuple[int, ...]
    live: int
    round_trips: int


FULL = Sizes(cold=3, forks=5, fans=(1, 4, 8), live=8, round_trips=50)
QUICK = Sizes(cold=1, forks=2, fans=(1, 2), live=2, round_trips=5)


def first_output_time(seen: list[float]) -> Callable[[str, bytes], None]:
    """Return an on_output callback that notes in ``seen`` when the first output arrived."""

    def on_output(_stream: str, _chunk: bytes) -> None:
        if not seen:
            seen.append(time.monotonic())

    return on_output


def first_output(machine: QemuMachine, started: float) -> float:
    """Run ``echo hi`` and return the seconds from ``started`` to its first output."""
    seen: list[float] = []
    machine.exec(ExecRequest("echo hi", on_output=first_output_time(seen)))
    return seen[0] - started


def cold_boot(executor: QemuExecutor, scratch: Path) -> float:
    """Boot the image from nothing (no snapshot) and return seconds to the first command's output."""
    base = executor.warm_base()
    layout: Layout = base.layout
    mem = scratch / f"cold-{time.monotonic_ns()}.mem"
    logs_dir(executor.state_dir).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    vm = Vm("bench-cold", layout.argv(mem, shared=False, disk=base.disk, incoming=False),
            logs_dir(executor.state_dir) / "bench-cold.log")  # fmt: skip
    try:
        vm.qmp.handshake()
        vm.agent.wait_ready(120)
        seen: list[float] = []
        vm.agent.run("echo hi", "/", {}, on_output=first_output_time(seen))
        return seen[0] - started
    finally:
        vm.kill()
        mem.unlink(missing_ok=True)


def fork_to_output(executor: QemuExecutor) -> float:
    """Fork the warm base and return seconds to the first command's output."""
    started = time.monotonic()
    with executor.fork_from(executor.warm_base(), None) as machine:
        return first_output(machine, started)


def fan_out(executor: QemuExecutor, n: int) -> tuple[float, list[float]]:
    """Fork ``n`` machines at once, each running ``echo hi``; return wall time and per-fork times."""
    started = time.monotonic()
    barrier = threading.Barrier(n)

    def one(_i: int) -> float:
        barrier.wait()
        t0 = time.monotonic()
        with executor.fork_from(executor.warm_base(), None) as machine:
            return first_output(machine, t0)

    with ThreadPoolExecutor(n) as pool:
        each = list(pool.map(one, range(n)))
    return time.monotonic() - started, each


def memory(pid: int) -> dict[str, int]:
    """Return Rss, Pss and Private (KiB) of one process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            fields[key] = int(value.split()[0])
    fields["Private"] = fields.pop("Private_Clean", 0) + fields.pop("Private_Dirty", 0)
    return fields


def fork_memory(executor: QemuExecutor, n: int) -> list[dict[str, int]]:
    """Keep ``n`` forks alive after one command each and measure each QEMU's memory."""
    machines = [executor.fork_from(executor.warm_base(), None) for _ in range(n)]
    try:
        for m in machines:
            m.exec(ExecRequest("echo hi > /tmp/x"))
        return [memory(m.pid) for m in machines if m.pid is not None]
    finally:
        for m in machines:
            m.close()


def round_trips(executor: QemuExecutor, count: int = 50) -> tuple[float, float]:
    """Return the median seconds of ``true`` through exec, and of an agent ping."""
    with executor.fork_from(executor.warm_base(), None) as machine:
        machine.exec(ExecRequest("true"))
        execs, pings = [], []
        for _ in range(count):
            t0 = time.monotonic()
            machine.exec(ExecRequest("true"))
            execs.append(time.monotonic() - t0)
            pings.append(machine.ping())
        return statistics.median(execs), statistics.median(pings)


def main() -> int:
    """Run the benchmark and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path.home() / ".cache" / "ccci-test-vm")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vm.md")
    parser.add_argument("--quick", action="store_true", help="measure each figure once or twice (a smoke run)")
    args = parser.parse_args()
    n = QUICK if args.quick else FULL
    build_image("tiny", args.state_dir, progress=lambda _m: None)
    executor = QemuExecutor(args.state_dir)
    base = executor.warm_base()
    ram_kib = base.layout.memory_mb * 1024
    print(f"accel: {executor.accel.name} ({executor.accel.reason})", flush=True)

    with tempfile.TemporaryDirectory(prefix="ccci-bench-") as scratch:
        cold = [cold_boot(executor, Path(scratch)) for _ in range(n.cold)]
    print(f"cold boot to first output: {[round(c, 3) for c in cold]}", flush=True)
    fork_to_output(executor)  # one unmeasured fork: page cache of the base files
    forks = [fork_to_output(executor) for _ in range(n.forks)]
    print(f"fork to first output: {[round(f, 3) for f in forks]}", flush=True)
    fans = {k: fan_out(executor, k) for k in n.fans}
    for k, (wall, each) in fans.items():
        print(f"{k} concurrent: wall {wall:.3f}s, per fork median {statistics.median(each):.3f}s", flush=True)
    mem = fork_memory(executor, n.live)
    print(f"memory of {n.live} live forks (KiB): {mem}", flush=True)
    rt_exec, rt_ping = round_trips(executor, n.round_trips)
    print(f"round trip: exec true {rt_exec * 1000:.1f} ms, ping {rt_ping * 1000:.2f} ms", flush=True)

    cold_m, fork_m = statistics.median(cold), statistics.median(forks)
    private = statistics.median(m["Private"] for m in mem)
    pss = statistics.median(m["Pss"] for m in mem)
    rows = [
        (f"Cold boot → first output (median of {n.cold})", f"{cold_m * 1000:.0f} ms", ""),
        (f"Fork → first output (median of {n.forks})", f"{fork_m * 1000:.0f} ms",
         f"{fork_m / cold_m:.3f} of cold boot (target ≤ 0.100): {'met' if fork_m <= cold_m / 10 else 'MISSED'}"),
        *[(f"{k} concurrent forks → all answered", f"{wall * 1000:.0f} ms",
           f"per fork median {statistics.median(each) * 1000:.0f} ms") for k, (wall, each) in fans.items()],
        (f"Private memory per fork ({n.live} live, median)", f"{private / 1024:.1f} MiB",
         f"{private / ram_kib:.3f} of {ram_kib // 1024} MiB guest RAM (target ≤ 0.125): "
         f"{'met' if private <= ram_kib / 8 else 'MISSED'}"),
        (f"PSS per fork ({n.live} live, median)", f"{pss / 1024:.1f} MiB", "includes QEMU and TCG code cache"),
        (f"Agent round trip, `true` through exec (median of {n.round_trips})", f"{rt_exec * 1000:.1f} ms",
         "probe's shell agent: 61–85 ms"),
        (f"Agent round trip, ping (median of {n.round_trips})", f"{rt_ping * 1000:.2f} ms", ""),
    ]  # fmt: skip
    lines = [
        "# QEMU executor benchmark",
        "",
        measured_by("vm_bench.py", args.quick, executor.accel)
        + (" A quick smoke run: one or two samples each, ratios only indicative." if args.quick else ""),
        f"Guest: image `tiny` {base.layout.image.hash[:12]}, {base.layout.memory_mb} MiB RAM, 1 vCPU.",
        "",
        *table(rows),
        "",
        "Raw: cold " + ", ".join(f"{c:.3f}" for c in cold) + " s; forks "
        + ", ".join(f"{f:.3f}" for f in forks) + f" s; memory of {n.live} forks (KiB) "
        + "; ".join(f"Rss {m['Rss']} Pss {m['Pss']} Private {m['Private']}" for m in mem) + ".",
        "",
        "Cold boot starts a QEMU on the image with no snapshot and waits for the first output of",
        "`echo hi`; a fork restores the warm base (RAM mapped copy-on-write, device state only,",
        "qcow2 overlay), sets clock, entropy and hostname, then runs the same command. Private",
        "memory counts pages only this QEMU maps (its dirtied guest pages, QEMU's heap, TCG's code",
        "cache); the base's RAM pages the forks share are not in it.",
        "",
    ]  # fmt: skip
    return write_results(args.out, lines)


def measured_by(script: str, quick: bool, accel: Accel) -> str:
    """Return a results file's provenance line: which benchmark, when, on what host, which accelerator."""
    host = f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}"
    return (
        f"Measured by `bench/{script}{' --quick' if quick else ''}` in one run on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({host}); accelerator **{accel.name}** — {accel.reason}."
    )


def table(rows: list[tuple[str, str, str]]) -> list[str]:
    """Return the results table's lines: what was measured, the figure, its ratio or a note."""
    return ["| What | Result | Ratio / note |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows]]


def write_results(out: Path, lines: list[str]) -> int:
    """Write a benchmark's results file (its lines) and say where; the benchmark's exit code."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
