"""Process settings every rec actor and replica shares: one math thread per process (2 cores
are shared by every replica), Serve's throughput-optimised mode with user code on a thread of
its own, no usage stats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

# Admission limits, per ingress replica. A fused ingress computes each request without awaiting
# anything, so requests admitted at once only interleave: 4 at a time served 294 req/s at 32
# clients here (p99 190 ms) against 230 (p99 404 ms) with 16. A split ingress mostly awaits
# its stages and needs more in flight. Beyond MAX_QUEUED waiting requests (in the replica with
# direct ingress, in each proxy's router otherwise) the answer is a 503 instead of a queue
# without bound; 32 closed-loop clients on 2 replicas get none. The internal stages of the split
# topology admit more (MAX_ONGOING): their callers are limited.
INGRESS_MAX_ONGOING = {"fused": 4, "split": 16}
MAX_QUEUED = 16
MAX_ONGOING = 64

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

ENV = {
    **{v: "1" for v in THREAD_VARS},
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Throughput mode runs user code on the replica's main loop, which also admits and rejects
    # requests: a 503 then waited for the admitted requests' pipeline stages (p50 12.7 ms, p99
    # 68-651 ms at 3x load here). With user code on a thread of its own the main loop answers
    # it at once (p50 1.2 ms, p99 9-14 ms), and recommend@8 lost nothing; the bare floor
    # deployment pays the thread hop (~4,400 -> ~3,600 req/s at 8 clients).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_ENABLE_ACCESS_LOG": "0",
    # The controller declares a proxy dead after 3 failed health checks in a row, one per
    # period (10 s by default): a killed proxy was replaced only after ~30 s. One a second is
    # one cheap actor call; set where the controller runs (cluster.yaml's head start too).
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def allocator_env() -> dict[str, str]:
    """The process environment that puts jemalloc under rec's actors and replicas: the copy
    Ray ships for its own daemons. Long-lived processes that build and free large transient
    states (a model swap, a checkpoint, a log snapshot) kept glibc's freed chunks resident in
    its per-thread arenas, so their memory crept up with nothing live behind it; jemalloc
    gives unused pages back on a timer (a background thread, for idle processes too).
    `REC_ALLOCATOR=system` where the actors start keeps glibc's malloc; none where Ray ships
    no jemalloc (outside Linux)."""
    if os.environ.get("REC_ALLOCATOR", "jemalloc") != "jemalloc":
        return {}
    import ray

    lib = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if not lib.exists():
        return {}
    return {"LD_PRELOAD": str(lib), "MALLOC_CONF": JEMALLOC_CONF}


# Purge dirty pages a second after they are freed, keep no lazily freed (muzzy) ones, and do
# it from jemalloc's background thread rather than only on the next allocation.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def set_process_env() -> None:
    """Apply ENV to this process (call before importing torch / starting Ray)."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pin_threads(n: int = 1) -> None:
    """Inside an actor or replica: one torch thread, whatever the parent set."""
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(n)


class Startup:
    """A replica's start-up (load the model, replay the log), awaited by every request that
    needs it. Requests wait through a shield: Serve cancels a request whose client went away,
    and a cancelled `await task` cancels the task itself, which then left the replica answering
    every later request with the CancelledError (a Gowalla-sized replay outlasted a 5 s
    /readyz client)."""

    def __init__(self, start=None) -> None:
        self.task = asyncio.get_event_loop().create_task(start or asyncio.sleep(0))

    def done(self) -> bool:
        return self.task.done()

    async def wait(self) -> None:
        if self.task.done():  # every request after start-up: no shield future to build
            self.task.result()  # raises what the start-up raised
            return
        await asyncio.shield(self.task)


# Ray's built-in resource of the head node (1 there, absent elsewhere): what must run where the
# cluster's state lives (the event log, the trainer) asks for a sliver of it, on one machine too.
ON_HEAD = {"node:__internal_head__": 0.001}


def actor_options(
    num_cpus: float, num_gpus: float = 0.0, resources: dict[str, float] | None = None
) -> dict:
    opts: dict = {"num_cpus": num_cpus, "runtime_env": {"env_vars": {**ENV, **allocator_env()}}}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if resources:
        opts["resources"] = dict(resources)
    return opts


def serve_options(serving, spread: bool = True) -> dict:
    """The Serve deployment options every replica of ours takes from `serving`
    (rec.config.ServingConfig): the health-check period and, where `spread`, the per-node
    spread."""
    out: dict = {"health_check_period_s": serving.health_check_period_s}
    if spread and serving.max_replicas_per_node:
        out["max_replicas_per_node"] = serving.max_replicas_per_node
    return out


TRAIN_NICE = 19


def lower_own_priority(nice: int = TRAIN_NICE) -> None:
    """Run the calling thread (and the threads it starts) at the lowest CPU priority: a retrain
    takes only the CPU that serving leaves. Ray starts workers at nice 15, so nice 19 alone
    still took a sixth of a contended core from 2 replicas (CFS weights 15 vs 36 each), and
    recommend@8's p99 went 2.7 x during a retrain; SCHED_IDLE (weight 3) leaves it ~1/25."""
    _demote(0, nice)


def lower_priority_of(pid: int, done: set[int], nice: int = TRAIN_NICE) -> None:
    """`lower_own_priority` for every thread of another process of this user (Linux), but
    the threads in `done` (which it adds to)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        if tid not in done:
            _demote(tid, nice)
            done.add(tid)


def _demote(tid: int, nice: int) -> None:
    """Thread `tid` (0: the calling one) to at least `nice` and SCHED_IDLE where it exists (on
    Linux both are per thread, and threads started later inherit them)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


class BackgroundStarts:
    """While open, every process that `parent` (the raylet) starts is moved, all its threads,
    to the lowest CPU priority within `interval_s` of appearing. A retrain's Ray Train job
    starts six processes (controller, worker, placement-group cleaner, synchronisation,
    dataset manager, preemption watcher) that import Ray Train and torch for seconds of CPU at
    the priority of the Serve replicas, before any code of ours runs in them: recommend@8's
    p99 went to 250-565 ms for the 20 s of their start. A Serve replica that (re)starts
    meanwhile is demoted too. Linux; elsewhere a no-op."""

    def __init__(self, parent: int, interval_s: float = 0.05) -> None:
        self.parent = parent
        self.interval_s = interval_s
        self.demoted: set[int] = set()  # processes
        self._threads: set[int] = set()  # their threads already demoted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def children(self) -> set[int]:
        out: set[int] = set()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.parent}/task").iterdir():
                with contextlib.suppress(OSError):
                    out.update(int(p) for p in (task / "children").read_text().split())
        return out

    def __enter__(self) -> BackgroundStarts:
        if hasattr(os, "SCHED_IDLE") and Path(f"/proc/{self.parent}/task").exists():
            existing = self.children()
            self._thread = threading.Thread(
                target=self._run, args=(existing,), daemon=True, name="background-starts"
            )
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, existing: set[int]) -> None:
        while not self._stop.wait(self.interval_s):
            for pid in self.children() - existing:
                with contextlib.suppress(OSError):  # new threads of a demoted process too
                    lower_priority_of(pid, self._threads)
                    self.demoted.add(pid)
