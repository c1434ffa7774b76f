"""`make soak`: the `mixed` load at 8 clients for 20 minutes (--minutes) against a local fused
stack that retrains and checkpoints on its own schedule meanwhile (train.every_s 150 unless
--retrain-every says otherwise: several model swaps in the window), sampling every process's
memory every 10 s.

A leak shows as growth once every bounded store is full, so the stack runs with the log's
in-memory stores (tail cache, recent records, append tokens) at SMALL_CACHE records, which the
load fills in the first minutes; at their defaults they fill over hours of this load and
their growth would read as a leak. The warm-up ends WARMUP_S in, or SWAP_SETTLE_S after the
first retrained version is served, whichever is later: a replica's memory keeps the high-water
of its first swap (the old and the new version both alive); a later swap raises it only
when its two versions together need more (the data grew).

A process is judged on its private memory (USS: the pages only it maps). Its RSS also counts
shared pages, each the first time the process touches it: the code of the libraries it runs
(torch's is ~200 MB), the mapped checkpoint and model files, the log's record ring and Ray's
object store (512 MB, shared by every worker: each large reply or argument lands in pages the
process may not have touched yet). All are bounded by what is on disk or by configuration,
yet fault in over hours and read as growth; the RSS is reported beside it.

Reported (loadtest/results/soak.json and soak.md): requests and errors, latency, and per
process of the stack its private memory after the warm-up and at the end with the
least-squares slope in MB per 10 minutes and the growth of its floor (`slopes`), and its RSS;
a process counts as flat when its floor grew by at most max(10 MB, 3% of its mean). Every
event the load posted and got a 200 for is looked up in the log at the end (lost: 0
expected).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from loadtest.chaos import Load, follow_targets, local_stack, read_request_ids, started, summarize
from loadtest.client import Client
from loadtest.run import RESULTS, ROOT, client_key, load_population, machine, uvloop_run

SAMPLE_S = 10.0
WARMUP_S = 180.0
SWAP_SETTLE_S = 60.0
SMALL_CACHE = 2_000
FLAT_MB = 10.0
FLAT_SHARE = 0.03
FLOOR_SHARE = 0.2


def label(p: psutil.Process) -> str:
    """What a process of the stack is: Ray's process title for workers and actors
    (ray::ServeReplica:rec:Aggregator, ray::EventLogService ...) without the method it runs
    (ray::EventLogService.append is the same actor), else the program's name."""
    with contextlib.suppress(psutil.Error):
        cmd = p.cmdline()
        if cmd and cmd[0].startswith("ray::"):
            title = cmd[0].split()[0]
            actor, _, method = title.rpartition(".")
            return actor if actor and method.isidentifier() else title
        if cmd:
            prog = Path(cmd[0]).name
            if prog.startswith("python") and len(cmd) > 2:
                return " ".join(Path(c).name for c in cmd[1:3])
            return prog
    return "?"


def slopes(samples: dict[str, list[tuple[float, float]]], t_warm: float) -> list[dict]:
    """Per process: its memory (MB) after the warm-up and at the end, the least-squares slope
    (MB per 10 minutes) of the samples after it, and the growth of its floor: the lowest sample
    of the last FLOOR_SHARE of the window less the lowest of the first. A process is judged on its floor:
    a job's working set (a log snapshot, a checkpoint, a swap being built) is a peak that goes
    back down and tilts a fitted line, while a leak raises the floor (pure)."""
    rows = []
    end = max((t for points in samples.values() for t, _ in points), default=t_warm)
    for name, points in sorted(samples.items()):
        after = [(t, mb) for t, mb in points if t >= t_warm]
        if len(after) < 3:
            continue
        t, mb = np.array(after).T
        slope = float(np.polyfit(t, mb, 1)[0]) * 600.0
        span = float(t[-1] - t[0])
        first, last = t <= t[0] + FLOOR_SHARE * span, t >= t[-1] - FLOOR_SHARE * span
        floor = float(mb[last].min() - mb[first].min())
        # a process that lived only part of the window (a Train worker, a pooled worker) is
        # listed, not judged: its growth is its job's
        whole = span >= 0.8 * (end - t_warm)
        flat = bool(floor <= max(FLAT_MB, FLAT_SHARE * float(mb.mean())))
        rows.append(
            {
                "process": name,
                "mb_after_warmup": round(float(mb[0]), 1),
                "mb_end": round(float(mb[-1]), 1),
                "mb_max": round(float(mb.max()), 1),
                "slope_mb_per_10min": round(slope, 2),
                "floor_growth_mb": round(floor, 1),
                "flat": flat if whole else None,
            }
        )
    return rows


def warmed_up_at(served: list[tuple[float, str | None]]) -> float:
    """When the warm-up ends: WARMUP_S, or SWAP_SETTLE_S after the second version served
    (the first swap) if that is later (pure)."""
    versions = [t for t, v in served if v is not None]
    return max(WARMUP_S, versions[1] + SWAP_SETTLE_S) if len(versions) > 1 else WARMUP_S


def with_rss(rows: list[dict], rss: dict[str, list[tuple[float, float]]], t_warm: float):
    """`slopes` rows of private memory with each process's RSS after the warm-up and at the
    end (pure)."""
    for row in rows:
        after = [mb for t, mb in rss.get(row["process"], []) if t >= t_warm]
        if after:
            row["rss_mb_after_warmup"] = round(after[0], 1)
            row["rss_mb_end"] = round(after[-1], 1)
    return rows


async def soak(args, results: dict) -> None:
    from rec.config import RecConfig

    work = ROOT / "var" / "soak"
    config = RecConfig()
    config.train.every_s = args.retrain_every
    config.eventlog.tail_cache_records = SMALL_CACHE  # the recent records follow it
    config.eventlog.tokens_kept = SMALL_CACHE
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(json.dumps(config.model_dump(mode="json")))
    stack = local_stack(args, work, work / "config.yaml")
    pop = load_population(args.data, args.format, 0)
    print(f"starting the stack (log: {stack.log_path}) ...", flush=True)
    stack.start()
    stop = asyncio.Event()
    try:
        async with Client(stack.url, args.api_key) as proxy:
            targets, urls = await started(stack, proxy)
            import ray

            from deployments.eventlog import get_log

            start_offset = ray.get(get_log().next_offset.remote())
            async with Client(urls, args.api_key) as direct:
                follower = asyncio.create_task(follow_targets(direct, targets, stop))
                load = Load(direct, pop, f"soak-{results['run_id']}")
                private: dict[str, list[tuple[float, float]]] = {}  # USS, what is judged
                rss: dict[str, list[tuple[float, float]]] = {}
                served: list[tuple[float, str | None]] = []
                probes: list[dict] = []  # GET /models through the proxy that did not answer 200
                end = args.minutes * 60.0
                done = asyncio.get_running_loop().create_future()

                async def sample() -> None:
                    try:
                        while load.now() < end:
                            for p in stack.tree():
                                with contextlib.suppress(psutil.Error):
                                    key = f"{label(p)} (pid {p.pid})"  # a restart: a new row
                                    mem = p.memory_full_info()
                                    private.setdefault(key, []).append(
                                        (load.now(), mem.uss / 2**20)
                                    )
                                    rss.setdefault(key, []).append((load.now(), mem.rss / 2**20))
                            status, data, took = await proxy.call("GET", "/models")
                            version = json.loads(data).get("serving") if status == 200 else None
                            if status != 200:
                                probes.append(
                                    {
                                        "t_s": round(load.now()),
                                        "status": status,
                                        "seconds": round(took, 2),
                                        "body": data[:200].decode(errors="replace"),
                                    }
                                )
                            if version is not None and (not served or served[-1][1] != version):
                                served.append((round(load.now(), 1), version))
                            print(
                                f"  {load.now():6.0f} s  {len(load.answers)} requests, "
                                f"{sum(a.status != 200 for a in load.answers)} errors, "
                                f"serving {version}",
                                flush=True,
                            )
                            await asyncio.sleep(SAMPLE_S)
                    finally:  # the load runs until this says so, also when sampling fails
                        done.set_result(None)

                sampler = asyncio.create_task(sample())
                await load.run(done)
                await sampler
                stop.set()
                await follower
            logged = await asyncio.to_thread(read_request_ids, start_offset, load.tag)
            warm = warmed_up_at(served)
            figures = summarize(load.answers, t_fault=end, acked=load.acked, logged=logged)
            results.update(
                minutes=args.minutes,
                requests=figures["requests"],
                errors=figures["failed"],
                by_kind=figures["by_kind"],
                error_examples=figures["failure_examples"],
                events_acked=figures["events_acked"],
                events_lost=figures["events_lost"],
                models_served=served,
                proxy_probe_failures=probes,
                warmup_s=warm,
                memory=with_rss(slopes(private, warm), rss, warm),
                private_samples={
                    k: [(round(t), round(mb, 1)) for t, mb in v] for k, v in private.items()
                },
                rss_samples={k: [(round(t), round(mb, 1)) for t, mb in v] for k, v in rss.items()},
            )
    finally:
        stop.set()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        results["stack"] = stack.stop()


def to_markdown(results: dict) -> str:
    out = [
        "# make soak",
        "",
        f"{results['started']} on {results['machine']}: mixed load (90% GET /recommend, 10% "
        f"POST /events) at 8 clients for {results.get('minutes')} minutes, retrain every "
        f"{results.get('retrain_every_s')} s and checkpoints on their default schedule, the "
        f"log's in-memory stores at {SMALL_CACHE} records; memory sampled every {SAMPLE_S:.0f} s, "
        f"slopes after a warm-up of {results.get('warmup_s')} s (past the first model swap).",
        "",
    ]
    if "requests" not in results:
        return "\n".join([*out, f"No figures: {results.get('error')}", ""])
    rk = results["by_kind"]
    out += [
        f"Requests {results['requests']}, errors {results['errors']}; recommend p50 "
        f"{rk['recommend']['p50_ms']} / p99 {rk['recommend']['p99_ms']} ms, events p99 "
        f"{rk['events']['p99_ms']} ms; events acknowledged {results['events_acked']}, lost "
        f"{results['events_lost']}. Models served: "
        + ", ".join(f"{v} from {t} s" for t, v in results["models_served"] if v),
        "",
        "Private memory (USS, MB) is judged; RSS adds the shared pages the process has touched "
        "(libraries, mapped files, the record ring, Ray's object store).",
        "",
        "| process | private MB after warm-up | at the end | max | RSS MB (warm-up → end) | "
        "slope MB/10 min | floor growth MB | flat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {m['process']} | {m['mb_after_warmup']} | {m['mb_end']} | "
        f"{m['mb_max']} | {m.get('rss_mb_after_warmup')} → {m.get('rss_mb_end')} | "
        f"{m['slope_mb_per_10min']} | {m.get('floor_growth_mb')} | "
        f"{ {True: 'yes', False: 'no', None: 'part of the window'}[m['flat']] } |"
        for m in results["memory"]
    ]
    if results.get("error_examples"):
        out += ["", "Errors: " + "; ".join(results["error_examples"])]
    if results.get("proxy_probe_failures"):
        out += [
            "",
            "GET /models through the Serve proxy (the sampler's, not the load's) not answered "
            "200: "
            + "; ".join(
                f"at {f['t_s']} s {f['status']} after {f['seconds']} s ({f['body'][:80]})"
                for f in results["proxy_probe_failures"]
            ),
        ]
    out += ["", f"Reproduce: `make soak` ({results.get('total_s')} s)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--retrain-every", type=float, default=150.0, help="train.every_s (s)")
    p.add_argument("--data", help="data set to load (default: the generated demo data)")
    p.add_argument("--format", default="csv", choices=["csv", "movielens", "lightgcn"])
    args = p.parse_args(argv)
    args.attach = args.targets = args.api_key = None
    args.api_key = client_key(args)
    results = {
        "machine": machine(),
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_id": f"{int(time.time())}",
        "retrain_every_s": args.retrain_every,
        "pid": os.getpid(),
    }
    t0 = time.monotonic()
    rc = 0
    try:
        uvloop_run(soak(args, results))
    except Exception as exc:
        rc = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        import traceback

        traceback.print_exc()
    finally:
        results["total_s"] = round(time.monotonic() - t0, 1)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "soak.json").write_text(json.dumps(results, indent=2, default=float))
        (RESULTS / "soak.md").write_text(to_markdown(results))
    print((RESULTS / "soak.md").read_text())
    ok = results.get("errors") == 0 and all(
        m["flat"] is not False for m in results.get("memory", [])
    )
    return rc or (0 if ok else 3)


if __name__ == "__main__":
    sys.exit(main())
