"""Docker slots: a host-wide cap across processes, visible waiting, freed when a holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ccci.errors import PermanentInfraError
from ccci.vm.slots import acquire_slot, slot_count

REPO = Path(__file__).resolve().parents[2]
HOLDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from ccci.vm.slots import acquire_slot
    acquire_slot(Path(sys.argv[2]), 1)
    print("held", flush=True)
    sys.stdin.read()
    """
)


def test_default_is_one_slot_per_core():
    assert slot_count(0) == os.cpu_count()
    assert slot_count(3) == 3


def test_slots_of_one_process_are_distinct_and_come_back_when_released(tmp_path):
    first = acquire_slot(tmp_path, 2)
    second = acquire_slot(tmp_path, 2)
    with pytest.raises(PermanentInfraError, match="stopped while it waited"):
        acquire_slot(tmp_path, 2, interrupted=lambda: True)
    second()
    acquire_slot(tmp_path, 2)()
    first()


def test_a_run_waits_visibly_for_another_process_and_gets_the_slot_when_that_one_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO), str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        said: list[str] = []
        waiting = threading.Event()
        got: list = []

        def on_wait(text: str) -> None:
            said.append(text)
            waiting.set()

        taker = threading.Thread(target=lambda: got.append(acquire_slot(tmp_path, 1, on_wait=on_wait)))
        taker.start()
        assert waiting.wait(30), "no waiting message while the slot was held"
        assert said[0] == f"waiting for a Docker slot: all 1 are in use (pid {holder.pid}; DOCKER_SLOTS=1)"
        assert not got
        os.kill(holder.pid, signal.SIGKILL)  # no release: the kernel frees a dead process's flock
        taker.join(30)
        assert got and said[-1].startswith("got a Docker slot after ")
        got[0]()
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
