"""Process settings every rec actor shares (deployments/runtime.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from deployments.runtime import (
    INGRESS_MAX_ONGOING,
    MAX_QUEUED,
    BackgroundStarts,
    Startup,
    lower_own_priority,
)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_lower_own_priority_is_per_thread_and_inherited() -> None:
    """The thread that calls it, and the threads that one starts, run at nice 19 in SCHED_IDLE;
    the rest of the process (a replica's serving threads) keeps its priority."""
    seen: dict[str, tuple[int, int]] = {}

    def state() -> tuple[int, int]:
        return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def child() -> None:
        seen["child"] = state()

    def trainer() -> None:
        lower_own_priority()
        seen["trainer"] = state()
        t = threading.Thread(target=child)
        t.start()
        t.join()

    before = state()
    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    assert seen["trainer"] == (os.SCHED_IDLE, 19)
    assert seen["child"] == (os.SCHED_IDLE, 19)
    assert state() == before


def test_closed_loop_clients_that_fit_are_admitted() -> None:
    """32 closed-loop clients on 2 fused replicas fit in the running plus queued slots, so the
    load test's recommend@32 gets no 503; beyond that the replicas shed load."""
    assert 2 * (INGRESS_MAX_ONGOING["fused"] + MAX_QUEUED) >= 32
    assert INGRESS_MAX_ONGOING["split"] >= INGRESS_MAX_ONGOING["fused"]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_processes_started_during_a_retrain_run_at_the_lowest_priority() -> None:
    """What the Trainer wraps a Train job in: children of the given parent (there the raylet,
    here this test) that appear meanwhile are demoted, every thread; earlier ones are not."""
    code = (
        "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); "
        "time.sleep(30)"
    )
    before = subprocess.Popen([sys.executable, "-c", code])
    try:
        with BackgroundStarts(os.getpid(), interval_s=0.01) as guard:
            during = subprocess.Popen([sys.executable, "-c", code])
            try:
                deadline = time.monotonic() + 10
                while during.pid not in guard.demoted and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)  # the thread it starts after its imports
                tids = [int(t) for t in os.listdir(f"/proc/{during.pid}/task")]
                assert len(tids) >= 2
                for tid in tids:
                    assert os.sched_getscheduler(tid) == os.SCHED_IDLE
                    assert os.getpriority(os.PRIO_PROCESS, tid) == 19
            finally:
                during.kill()
        assert before.pid not in guard.demoted
        assert os.sched_getscheduler(before.pid) != os.SCHED_IDLE
    finally:
        before.kill()


def test_a_cancelled_request_does_not_cancel_the_start_up() -> None:
    """Serve cancels a request whose client disconnects; one waiting for the replica's start-up
    must not take the start-up down with it: later requests find it finished."""

    async def scenario() -> tuple[bool, str]:
        release = asyncio.Event()

        async def start() -> str:
            await release.wait()
            return "loaded"

        startup = Startup(start())
        impatient = asyncio.get_running_loop().create_task(startup.wait())
        await asyncio.sleep(0)
        impatient.cancel()  # the client of the first request went away
        with pytest.raises(asyncio.CancelledError):
            await impatient
        release.set()
        await asyncio.wait_for(startup.wait(), 1)  # a later request
        return startup.done(), startup.task.result()

    assert asyncio.run(scenario()) == (True, "loaded")


def test_start_up_failure_reaches_every_request() -> None:
    async def scenario() -> None:
        async def start() -> None:
            raise RuntimeError("no log")

        startup = Startup(start())
        for _ in range(2):
            with pytest.raises(RuntimeError, match="no log"):
                await startup.wait()

    asyncio.run(scenario())
