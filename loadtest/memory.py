"""`python -m loadtest.memory`: the resident memory of each rec process, per topology.

Starts the local stack the way `make loadtest` does (loadtest.run.Stack: `rec serve` on a fresh
data dir, with the generated demo data or --data), waits for /readyz, sends ~50 /recommend
requests (known and cold users) so that every stage has loaded its state and served, then reads
the RSS (psutil) of every Ray actor process in the stack's process tree that is a replica of the
rec Serve app or one of rec's own actors (EventLog, Trainer, IndexShard), recognised by the title
Ray gives it (`ray::ServeReplica:rec:Aggregator`, `ray::Trainer.retrain`). It stops the stack and
Ray in any case, prints a Markdown table and writes --out (JSON).

Why: on a small machine memory, not CPU, bounds how many replicas fit, and the fused and split
topologies hold the model's state in different processes; this makes each process's cost
comparable across topologies and before/after a change. RSS counts shared pages (libraries, the
object store) in every process that maps them, so the total is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import psutil

import rec
from deployments.cli import _wait_ready
from loadtest.client import Client
from loadtest.run import Stack, _interrupt, free_port, load_population
from rec.config import RecConfig

APP = "rec"
REC_ACTORS = {"EventLogService": "EventLog", "Trainer": "Trainer", "IndexShard": "IndexShard"}
REQUESTS = 50


def process_name(proc: psutil.Process) -> str | None:
    """The deployment or rec actor a Ray worker process runs, from its title; None otherwise."""
    try:
        title = " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return None
    if not title.startswith("ray::"):
        return None
    cls = title.removeprefix("ray::").split()[0].split(".")[0]  # drop a running method's name
    kind, _, rest = cls.partition(":")
    if kind == "ServeReplica":
        app, _, deployment = rest.partition(":")
        return deployment if app == APP else None
    return REC_ACTORS.get(cls)


def measure(stack: Stack) -> list[dict]:
    by_name: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for proc in stack.tree():
        name = process_name(proc)
        if name is not None:
            try:
                by_name[name].append((proc.pid, proc.memory_info().rss / 2**20))
            except psutil.Error:
                continue
    return [
        {"process": name, "replica": i, "rss_mb": round(rss, 1)}
        for name in sorted(by_name)
        for i, (_, rss) in enumerate(sorted(by_name[name]), 1)
    ]


def wait_ready(stack: Stack, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _wait_ready(stack.url, 5)
        except TimeoutError:
            if not stack.alive():
                raise RuntimeError(f"rec serve exited; see {stack.log_path}") from None
            if time.monotonic() > deadline:
                raise


def recommend(url: str, users: list[str]) -> int:
    ok = 0
    for user in users:
        try:
            with urllib.request.urlopen(url + Client.recommend_path(user), timeout=30) as r:
                ok += r.status == 200
        except OSError as exc:
            print(f"  /recommend for {user}: {exc}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--topology", choices=["fused", "split"], help="default: the config's")
    p.add_argument("--data", help="data set to load (default: the generated demo data)")
    p.add_argument("--format", default="csv", choices=["csv", "movielens", "lightgcn"])
    p.add_argument("--config", help="RecConfig YAML (defaults otherwise)")
    p.add_argument("--replicas", type=int, default=2, help="ingress replicas (rec serve's)")
    p.add_argument("--data-dir", help="emptied first! (default: a fresh temporary dir)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=600,
        help="seconds to wait for /readyz after the start (default: 600)",
    )
    args = p.parse_args(argv)

    config = RecConfig.from_yaml(args.config) if args.config else RecConfig()
    if args.topology:
        config.serving.topology = args.topology
    work = Path(tempfile.mkdtemp(prefix="rec-memory-"))
    (work / "rec.yaml").write_text(config.to_yaml())
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    stack = Stack(
        free_port(),
        data_dir,
        args.data,
        args.format,
        str(work / "rec.yaml"),
        args.replicas,
        work / "server.log",
    )
    stack.cmd.remove("--floor")  # the load tests' baseline app: not measured here
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on `kill` / `timeout` too
    print(
        f"rec from {Path(rec.__file__).parent}; topology {config.serving.topology}; log in "
        f"{stack.log_path}",
        flush=True,
    )
    rows, ok, ready_s = [], False, None
    try:
        rng = random.Random(0)
        pop = load_population(args.data, args.format, config.seed)
        users = [pop.known_user(rng) if i % 5 else f"cold-{i}" for i in range(REQUESTS)]
        t0 = time.monotonic()
        stack.start()
        ready = wait_ready(stack, args.ready_timeout)
        ready_s = round(time.monotonic() - t0, 1)
        print(f"ready after {ready_s} s: {ready}", flush=True)
        served = recommend(stack.url, users)
        print(f"{served}/{len(users)} /recommend answered 200", flush=True)
        time.sleep(1.0)
        rows = measure(stack)
        ok = served > 0 and bool(rows)
    finally:
        print(f"stopping the stack: {stack.stop()}", flush=True)
    total = round(sum(r["rss_mb"] for r in rows), 1)
    print("\n| process | replica | RSS MB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['process']} | {r['replica']} | {r['rss_mb']} |")
    print(f"| **total** | {len(rows)} | **{total}** |")
    print(f"ready after {ready_s} s" if ready_s is not None else "never ready", flush=True)
    if args.out:
        result = {
            "topology": config.serving.topology,
            "data": args.data or "generated (rec.data.generate)",
            "rows": rows,
            "total_mb": total,
            "ready_s": ready_s,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (server log)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
