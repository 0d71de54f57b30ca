"""The command line: ``ccci <command>`` (or ``python -m ccci <command>``); ``ccci --help`` lists them."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__, logs
from .config import load_settings
from .errors import CcciError, ConfigError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logs.setup()  # before the settings load, so that what loading says is in the same format
    try:
        settings = load_settings()
        logs.setup(settings.LOG_LEVEL, settings.LOG_FORMAT)
        return args.handler(settings, args)
    except ConfigError as exc:
        print(f"ccci: configuration error: {exc}", file=sys.stderr)
        return 2
    except CcciError as exc:
        print(f"ccci: {exc}", file=sys.stderr)
        return 1


def _prog() -> str:
    """Return how ccci was called, for usage lines: ``ccci`` as a command, ``python -m ccci`` as a module."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m ccci" if name in ("", "__main__.py", "-c") else name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description="Comment-triggered CI for Co-op Cloud recipes.")
    parser.add_argument("--version", action="version", version=f"ccci {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("serve", help="run the web app (gunicorn) and the local worker together")
    p.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT to listen on (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default %(default)s)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("worker", help="run the local worker alone (admit, dispatch, report)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("run", help="the harness: execute one run (used by the worker and by Drone)")
    # Each defaults to Drone's build parameter of the same meaning (harness/request.py).
    p.add_argument("--run-id", help="run id (env CCCI_RUN)")
    p.add_argument("--recipe", help="recipe name (env CCCI_RECIPE)")
    p.add_argument("--clone-url", help="recipe repository URL (env CCCI_CLONE_URL)")
    p.add_argument("--pr", help="pull request number (env CCCI_PR)")
    p.add_argument("--sha", help="the commit to test, 40 or 64 hex (env CCCI_SHA)")
    p.add_argument("--private", action="store_true", help="the repository is private: clone with the forge token")
    p.add_argument("--parent-pid", type=int, help="the process that started the run; it ends when that one dies")
    p.add_argument("--gate", action="store_true", help="wait for 'start' on stdin before touching anything")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("test", help="run one recipe's CI here and now, without a forge")
    p.add_argument("recipe", help="a recipe name under RECIPES_DIR, or a directory holding a ci.yml")
    p.add_argument("--source", default=".", help="the recipe checkout to test (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(handler=cmd_test)

    p = sub.add_parser("runs", help="list recent runs")
    p.add_argument("--state", action="append", help="only runs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("cancel", help="cancel a queued or running run")
    p.add_argument("run_id", type=int)
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser("sweep", help="reap leaked VM forks, app locks and run ABRA_DIRs of dead owners")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("image", help="guest images for the QEMU executor")
    image_sub = p.add_subparsers(dest="image_command", metavar="<image-command>", required=True)
    b = image_sub.add_parser("build", help="build (or find in the cache) a guest image")
    b.add_argument("name", help="image name, e.g. tiny")
    b.add_argument("--json", action="store_true", help="print the built image as JSON")
    b.set_defaults(handler=cmd_image_build)
    return parser


def cmd_serve(settings, args) -> int:
    """Serve the web app with gunicorn and run the worker beside it."""
    from .web.server import serve

    return serve(settings, bind=args.bind, workers=args.workers)


def cmd_worker(settings, args) -> int:
    """Run the worker until SIGTERM or SIGINT."""
    from .forge import GiteaClient
    from .store import Store
    from .worker import Worker

    stop = threading.Event()
    store = Store(settings.db_path)
    # Failed forge requests are counted by kind, for /metrics.
    forge = GiteaClient(
        settings.FORGE_URL, settings.FORGE_TOKEN, on_error=lambda kind: store.count("forge_errors", kind)
    )
    worker = Worker(settings, forge, store=store)

    def on_signal(*_: object) -> None:
        stop.set()
        worker.doorbell.ring()  # wake its wait now, not at the end of it

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    worker.serve(stop)
    return 0


def cmd_run(settings, args) -> int:
    """Execute one run through the harness; exit 0 iff it passed (142 timed out, 143 canceled)."""
    from .harness.request import RunRequest
    from .harness.run import execute

    request = RunRequest.from_args(args, os.environ)
    _report, code = execute(settings, request, echo=sys.stdout)
    return code


def cmd_test(settings, args) -> int:
    """Run a recipe's CI on a local checkout and print the report."""
    from .harness.request import RunRequest
    from .harness.run import execute
    from .harness.runfiles import RunFiles
    from .pipeline.progress import TerminalProgress

    recipe_arg = Path(args.recipe)
    if recipe_arg.is_dir() and (recipe_arg / "ci.yml").is_file():
        ci_file, recipe = recipe_arg / "ci.yml", recipe_arg.resolve().name
    else:
        ci_file, recipe = None, args.recipe
    source = Path(args.source).resolve()
    if not source.is_dir():
        raise CcciError(f"test: --source {source} is not a directory")
    if source in (Path("/"), Path.home().resolve()):
        # The checkout is copied: copying / or a whole home directory is never what was meant.
        raise CcciError(
            f"test: refusing to copy {source} as the recipe checkout; run it in the checkout or pass --source DIR"
        )
    request = RunRequest(run_id=f"local-{os.getpid()}", recipe=recipe, source=source, ci_file=ci_file)
    printer = TerminalProgress(sys.stderr)
    report, code = execute(settings, request, on_event=printer)
    assert report is not None  # only a gated harness ends without one
    files = RunFiles(settings.runs_dir, request.run_id)
    printer.summary(report, log=files.log, report_file=files.report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return code


def cmd_runs(settings, args) -> int:
    """List recent runs."""
    from .store import Store

    if not settings.db_path.exists():
        # Say where we looked instead of creating an empty database there.
        print(f"no runs yet: there is no database at {settings.db_path} (STATE_DIR)", file=sys.stderr)
        if args.json:
            print("[]")
        return 0
    runs = Store(settings.db_path).list_runs(states=tuple(args.state) if args.state else None, limit=args.limit)
    if args.json:
        from .web.admin import summary  # the same shape as GET /admin/runs

        print(json.dumps([summary(r) for r in runs], indent=2))
        return 0
    print(f"{'RUN':>5}  {'STATE':<10} {'RECIPE':<20} {'PR':<28} {'SHA':<10} REQUESTER")
    for r in runs:
        pr = f"{r.full_name}#{r.pr}"
        print(f"{r.id:>5}  {r.state:<10} {r.recipe:<20} {pr:<28} {(r.sha or '-')[:10]:<10} {r.requester}")
    return 0


def cmd_cancel(settings, args) -> int:
    """Ask the worker to cancel a run."""
    from .doorbell import Doorbell
    from .store import Store

    if not settings.db_path.exists():
        raise CcciError(f"cancel: no run {args.run_id}: there is no database at {settings.db_path} (STATE_DIR)")
    store = Store(settings.db_path)
    run = store.get_run(args.run_id)
    if run is None or run.state == "refused":
        raise CcciError(f"cancel: no run {args.run_id}")
    by = f"{os.environ.get('USER', 'an operator')} (command line)"
    if not store.request_cancel(run.id, by):
        raise CcciError(f"cancel: run {run.id} already finished ({run.state})")
    Doorbell(settings.STATE_DIR / "worker.sock").ring()
    print(f"run {run.id}: cancel requested")
    return 0


def cmd_sweep(settings, args) -> int:
    """Reap what dead runs left behind; exit 1 if some of it could not be freed."""
    from .harness.run import make_janitor

    report = make_janitor(settings).thorough()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 1 if report.errors else 0
    print(f"sweep: {report.summary()}")
    for holder in report.reaped_apps:
        print(f"  reaped {holder.app_domain} of dead run {holder.run_id}")
    for path in report.removed_abra_dirs:
        print(f"  removed the ABRA_DIR {path}")
    for name, items in report.swept.items():
        for item in items:
            print(f"  removed {name}: {item}")
    for info in report.flagged:
        who = f"run {info.holder.run_id}" if info.holder else "an unknown run"
        print(f"  possible leak, left alone: {info.app_domain} held by {who}: {info.reason}")
    for error in report.errors:
        print(f"  error: {error}")
    return 1 if report.errors else 0


def cmd_image_build(settings, args) -> int:
    """Build a guest image into the cache."""
    from .vm.extras import ImageExtras, require_abra
    from .vm.image import build_image

    extras = ImageExtras.from_settings(settings)  # ABRA_BIN, IMAGE_FILES, IMAGE_PACKAGES (the docker image)
    if args.name == "docker":
        require_abra(extras, settings.RECIPES_DIR)  # before minutes of building an image no run can use
    info = build_image(args.name, settings.STATE_DIR, progress=lambda msg: print(msg, file=sys.stderr), extras=extras)
    parts = {"kernel": info.kernel, "initramfs": info.initrd, "disk": info.disk}
    if args.json:
        data = {"name": info.name, "hash": info.hash, "dir": str(info.dir), "kernel_package": info.kernel_package,
                "cached": info.cached, **{k: str(v) for k, v in parts.items()}}  # fmt: skip
        print(json.dumps(data, indent=2))
        return 0
    how = "was already built" if info.cached else "built"
    print(f"image {info.name} {how}: {info.hash[:12]} from {info.kernel_package}, in {info.dir}")
    for what, path in parts.items():
        print(f"  {what + ':':<11}{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
