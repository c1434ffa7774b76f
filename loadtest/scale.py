"""`make bench-scale` (`python -m loadtest.scale`): how every cost grows with the data.

For each scale s it generates 1M·s users, 100k·s items and 20M·s events (`generate`), and on a
fresh data dir measures, each phase in a process of its own so that its memory is its own:

- ingest: the records appended to the event log in frames of `FRAME` (fsynced, as the log
  actor appends them), minus the last `TAIL` events, which arrive "while the model trains";
- retrain: `rec.train.train` on the log's snapshot (the newest `--max-train-events` events at
  most, said in the row), the version saved with its index and published;
- checkpoint: what the trainer does before it publishes a version: the live state at the
  snapshot's offset (here the whole log replayed once, as there is no older checkpoint)
  written (`rec.checkpoint`), then, after the tail, the periodic incremental one;
- start-up, per stage (fused replica, profile stage, recall stage): `rec.live.Live.start`
  against the log: model and index loaded, state mapped from the checkpoint, the tail applied;
- in-process `/recommend` (the fused replica: sync with the log for the user, then the whole
  pipeline) p50/p99 over `--requests` users, known ones by activity and 10% new ones;
- swap: a second version published and `Live.reload_if_changed` timed until it serves.

Resident memory: `rss_mb` (what `ps` shows: shared pages, the mapped checkpoint's included) and
`uss_mb` (the process's private pages: what one more replica of that stage costs on a machine
whose replicas share the checkpoint's pages). Writes loadtest/results/scale.json and prints a
table. The default runs scales 0.1 and 1; `--scale 0.1` alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from rec.config import RecConfig
from rec.events import ItemIn, event_record, item_record

FULL = {"users": 1_000_000, "items": 100_000, "events": 20_000_000}
FRAME = 50_000  # records per log append
TAIL = 20_000  # events appended after the training snapshot (a tenth of a smaller data set)
TYPES = np.array(["view", "click", "add_to_cart", "purchase"])
TYPE_P = [0.6, 0.25, 0.1, 0.05]
START_TS, SPAN_S = 1_700_000_000.0, 60 * 86400.0
OUT = Path("loadtest/results/scale.json")


# ---- data --------------------------------------------------------------------------------------


def generate(users: int, items: int, events: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Events in time order, vectorised (rec.data.generate draws per user over the whole
    catalogue, which at 1M users × 100k items takes hours): log-normal user activity (≥ 3 events),
    each user's 1-3 favourite categories drawn 80% of the time, a power-law popularity within
    each category, a funnel of event types."""
    rng = np.random.default_rng(seed)
    n_cat = max(20, items // 500)
    item_cat = rng.permutation(np.arange(items) % n_cat)
    order = np.argsort(item_cat, kind="stable")
    lo = np.searchsorted(item_cat[order], np.arange(n_cat), side="left")
    size = np.bincount(item_cat, minlength=n_cat)
    activity = rng.lognormal(0.0, 1.0, users)  # heavy-tailed, the most active ~70 x the mean
    counts = 3 + rng.multinomial(events - 3 * users, activity / activity.sum())
    user = np.repeat(rng.permutation(users).astype(np.int64), counts)
    fav = rng.integers(n_cat, size=(users, 3))
    n_fav = rng.integers(1, 4, size=users)
    cat = fav[user, (rng.random(len(user)) * n_fav[user]).astype(np.int64)]
    explore = rng.random(len(user)) < 0.2
    cat[explore] = rng.integers(n_cat, size=int(explore.sum()))
    pos = (size[cat] * rng.random(len(user)) ** 3).astype(np.int64)
    item = order[lo[cat] + pos]
    ts = START_TS + rng.random(len(user)) * SPAN_S
    by_time = np.argsort(ts, kind="stable")
    kind = rng.choice(len(TYPES), size=len(user), p=TYPE_P).astype(np.int8)
    return {
        "user": user[by_time],
        "item": item[by_time],
        "ts": ts[by_time],
        "type": kind[by_time],
        "item_cat": item_cat,
    }


def tail_of(events: int) -> int:
    return min(TAIL, events // 10)


def item_records(data: dict) -> list[dict]:
    return [
        item_record(ItemIn(item_id=f"i{i}", category=f"c{c}"), ts=START_TS)
        for i, c in enumerate(data["item_cat"].tolist())
    ]


def event_records(data: dict, a: int, b: int) -> list[dict]:
    users = data["user"][a:b].tolist()
    items = data["item"][a:b].tolist()
    kinds = TYPES[data["type"][a:b]].tolist()
    return [
        event_record(user_id=f"u{u}", item_id=f"i{i}", type=t, ts=ts)
        for u, i, t, ts in zip(users, items, kinds, data["ts"][a:b].tolist(), strict=True)
    ]


# ---- phases (each run in a process of its own) -------------------------------------------------


def bench_config(data_dir: Path) -> RecConfig:
    config = RecConfig(data_dir=data_dir)
    config.train.worker_threads = 2
    return config


def memory() -> dict:
    p = psutil.Process()
    full = p.memory_full_info()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rss_mb": round(full.rss / 2**20),
        "uss_mb": round(full.uss / 2**20),
        "peak_mb": round(peak),
    }


def phase_ingest(args) -> dict:
    from rec.eventlog import EventLog

    config = bench_config(args.data_dir)
    data = generate(args.users, args.items, args.events, args.seed)
    n_events, tail = len(data["user"]), tail_of(len(data["user"]))
    upto = n_events - tail if args.part == "head" else n_events
    start = 0 if args.part == "head" else n_events - tail
    t0 = time.perf_counter()
    n = 0
    with EventLog(config.log_dir, config.eventlog) as log:
        if args.part == "head":
            items = item_records(data)
            for a in range(0, len(items), FRAME):
                log.append(items[a : a + FRAME])
            n += len(items)
        for a in range(start, upto, FRAME):
            log.append(event_records(data, a, min(a + FRAME, upto)))
        n += upto - start
        offset = log.next_offset
    seconds = time.perf_counter() - t0
    return {"records": n, "seconds": seconds, "offset": offset, **memory()}


def phase_train(args) -> dict:
    import pyarrow as pa

    from rec.eventlog import EventLog
    from rec.model import publish
    from rec.train import train

    config = bench_config(args.data_dir)
    t0 = time.perf_counter()
    with EventLog(config.log_dir, config.eventlog) as log:
        upto = log.next_offset
        first = max(args.items, upto - args.max_train_events)
        table = pa.concat_tables([log.table(0, args.items), log.table(first, upto)])
    read_s = time.perf_counter() - t0
    model = train(table, config, log_offset=upto, threads=2)
    del table
    model.save(config.model_dir, model.build_index(config.recall))
    publish(config.model_dir, model.version)
    return {
        "seconds": time.perf_counter() - t0,
        "read_s": read_s,
        "train_events": upto - first,
        "version": model.version,
        "log_offset": upto,
        **memory(),
    }


def phase_checkpoint(args) -> dict:
    """As `deployments.trainer.Trainer.checkpoint`: the best usable checkpoint (or nothing),
    the log after it applied, the state written, old ones collected."""
    from rec import checkpoint
    from rec.eventlog import EventLog
    from rec.model import current_version, load_basis

    config = bench_config(args.data_dir)
    t0 = time.perf_counter()
    version = current_version(config.model_dir)
    basis = load_basis(config.model_dir / version) if version else None
    state = checkpoint.start_state(config, basis)
    start = state.offset
    with EventLog(config.log_dir, config.eventlog) as log:
        upto = log.next_offset
        for a in range(start, upto, FRAME):
            state.apply(log.read(a, FRAME))
    applied_s = time.perf_counter() - t0
    path = checkpoint.save(state, config.checkpoint_dir)
    checkpoint.collect(config.checkpoint_dir, config.checkpoint.keep)
    size = sum(f.stat().st_size for f in path.iterdir())
    return {
        "seconds": time.perf_counter() - t0,
        "apply_s": applied_s,
        "applied": upto - start,
        "checkpoint": path.name,
        "disk_mb": round(size / 2**20),
        **memory(),
    }


def phase_replica(args) -> dict:
    return asyncio.run(_replica(args))


async def _replica(args) -> dict:
    from deployments.eventlog import EventLogService, LocalHandle
    from rec.live import Live
    from rec.model import current_version, publish

    config = bench_config(args.data_dir)
    log = LocalHandle(lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump()))
    live = Live(config, log, part=args.part)
    before = memory()  # the interpreter and the libraries, before any state
    t0 = time.perf_counter()
    await live.start()
    out = {
        "startup_s": time.perf_counter() - t0,
        "started_from": live.rec.state.checkpoint,
        "offset": live.rec.offset,
        "before_mb": before["rss_mb"],
        **memory(),
    }
    live._reloader.cancel()  # this benchmark swaps by hand, timed
    if args.part == "all":
        rng = np.random.default_rng(1)
        users = [
            f"new{n}" if rng.random() < 0.1 else f"u{int(u)}"
            for n, u in enumerate(rng.integers(args.users, size=args.requests))
        ]
        times = []
        for n, user in enumerate(users):
            t = time.perf_counter()
            await live.sync(user=user)
            answer = live.rec.recommend(user, 10, request_id=str(n))
            times.append(time.perf_counter() - t)
            assert answer["items"], user
        times = np.asarray(times[len(times) // 10 :]) * 1e3  # the first tenth warms caches
        out["recommend_p50_ms"] = float(np.percentile(times, 50))
        out["recommend_p99_ms"] = float(np.percentile(times, 99))
        old = current_version(config.model_dir)
        new = old + "-b"
        src, dst = config.model_dir / old, config.model_dir / new
        shutil.copytree(src, dst)
        meta = json.loads((dst / "meta.json").read_text())
        (dst / "meta.json").write_text(json.dumps({**meta, "version": new}))
        publish(config.model_dir, new)
        t = time.perf_counter()
        assert await live.reload_if_changed()
        out["swap_s"] = time.perf_counter() - t
        out["swap_started_from"] = live.rec.state.checkpoint
        out["after_swap"] = memory()
        publish(config.model_dir, old)
        shutil.rmtree(dst)
    live.stop()
    log.close()
    return out


PHASES = {
    "ingest": phase_ingest,
    "train": phase_train,
    "checkpoint": phase_checkpoint,
    "replica": phase_replica,
}


# ---- driver ------------------------------------------------------------------------------------


def train_events(scale: float, args) -> int:
    if args.max_train_events:
        return args.max_train_events
    return 2_000_000 if scale <= 0.1 else 250_000


def run_phase(phase: str, work: Path, dims: dict, args, part: str = "") -> dict:
    cmd = [
        sys.executable, "-m", "loadtest.scale", "--phase", phase, "--data-dir", str(work),
        "--users", str(dims["users"]), "--items", str(dims["items"]),
        "--events", str(dims["events"]), "--part", part, "--requests", str(args.requests),
        "--max-train-events", str(dims["train_events"]), "--seed", str(args.seed),
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"phase {phase} {part} failed ({done.returncode})")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {phase} {part}: {time.perf_counter() - t0:.1f} s {out}", flush=True)
    return out


def run_scale(scale: float, args) -> dict:
    dims = {k: round(v * scale) for k, v in FULL.items()}
    dims["train_events"] = train_events(scale, args)
    work = args.work / f"scale-{scale:g}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"scale {scale:g}: {dims}", flush=True)
    ingest = run_phase("ingest", work, dims, args, "head")
    trained = run_phase("train", work, dims, args)
    ckpt = run_phase("checkpoint", work, dims, args, "published")  # the retrain's, at its offset
    run_phase("ingest", work, dims, args, "tail")  # what arrived while the model trained
    fused = run_phase("replica", work, dims, args, "all")
    profiles = run_phase("replica", work, dims, args, "profiles")
    recall = run_phase("replica", work, dims, args, "recall")
    incremental = run_phase("checkpoint", work, dims, args, "published")
    row = {
        "scale": scale,
        **{k: dims[k] for k in FULL},
        "ingest_s": round(ingest["seconds"], 1),
        "ingest_records_per_s": round(ingest["records"] / ingest["seconds"]),
        "retrain_s": round(trained["seconds"], 1),
        "retrain_events": trained["train_events"],
        "checkpoint_full_s": round(ckpt["seconds"], 1),
        "checkpoint_incremental_s": round(incremental["seconds"], 1),
        "checkpoint_disk_mb": ckpt["disk_mb"],
        "tail_records": tail_of(dims["events"]),
        "startup_s": {
            "fused replica": round(fused["startup_s"], 2),
            "profile stage": round(profiles["startup_s"], 2),
            "recall stage": round(recall["startup_s"], 2),
        },
        "swap_s": round(fused["swap_s"], 2),
        "rss_mb": {
            "fused replica": fused["rss_mb"],
            "fused replica after swap": fused["after_swap"]["rss_mb"],
            "profile stage": profiles["rss_mb"],
            "recall stage": recall["rss_mb"],
            "a replica process before any state": fused["before_mb"],
            "trainer: checkpoint (peak)": ckpt["peak_mb"],
            "train job (peak)": trained["peak_mb"],
            "log writer (peak)": ingest["peak_mb"],
        },
        "uss_mb": {
            "fused replica": fused["uss_mb"],
            "profile stage": profiles["uss_mb"],
            "recall stage": recall["uss_mb"],
        },
        "recommend_p50_ms": round(fused["recommend_p50_ms"], 2),
        "recommend_p99_ms": round(fused["recommend_p99_ms"], 2),
        "requests": args.requests,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| scale | users | items | events | ingest s | retrain s (events) | checkpoint s full / incr"
        " | start-up s fused / profile / recall | swap s | RSS MB fused / profile / recall"
        " | USS MB fused | recommend p50 / p99 ms |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        st, rss = r["startup_s"], r["rss_mb"]
        lines.append(
            f"| {r['scale']:g} | {r['users']:,} | {r['items']:,} | {r['events']:,} "
            f"| {r['ingest_s']} | {r['retrain_s']} ({r['retrain_events']:,}) "
            f"| {r['checkpoint_full_s']} / {r['checkpoint_incremental_s']} "
            f"| {st['fused replica']} / {st['profile stage']} / {st['recall stage']} "
            f"| {r['swap_s']} | {rss['fused replica']} / {rss['profile stage']} / "
            f"{rss['recall stage']} | {r['uss_mb']['fused replica']} "
            f"| {r['recommend_p50_ms']} / {r['recommend_p99_ms']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--work", type=Path, default=Path("var/bench-scale"))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument(
        "--max-train-events",
        type=int,
        help="the retrain reads at most the newest this many events (default: 2M up to scale "
        "0.1, 250k above: the graph filter's SVD holds the window's users × 4,480 doubles and "
        "the job the snapshot as Python records, which at 1M users does not fit 24 GiB)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep each scale's data dir")
    # one phase, in this process (what the driver runs)
    p.add_argument("--phase", choices=sorted(PHASES))
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--part", default="")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--events", type=int)
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    for scale in sorted(args.scale):
        row = run_scale(scale, args)  # each scale's row replaces that scale's earlier one
        rows = sorted([r for r in rows if r["scale"] != scale] + [row], key=lambda r: r["scale"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
