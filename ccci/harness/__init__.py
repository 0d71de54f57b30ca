"""Harness: one run end to end — the request, the lifetime guard, its ABRA_DIR, the app lock, the run's files.

``run.execute`` composes them, each entered in this order and left in reverse on every path:
``install_guard`` (first: the stop switch every later wait watches) ▸ the start gate ▸
``RunAbraDir`` ▸ recipe checkout ▸ ``acquire_app_lock`` ▸ executor ▸ pipeline; then
``verdict_of`` decides the report, and the guard is uninstalled. ``request.RunRequest`` is what
the run tests; ``runfiles`` and ``wire`` are what it leaves behind and says on the way.
"""
