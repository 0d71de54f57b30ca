"""``scripts/gitea``: build the pinned Gitea, start one headless instance in a directory, stop it.

    scripts/gitea build        build (or find in the cache) the pinned Gitea; print the binary's path
    scripts/gitea start DIR    start a Gitea with its data under DIR; print one JSON line:
                               {"url", "admin_user", "admin_token", "bot_user", "bot_token"}
    scripts/gitea stop DIR     end it, wait for it, remove its files from DIR

Progress goes to stderr; stdout carries only the result, so ``$(scripts/gitea start DIR)`` works.
"""

from __future__ import annotations

import argparse
import sys

from . import build, instance


def main(argv: list[str] | None = None) -> int:
    """Run one verb of scripts/gitea; return its exit code."""
    parser = argparse.ArgumentParser(
        prog="scripts/gitea", description="A real, pinned Gitea for ccci's tests, built from its Go module."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{build,start,stop}")
    verbs.add_parser("build", help=f"build Gitea {build.VERSION} into the cache (a cache hit when it is there)")
    for verb, what in (("start", "start a Gitea with its data under DIR"), ("stop", "stop it and remove its files")):
        verbs.add_parser(verb, help=what).add_argument("dir", metavar="DIR")
    args = parser.parse_args(argv)
    try:
        if args.verb == "build":
            print(build.ensure_built().binary)
        elif args.verb == "start":
            started = instance.start(args.dir, build.ensure_built())
            build.to_stderr(f"serving at {started.url} (pid {started.pid}); stop it with scripts/gitea stop {args.dir}")
            print(started.json_line(), flush=True)
        else:
            stopped = instance.stop(args.dir)
            build.to_stderr(f"stopped the Gitea of {args.dir}" if stopped else f"no Gitea was running from {args.dir}")
    except (build.GiteaBuildError, instance.GiteaInstanceError) as exc:
        print(f"scripts/gitea {args.verb}: {exc}", file=sys.stderr)
        return 1
    return 0
