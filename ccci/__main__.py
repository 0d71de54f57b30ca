"""The command line: ``python -m ccci <command>``; ``python -m ccci --help`` lists them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import load_settings
from .errors import CcciError, ConfigError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = load_settings()
        return args.handler(settings, args)
    except ConfigError as exc:
        print(f"ccci: configuration error: {exc}", file=sys.stderr)
        return 2
    except CcciError as exc:
        print(f"ccci: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ccci", description="Comment-triggered CI for Co-op Cloud recipes.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("serve", help="run the web app (gunicorn) and the local worker together")
    p.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT to listen on (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default %(default)s)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("worker", help="run the local worker alone (admit, dispatch, report)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("run", help="the harness: execute one run (used by the worker and by Drone)")
    p.add_argument("--run-id", default=os.environ.get("CCCI_RUN"), help="run id (env CCCI_RUN)")
    p.add_argument("--recipe", default=os.environ.get("CCCI_RECIPE"), help="recipe name (env CCCI_RECIPE)")
    p.add_argument("--clone-url", default=os.environ.get("CCCI_CLONE_URL"), help="recipe repository URL")
    p.add_argument("--pr", type=int, default=os.environ.get("CCCI_PR"), help="pull request number")
    p.add_argument("--sha", default=os.environ.get("CCCI_SHA"), help="the commit to test (40 hex)")
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

    p = sub.add_parser("sweep", help="reap leaked VM forks, app locks and sandboxes of dead owners")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("image", help="guest images for the QEMU executor")
    image_sub = p.add_subparsers(dest="image_command", metavar="<image-command>", required=True)
    b = image_sub.add_parser("build", help="build (or find in the cache) a guest image")
    b.add_argument("name", help="image name, e.g. tiny")
    b.set_defaults(handler=cmd_image_build)
    return parser


def cmd_serve(settings, args) -> int:
    """Serve the web app with gunicorn and run the worker beside it."""
    from .web.server import serve

    return serve(settings, bind=args.bind, workers=args.workers)


def cmd_worker(settings, args) -> int:
    """Run the worker until SIGTERM or SIGINT."""
    from .forge import GiteaClient
    from .worker import Worker

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = Worker(settings, GiteaClient(settings.FORGE_URL, settings.FORGE_TOKEN))
    worker.serve(stop)
    return 0


def cmd_run(settings, args) -> int:
    """Execute one run through the harness; exit 0 iff it passed (142 timed out, 143 canceled)."""
    from .harness.run import RunRequest, execute

    missing = [n for n in ("run_id", "recipe", "clone_url", "pr", "sha") if getattr(args, n) in (None, "")]
    if missing:
        raise CcciError(f"run: missing {', '.join('--' + m.replace('_', '-') for m in missing)}")
    request = RunRequest.checked(
        run_id=args.run_id, recipe=args.recipe, clone_url=args.clone_url, pr=args.pr, sha=args.sha
    )
    _report, code = execute(settings, request, echo=sys.stdout)
    return code


def cmd_test(settings, args) -> int:
    """Run a recipe's CI on a local checkout and print the report."""
    from .harness.run import RunRequest, execute
    from .pipeline.progress import TerminalProgress

    recipe_arg = Path(args.recipe)
    if recipe_arg.is_dir() and (recipe_arg / "ci.yml").is_file():
        ci_file, recipe = recipe_arg / "ci.yml", recipe_arg.resolve().name
    else:
        ci_file, recipe = None, args.recipe
    source = Path(args.source).resolve()
    if not source.is_dir():
        raise CcciError(f"test: --source {source} is not a directory")
    request = RunRequest.checked(run_id=f"local-{os.getpid()}", recipe=recipe, source=source, ci_file=ci_file)
    printer = TerminalProgress(sys.stderr)
    report, code = execute(settings, request, on_event=printer)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .pipeline.report import Report

        printer.summary(Report.from_dict(report))
    return code


def cmd_runs(settings, args) -> int:
    """List recent runs."""
    from .store import Store

    runs = Store(settings.db_path).list_runs(states=tuple(args.state) if args.state else None, limit=args.limit)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2))
        return 0
    print(f"{'RUN':>5}  {'STATE':<10} {'RECIPE':<20} {'PR':<28} {'SHA':<10} REQUESTER")
    for r in runs:
        pr = f"{r.full_name}#{r.pr}"
        print(f"{r.id:>5}  {r.state:<10} {r.recipe:<20} {pr:<28} {(r.sha or '-')[:10]:<10} {r.requester}")
    return 0


def cmd_cancel(settings, args) -> int:
    """Ask the worker to cancel a run."""
    from .doorbell import Doorbell
    from .store import ACTIVE_STATES, Store

    store = Store(settings.db_path)
    run = store.get_run(args.run_id)
    if run is None or run.state == "refused":
        raise CcciError(f"cancel: no run {args.run_id}")
    by = f"{os.environ.get('USER', 'an operator')} (command line)"
    if not store.update_run(run.id, only_if_state=ACTIVE_STATES, cancel_requested=1, canceled_by=by):
        raise CcciError(f"cancel: run {run.id} already finished ({run.state})")
    Doorbell(settings.STATE_DIR / "worker.sock").ring()
    print(f"run {run.id}: cancel requested")
    return 0


def cmd_sweep(settings, args) -> int:
    """Reap what dead runs left behind."""
    from .harness.run import make_janitor

    report = make_janitor(settings).thorough()
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_image_build(settings, args) -> int:
    """Build a guest image into the cache."""
    from .vm.extras import ImageExtras
    from .vm.image import build_image

    extras = ImageExtras.from_settings(settings)  # IMAGE_FILES, IMAGE_PACKAGES (the docker image)
    info = build_image(args.name, settings.STATE_DIR, progress=lambda msg: print(msg, file=sys.stderr), extras=extras)
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
