"""Dispatch: where a run's harness executes — a child process here, or a Drone build."""
