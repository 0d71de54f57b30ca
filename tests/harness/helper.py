"""Helper processes for the harness suite: each subcommand is one real run-like process.

Every helper prints what it does, one flushed line at a time, so the test waits on its output;
it takes commands as lines on stdin. Logging goes to stdout too, so the guard's warnings are
visible to the test.

    guard [--deadline S] [--parent-pid P] [--marker F] [--wait-go] [--teardown-wait] [--child]
          [--finish-on-line] [--poll]
    spawn-guarded ARGS...          an intermediate parent that starts `guard ARGS...` and waits
    hold-lock DIR DOMAIN RUN [--wait S] [--reap-log F] [--guard]
    janitor DIR [--reap-log F] [--reap-gate] [--runs-dir D]   (Janitor.thorough)
    abradir RUN_DIR ABRA_HOME RECIPE [--guard]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ccci.harness.lifetime import install_guard
from ccci.pipeline.stop import Stopped


def say(*words: object) -> None:
    # One write per line: the guard's relay thread logs to the same stdout at the same time.
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def cmd_guard(args: argparse.Namespace) -> int:
    """A run-like body: it waits on the guard's stop switch, then tears down (the harness' shape)."""
    if args.wait_go:
        say("waiting-go")
        sys.stdin.readline()
    guard = install_guard(args.deadline, parent_pid=args.parent_pid)
    if guard.first is not None:  # the parent was gone before the guard was in place
        Path(args.marker).write_text(f"not started: {guard.first.status}")
        say("interrupted-before-start", guard.first.status, guard.first.reason)
        guard.uninstall()
        return guard.first.exit_code
    child = None
    try:
        if args.child:
            child = subprocess.Popen(["sleep", "600"])
            say("child", child.pid)
        say("ready", os.getpid(), os.getsid(0), os.getpgid(0))
        if args.finish_on_line:
            sys.stdin.readline()  # the body ends normally when the test says so
        elif args.poll:
            # The app-lock wait's and the scheduler's shape at its tightest: the main thread is
            # inside the stop's Event (holding its lock) nearly all the time a signal can land.
            while not guard.wait(0):
                pass
            say("interrupted", guard.first.status)
        else:
            guard.event.wait()  # signals set the switch; nothing is raised into this wait
            say("interrupted", guard.first.status)
    finally:
        guard.shield()
        say("teardown-begins")
        if args.teardown_wait:
            sys.stdin.readline()  # the test sends more signals first, then "finish"
        if child is not None:
            say("child-ended", child.wait())
        status = guard.first.status if guard.first else "finished"
        Path(args.marker).write_text(f"teardown done: {status} {','.join(guard.signals)}")
        say("teardown-done", status)
        guard.uninstall()
    return guard.exit_code(0)


def cmd_spawn_guarded(args: argparse.Namespace) -> int:
    child = subprocess.Popen([sys.executable, __file__, "guard", "--parent-pid", str(os.getpid()), *args.rest])
    say("child", child.pid)
    say("spawned")
    child.wait()
    return 0


def reap_logger(path: str | None, gate: bool):
    def reap(holder) -> None:
        say("reaping", holder.run_id)
        if gate:
            sys.stdin.readline()
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"run": holder.run_id, "by": os.getpid()}) + "\n")

    return reap


def cmd_hold_lock(args: argparse.Namespace) -> int:
    from ccci.harness.applock import AppBusy, LockHolder, acquire_app_lock

    guard = install_guard(3600) if args.guard else None
    holder = LockHolder.for_this_process(run_id=args.run, recipe="demo", app_domain=args.domain)
    try:
        lock = acquire_app_lock(
            Path(args.dir),
            args.domain,
            holder,
            wait=args.wait,
            reap=reap_logger(args.reap_log, False),
            on_wait=lambda holder: say("waiting", holder.run_id if holder else "unknown"),
            stop=guard,
        )
    except AppBusy as exc:
        say("busy", str(exc))
        return 3
    except Stopped as exc:
        say("interrupted", exc.request.status)
        return exc.request.exit_code
    held, path = os.fstat(lock.fd), os.stat(lock.path)
    say("ready", held.st_ino, path.st_ino)
    sys.stdin.readline()
    lock()
    say("released")
    if guard is not None:
        guard.uninstall()
    return 0


def cmd_janitor(args: argparse.Namespace) -> int:
    from ccci.harness.janitor import Janitor

    janitor = Janitor(
        Path(args.runs_dir),
        Path(args.dir),
        leak_after=3600,
        reap_app=reap_logger(args.reap_log, args.reap_gate),
    )
    report = janitor.thorough()
    say("reaped", len(report.reaped_apps))
    say("report", json.dumps(report.to_dict()))
    return 0


def cmd_abradir(args: argparse.Namespace) -> int:
    from ccci.harness.abradir import RunAbraDir

    guard = install_guard(3600) if args.guard else None
    try:
        with RunAbraDir(Path(args.run_dir), Path(args.abra_home), args.recipe) as abra_dir:
            say("ready", abra_dir.abra_dir)
            if guard is not None:
                guard.event.wait()
                guard.check()  # a stop request ends the body: the ABRA_DIR is removed on the way out
            sys.stdin.readline()
    except Stopped as exc:
        say("interrupted", exc.request.status)
        return exc.request.exit_code
    say("left")
    return 0


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="log %(message)s")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("guard")
    p.add_argument("--deadline", type=float, default=3600)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--marker", default=os.devnull)
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--teardown-wait", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--finish-on-line", action="store_true")
    p.add_argument("--poll", action="store_true")
    sub.add_parser("spawn-guarded")  # every further argument goes to the guarded child
    p = sub.add_parser("hold-lock")
    p.add_argument("dir")
    p.add_argument("domain")
    p.add_argument("run")
    p.add_argument("--wait", type=float, default=60)
    p.add_argument("--reap-log")
    p.add_argument("--guard", action="store_true")
    p = sub.add_parser("janitor")
    p.add_argument("dir")
    p.add_argument("--reap-log")
    p.add_argument("--reap-gate", action="store_true")
    p.add_argument("--runs-dir", default="/nonexistent/ccci-runs")
    p = sub.add_parser("abradir")
    p.add_argument("run_dir")
    p.add_argument("abra_home")
    p.add_argument("recipe")
    p.add_argument("--guard", action="store_true")
    args, rest = parser.parse_known_args()
    if args.command == "spawn-guarded":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler = {
        "guard": cmd_guard,
        "spawn-guarded": cmd_spawn_guarded,
        "hold-lock": cmd_hold_lock,
        "janitor": cmd_janitor,
        "abradir": cmd_abradir,
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
