"""The `pipeline` scenario: the in-process pipeline (`rec.pipeline.Recommender.recommend`) on the
load test's request mix, one thread, no HTTP and no Serve. It holds the model the stack serves
and the records the stack started from plus the events the run posted before it, so its rate is
the limit one core puts on the served rate, measured in the same run."""

from __future__ import annotations

import random
import time

from loadtest import client as lc
from loadtest import report


def measure(
    config,
    records: list[dict],
    pop: lc.Population,
    seconds: float,
    warmup: float,
    k: int = 10,
    seed: int = 13,
) -> dict:
    """One closed-loop client calling the pipeline for `seconds` (after `warmup`)."""
    import torch
    from threadpoolctl import threadpool_limits

    from rec.model import ModelBundle, current_version, load_saved_index
    from rec.pipeline import Recommender

    version = current_version(config.model_dir)
    if version is None:
        raise RuntimeError(f"no model published under {config.model_dir}")
    path = config.model_dir / version
    torch.set_num_threads(1)
    with threadpool_limits(1):
        rec = Recommender(config, ModelBundle.load(path, device="cpu"), load_saved_index(path))
        rec.apply([{**r, "offset": n} for n, r in enumerate(records)])
        rng = random.Random(seed)
        latencies: list[float] = []
        start = time.perf_counter()
        measured_from, end = start + warmup, start + warmup + seconds
        while (now := time.perf_counter()) < end:
            _, user = pop.user_mix(rng)
            rec.recommend(user, k)
            if now >= measured_from:
                latencies.append((time.perf_counter() - now) * 1e3)
        wall = time.perf_counter() - measured_from
    return report.scenario_row(
        "pipeline", 1, wall, latencies, 0, threads=1, model_version=version, records=len(records)
    )
