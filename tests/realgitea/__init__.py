"""A real Gitea for ccci's tests: built from its pinned Go module, run headless on loopback.

``build``    the pinned release, downloaded from the Go module proxy and built into a cache
``instance`` one running Gitea per directory: start (users, tokens, JSON line), stop
``appini``   the app.ini it runs with
``cli``      ``scripts/gitea build | start DIR | stop DIR`` on the two above

These three use the standard library only, so ``scripts/gitea`` runs without the virtualenv.
``forge`` (what tests do to the instance: orgs, repos, pushes, PRs, hooks), ``proxy`` (counting
and holding requests on their way) and ``fixture`` (one instance per pytest session) are test
helpers on top, and use ``requests``.
"""
