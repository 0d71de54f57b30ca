"""Harness: one run end to end — lifetime guard, per-run ABRA_DIR sandbox, per-app locks, janitor.

The run process composes these in this order: ``install_guard`` (first, before anything can
leak) ▸ ``Janitor.quick`` ▸ ``RunSandbox`` ▸ recipe checkout ▸ ``acquire_app_lock`` ▸ pipeline
▸ report ▸ teardown (``begin_teardown``, release the lock, leave the sandbox, ``Janitor.thorough``).
"""
