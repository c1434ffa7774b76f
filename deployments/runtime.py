"""Process settings every rec actor and replica shares: one math thread per process (2 cores
are shared by every replica), Serve's throughput-optimised mode, no usage stats."""

from __future__ import annotations

import contextlib
import os

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

ENV = {
    **{v: "1" for v in THREAD_VARS},
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_ACCESS_LOG": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


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


def actor_options(num_cpus: float, num_gpus: float = 0.0) -> dict:
    opts: dict = {"num_cpus": num_cpus, "runtime_env": {"env_vars": dict(ENV)}}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    return opts
