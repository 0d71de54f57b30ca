"""Executors: where steps run. QEMU microVM forks of a warm base, or a process sandbox."""
