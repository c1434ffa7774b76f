"""`python -m loadtest.state_growth`: how much a replica's live state grows with the soak's
events, in process (no Ray), to tell data growth from a leak in `make soak`'s replica rows.

Loads the oldest checkpoint a soak left (var/soak/data by default) with the version it was
taken for, as a replica does after a swap, then applies the soak's kind of events (the `mixed`
load's: known users by activity, items by popularity) in steps, with offsets after the
checkpoint's, and prints after each step the memory `tracemalloc` traces to Python
allocations: first users' profiles and co-occurrence rows materialised from the checkpoint's
arrays (bounded by the users; a replica keeps its profiles across swaps and materialises
its co-occurrence rows again at each), then growth with the data itself. RSS is printed too, but tracing inflates it.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from pathlib import Path

import psutil

from loadtest.client import Population
from loadtest.run import ROOT
from rec import checkpoint
from rec import data as rdata
from rec.config import RecConfig
from rec.events import event_record
from rec.model import load_basis

STEP = 3_000


def oldest_usable(config: RecConfig) -> tuple[Path, object]:
    """The oldest checkpoint whose model version is still on disk, and that version's basis."""
    for path in sorted(p for p in config.checkpoint_dir.iterdir() if (p / "meta.json").exists()):
        version_dir = config.model_dir / path.name.partition("-")[2]
        if (version_dir / "meta.json").exists():
            return path, load_basis(version_dir)
    raise SystemExit(f"no checkpoint with its model version under {config.checkpoint_dir}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, default=ROOT / "var" / "soak", help="a soak's work dir")
    p.add_argument("--events", type=int, default=24_000, help="events to apply (a soak's)")
    args = p.parse_args(argv)
    config = RecConfig.from_yaml(args.work / "config.yaml")
    config.data_dir = args.work / "data"
    path, basis = oldest_usable(config)
    pop = Population.from_dataset(rdata.generate(seed=config.seed))
    rng = random.Random(1)
    proc = psutil.Process()
    tracemalloc.start()
    state = checkpoint.load(path, config, basis)
    gc.collect()
    base, rss0 = tracemalloc.get_traced_memory()[0], proc.memory_info().rss
    print(f"checkpoint {path.name}: {len(state.profiles.users)} users")
    print("| events | materialised users | traced MB | RSS MB | traced KB per event, this step |")
    print("|---|---|---|---|---|")
    offset, last = state.offset, base
    for done in range(STEP, args.events + 1, STEP):
        records = []
        for _ in range(STEP):
            e = pop.event(rng)
            records.append({**event_record(**e, ts=time.time()), "offset": offset})
            offset += 1
        state.apply(records)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        print(
            f"| {done} | {len(state.profiles.users.live)} | {(traced - base) / 2**20:.1f} | "
            f"{(proc.memory_info().rss - rss0) / 2**20:.1f} | {(traced - last) / STEP / 1024:.2f} |"
        )
        last = traced


if __name__ == "__main__":
    main()
