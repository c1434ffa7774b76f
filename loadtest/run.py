"""`make loadtest`: start the local stack (`rec serve --floor` on a fresh data dir, default data
or --data), run bounded scenarios against 127.0.0.1, stop everything it started, and write
loadtest/results/latest.json, summary.md and latency.png.

Scenarios (closed loop at 1, 8 and 32 clients unless said otherwise; see loadtest/client.py):
  floor            GET /floor: a bare Serve deployment answering a constant JSON, same Ray and
                   settings, same run: the ceiling Serve puts on this machine
  recommend        GET /recommend over the user mix: 70% known users (by activity), 15% cold,
                   15% just active (acted after the model was trained)
  pipeline         the same mix through the in-process pipeline, one thread, no HTTP or Serve
                   (loadtest/pipeline.py): recommend@8 / (cores x its rate) is the served share
                   of what the pipeline itself allows
  mixed            90% recommend / 10% POST /events; each event is a click on an item the user
                   was just shown, and the next /recommend for that user must no longer show it:
                   freshness = POST answer -> reflecting /recommend answer
  push             mixed at 8 clients, and GET /stream open for 20 known users (through the
                   proxy: the stream app's route) while one more client clicks for them in
                   turn, one click per 0.1 s + its push: push latency = POST answer -> the
                   pushed list reflecting it
  new items        POST /items, then poll /recommend for a known user until the item shows
  retrain          recommend at 8 clients during POST /admin/retrain until the new model is
                   served (and a baseline at 8 clients just before)
  overload         open loop at 3x recommend@8 measured just before (5 s): 503 for the excess; then
                   recovery: recommend at 8 clients
  events-single    POST /events, one event per request (1, 8, 32 clients)
  events-batch     POST /events {"events": [1000 events]} (1 and 4 clients): acknowledged
                   events/s (acknowledged = fsynced)

The whole run is bounded (--budget, 15 minutes by default): scenarios that no longer fit are
skipped and the stack is stopped in any case. `--seconds 3` makes a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import quote

import psutil

from deployments.cli import TARGETS_FILE
from loadtest import client as lc
from loadtest import pipeline, report
from rec.access import ENV_KEY, KEY_FILE
from rec.events import EventIn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
STOP_RESERVE_S = 45  # kept for stopping the stack and writing the results
CONCURRENCY = (1, 8, 32)
CAPACITY_PROBE_S = 5.0  # recommend@8 measured right before the overload, which is 3× of it
SCENARIOS = (
    "floor",
    "recommend",
    "pipeline",
    "mixed",
    "push",
    "new_items",
    "overload",
    "retrain",
    "events",
)


# ---- the stack ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """`rec serve` (with `--floor` unless told not to) in a child process (its own session),
    stopped with SIGTERM, then SIGKILL for anything of its process tree still alive."""

    def __init__(
        self,
        port: int,
        data_dir: Path,
        data: str | None,
        fmt: str,
        config: str | None,
        replicas: int,
        log_path: Path,
        floor: bool = True,
    ) -> None:
        self.port, self.data_dir, self.log_path = port, data_dir, log_path
        self.cmd = [
            sys.executable,
            "-m",
            "deployments.cli",
            "serve",
            *(["--floor"] if floor else []),
            "--replicas",
            str(replicas),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--metrics-port",
            str(free_port()),  # never another stack's (rec serve's default is 8080)
        ]
        if data:
            self.cmd += ["--data", data, "--format", fmt]
        if config:
            self.cmd += ["--config", config]
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, float] = {}  # pid -> create_time of every process of the tree

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(p.pid, p.create_time())
        return procs

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 40) -> dict:
        if self.proc is None:
            return {}
        self.tree()
        t0 = time.perf_counter()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # rec serve: ray.shutdown() and exit
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        leftovers = []
        for pid, created in self.seen.items():  # only processes this stack started
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(p)
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(leftovers, timeout=10)
        return {
            "stop_s": round(time.perf_counter() - t0, 1),
            "exit_code": self.proc.returncode,
            "killed_leftovers": len(leftovers),
        }


class CpuMeter:
    """CPU seconds used by this client, the stack's processes and the whole machine."""

    def __init__(self, stack: Stack | None) -> None:
        self.stack = stack

    def snap(self) -> dict:
        server = {}
        for p in self.stack.tree() if self.stack else []:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                server[p.pid] = t.user + t.system
        m = psutil.cpu_times()  # guest time is counted in user already
        busy = (
            m.user
            + m.nice
            + m.system
            + sum(getattr(m, f, 0.0) for f in ("irq", "softirq", "steal"))
        )
        return {
            "wall": time.perf_counter(),
            "client": time.process_time(),
            "server": server,
            "busy": busy,
        }

    def delta(self, a: dict, b: dict) -> dict:
        wall = b["wall"] - a["wall"]
        client = b["client"] - a["client"]
        server = sum(v - a["server"].get(pid, 0.0) for pid, v in b["server"].items())
        busy = b["busy"] - a["busy"]
        out = {
            "client_s": round(client, 2),
            "client_share": round(client / wall, 3),
            "machine_busy_share": round(busy / wall, 3),
        }
        if self.stack:
            out |= {
                "server_s": round(server, 2),
                "server_share": round(server / wall, 3),
                "other_share": round(max(busy - client - server, 0.0) / wall, 3),
            }
        return out


# ---- the run -------------------------------------------------------------------------------------


class Run:
    def __init__(
        self,
        args,
        clients: dict[str, lc.Client],
        pop: lc.Population,
        stack: Stack | None,
        results: dict,
        deadline: float,
    ) -> None:
        # clients: "rec" and "floor" (the path under test: direct ingress or the proxy) and
        # "proxy" (Serve's proxy, for the comparison rows)
        self.clients, self.c = clients, clients["rec"]
        self.args, self.pop, self.stack = args, pop, stack
        self.results, self.deadline = results, deadline
        self.cpu = CpuMeter(stack)

    # helpers

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, need_s: float, what: str) -> bool:
        if self.left() >= need_s:
            return True
        self.results.setdefault("skipped", []).append(
            f"{what}: needs ~{need_s:.0f} s, {self.left():.0f} s left in the budget"
        )
        print(f"  skipped {what} (budget)")
        return False

    def add(self, row: dict) -> None:
        self.results["scenarios"].append(row)
        extra = f", {row['events_per_s']:.0f} events/s" if row.get("events_per_s") else ""
        cpu = row.get("cpu", {})
        print(
            f"  {row['name']:<17} c={row['concurrency']!s:<4} {row['rps']:7.1f} req/s"
            f"{extra}  p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms"
            f"  errors {row['errors']}  client CPU {cpu.get('client_share', 0):.0%}"
            f"  server CPU {cpu.get('server_share', 0):.0%}",
            flush=True,
        )
        write_results(self.results, final=False)

    async def closed(
        self, name: str, n: int, step_factory, seconds: float | None = None, **extra
    ) -> dict:
        """A closed-loop scenario with one main tally; step_factory(tally) -> step."""
        tally = lc.Tally()
        a = self.cpu.snap()
        _, wall = await lc.closed_loop(
            n, seconds or self.args.seconds, self.args.warmup, step_factory(tally)
        )
        b = self.cpu.snap()
        row = report.scenario_row(
            name, n, wall, tally.latencies_ms, tally.errors, cpu=self.cpu.delta(a, b), **extra
        )
        if tally.units:
            row["events_per_s"] = round(tally.units / wall, 1)
        if tally.error_examples:
            row["error_examples"] = tally.error_examples
        self.add(row)
        return row

    def per_run(self) -> float:
        return self.args.seconds + self.args.warmup + 2

    # scenarios

    async def floor(self) -> None:
        floor = self.clients["floor"]
        status, _, _ = await floor.call("GET", "/floor")
        if status != 200:
            self.results.setdefault("skipped", []).append(f"floor: GET /floor answered {status}")
            return
        for n in CONCURRENCY:
            if self.fits(self.per_run(), f"floor@{n}"):
                await self.closed("floor", n, lambda t: lc.floor_step(floor, t))
        proxy = self.clients["proxy"]
        if floor is not proxy and self.fits(self.per_run(), "floor-proxy@8"):
            await self.closed("floor-proxy", 8, lambda t: lc.floor_step(proxy, t))

    async def prime_active_users(
        self, n_known: int = 100, n_new: int = 100, per_user: int = 5
    ) -> None:
        """Users who acted after the model was trained: known users with fresh events and
        users the model has never seen; the 'just active' part of the user mix."""
        import random

        rng = random.Random(11)
        users = {self.pop.known_user(rng) for _ in range(n_known * 3)}
        users = sorted(users)[:n_known] + [
            f"live-{self.results['run_id']}-{i}" for i in range(n_new)
        ]
        events = [self.pop.event(rng, u) for u in users for _ in range(per_user)]
        status, data = await self.c.post_json("/events", {"events": events})
        if status != 200:
            raise RuntimeError(f"priming events: {status} {data[:200]!r}")
        self.pop.active = users
        self.primed = [EventIn(**e).to_record(time.time()) for e in events]

    async def recommend(
        self,
        name: str = "recommend",
        n: int = 8,
        seconds: float | None = None,
        client: lc.Client | None = None,
    ) -> dict:
        tallies: dict[str, lc.Tally] = {}
        a = self.cpu.snap()
        _, wall = await lc.closed_loop(
            n,
            seconds or self.args.seconds,
            self.args.warmup,
            lc.recommend_step(client or self.c, self.pop, tallies),
        )
        b = self.cpu.snap()
        t = tallies.get("all", lc.Tally())
        by_kind = {
            k: {
                "requests": len(v.latencies_ms) + v.errors,
                "errors": v.errors,
                **report.latency_stats(v.latencies_ms),
            }
            for k, v in sorted(tallies.items())
            if k != "all"
        }
        row = report.scenario_row(
            name, n, wall, t.latencies_ms, t.errors, cpu=self.cpu.delta(a, b), by_user_kind=by_kind
        )
        if t.error_examples:
            row["error_examples"] = t.error_examples
        self.add(row)
        return row

    async def recommend_all(self) -> None:
        for n in CONCURRENCY:
            if self.fits(self.per_run(), f"recommend@{n}"):
                await self.recommend("recommend", n)
        proxy = self.clients["proxy"]
        if self.c is not proxy and self.fits(self.per_run(), "recommend-proxy@8"):
            await self.recommend("recommend-proxy", 8, client=proxy)

    async def pipeline(self) -> None:
        """The in-process pipeline on this run's model, data and request mix (the stack idles
        meanwhile): needs the stack's data dir, so not with --attach."""
        if self.stack is None:
            self.results.setdefault("skipped", []).append("pipeline: needs the local stack")
            return
        if not self.fits(self.per_run() + 30, "pipeline"):
            return
        from deployments.cli import dataset_records
        from rec.config import RecConfig

        config = RecConfig.from_yaml(self.args.config) if self.args.config else RecConfig()
        config.data_dir = self.stack.data_dir.resolve()
        records = dataset_records(self.args.data, self.args.format, config.seed) + self.primed
        a = self.cpu.snap()
        row = await asyncio.to_thread(
            pipeline.measure, config, records, self.pop, self.args.seconds, self.args.warmup
        )
        row["cpu"] = self.cpu.delta(a, self.cpu.snap())
        self.add(row)

    async def mixed(self) -> None:
        for n in CONCURRENCY:
            if not self.fits(self.per_run(), f"mixed@{n}"):
                continue
            rec, ev, fresh = lc.Tally(), lc.Tally(), lc.Freshness()
            a = self.cpu.snap()
            _, wall = await lc.closed_loop(
                n,
                self.args.seconds,
                self.args.warmup,
                lc.mixed_step(self.c, self.pop, rec, ev, fresh),
            )
            b = self.cpu.snap()
            lat = rec.latencies_ms + ev.latencies_ms
            row = report.scenario_row(
                "mixed",
                n,
                wall,
                lat,
                rec.errors + ev.errors,
                cpu=self.cpu.delta(a, b),
                by_kind={
                    k: {
                        "requests": len(t.latencies_ms) + t.errors,
                        "errors": t.errors,
                        **report.latency_stats(t.latencies_ms),
                    }
                    for k, t in (("recommend", rec), ("events", ev))
                },
                freshness={
                    "samples": len(fresh.ms) + fresh.never,
                    "stale_first_reads": fresh.stale_first_reads,
                    "never_reflected": fresh.never,
                    **report.latency_stats(fresh.ms),
                },
            )
            if rec.error_examples or ev.error_examples:
                row["error_examples"] = rec.error_examples + ev.error_examples
            self.add(row)

    async def push(self, n: int = 8, n_streams: int = 20, timeout_s: float = 5.0) -> None:
        if not self.fits(self.per_run() + 5, f"push@{n}"):
            return
        import random

        rng = random.Random(13)
        users = sorted({self.pop.known_user(rng) for _ in range(n_streams * 4)})[:n_streams]
        rec, ev, clicks = lc.Tally(), lc.Tally(), lc.Tally()
        streams = lc.Streams(self.clients["proxy"], users)
        pushes = streams.pushes
        await streams.open(timeout_s=30)
        try:
            a = self.cpu.snap()
            _, wall = await lc.closed_loop(
                n + 1,  # n mixed clients and the one that clicks for the streamed users
                self.args.seconds,
                self.args.warmup,
                _either(
                    lc.mixed_step(self.c, self.pop, rec, ev, lc.Freshness()),
                    # the clicks take the run's path (direct ingress): through the proxy they
                    # would wait behind it for a free slot (docs/ray-notes.md)
                    lc.push_step(self.c, users, pushes, clicks, timeout_s, pace_s=0.1),
                ),
            )
            b = self.cpu.snap()
        finally:
            await streams.close()
        row = report.scenario_row(
            "push",
            n,
            wall,
            pushes.ms,
            pushes.never + clicks.errors + len(streams.trace),  # trace: streams that ended
            cpu=self.cpu.delta(a, b),
            measures="POST /events answer -> list pushed on the user's stream reflecting it",
            streams=len(users),
            lists_received=pushes.messages,
            never_pushed=pushes.never,
            by_kind={
                k: {
                    "requests": len(t.latencies_ms) + t.errors,
                    "errors": t.errors,
                    **report.latency_stats(t.latencies_ms),
                }
                for k, t in (("recommend", rec), ("events", ev), ("clicks", clicks))
            },
        )
        if streams.trace:
            row["error_examples"] = [how for _, how in streams.trace[:3]]
        self.add(row)

    async def new_items(self, trials: int = 5, timeout_s: float = 10.0) -> None:
        if not self.fits(trials * 3 + 5, "new items"):
            return
        import random

        rng = random.Random(5)
        seconds, not_seen = [], 0
        for i in range(trials):
            item = {
                "item_id": f"lt-new-{self.results['run_id']}-{i}",
                "category": rng.choice(self.pop.categories) if self.pop.categories else None,
                "tags": ["loadtest"],
                "title": f"load-test item {i}",
            }
            s = await lc.new_item_trial(self.c, item, self.pop.users[i * 7], timeout_s)
            if s is None:
                not_seen += 1
            else:
                seconds.append(round(s, 4))
            await self.c.call("DELETE", f"/items/{quote(item['item_id'], safe='')}")
        self.results["new_items"] = {
            "seconds": seconds,
            "not_seen": not_seen,
            "timeout_s": timeout_s,
            "poll_interval_s": 0.02,
            "how": "POST /items answer -> first GET /recommend (k=10, "
            "a known user) whose items include it",
        }
        print(f"  new items: {seconds} s, {not_seen} not seen", flush=True)

    async def retrain(self) -> None:
        events_s = 5 * self.per_run() if "events" in self.only else 0
        if not self.fits(self.per_run() + 120 + events_s, "retrain"):
            return
        await self.recommend("retrain-baseline", 8)
        status, data, _ = await self.c.call("GET", "/models")
        old = json.loads(data)["serving"] if status == 200 else None
        stop = asyncio.Event()
        info: dict = {"swapped": False}
        events_s = 5 * self.per_run() if "events" in self.only else 0
        max_s = min(300.0, self.left() - events_s - 10)  # events come after: leave them time

        async def watch() -> None:
            await asyncio.sleep(self.args.warmup)
            t0 = info["posted_at"] = time.perf_counter()
            status, data, _ = await self.c.call(  # answers once the new version is published
                "POST",
                "/admin/retrain?wait=true",
                headers={"X-API-Key": self.args.api_key},
                timeout_s=max_s,
            )
            info["retrain_answer"] = status
            if status != 200:
                info["error"] = data[:300].decode(errors="replace")
                stop.set()
                return
            info["published_s"] = round(time.perf_counter() - t0, 1)
            while time.perf_counter() - t0 < max_s:
                status, data, _ = await self.c.call("GET", "/models")
                if status == 200 and json.loads(data)["serving"] not in (old, None):
                    info.update(
                        swapped=True,
                        train_s=round(time.perf_counter() - t0, 1),
                        new_version=json.loads(data)["serving"],
                    )
                    await asyncio.sleep(3.0)  # keep the load on through and after the swap
                    break
                await asyncio.sleep(0.25)
            stop.set()

        tallies: dict[str, lc.Tally] = {}
        watcher = asyncio.create_task(watch())
        a = self.cpu.snap()
        _, wall = await lc.closed_loop(
            8,
            0,
            self.args.warmup,
            lc.recommend_step(self.c, self.pop, tallies),
            stop=stop,
            max_seconds=max_s,
        )
        b = self.cpu.snap()
        watcher.cancel()
        t = tallies.get("all", lc.Tally())
        posted = info.pop("posted_at", None)
        if posted is not None:  # latency from the POST on, 10 s a line (the swap is at train_s)
            info["timeline"] = report.timeline(t.started, t.latencies_ms, posted)
        row = report.scenario_row(
            "retrain",
            8,
            wall,
            t.latencies_ms,
            t.errors,
            cpu=self.cpu.delta(a, b),
            old_version=old,
            **info,
        )
        if t.error_examples:
            row["error_examples"] = t.error_examples
        self.add(row)

    async def overload(self) -> None:
        rows = [
            r
            for r in self.results["scenarios"]
            if r["name"] == "recommend" and r["concurrency"] in (8, 32)
        ]
        probe_s = 0.0 if self.args.capacity else CAPACITY_PROBE_S + self.args.warmup
        if not self.fits(self.args.overload_seconds + self.per_run() + probe_s + 10, "overload"):
            return
        import random

        earlier = max((r["rps"] for r in rows), default=None)
        # 3× the capacity now (a scenario row of its own): the recommend scenarios ran minutes
        # before, and this VM's speed drifts by a third within minutes (the floor through the
        # proxy: 189–343 req/s across runs); 3× a faster phase's rate offered 4–5× the capacity
        # at the time, and the load client itself, on the same cores, sent late by p99 222 ms.
        capacity = (
            self.args.capacity
            or (await self.recommend("overload-capacity", 8, seconds=CAPACITY_PROBE_S))["rps"]
        )
        rate = 3 * capacity
        rng = random.Random(3)
        accepted, rejected, other, lag = [], [], lc.Tally(), []
        in_flight = {"now": 0, "max": 0}

        async def fire(due: float) -> None:
            lag.append((time.perf_counter() - due) * 1000)  # the client's own delay
            _, user = self.pop.user_mix(rng)
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            status, data, _ = await self.c.call("GET", self.c.recommend_path(user))
            in_flight["now"] -= 1
            ms = (time.perf_counter() - due) * 1000  # from the scheduled time: no omission
            if status == 200:
                accepted.append(ms)
            elif status == 503:
                rejected.append(ms)
            else:
                other.add(status, ms, why=data[:200].decode(errors="replace"))

        a = self.cpu.snap()
        t0 = time.perf_counter()
        offered = await lc.open_loop(rate, self.args.overload_seconds, fire)
        wall = time.perf_counter() - t0
        b = self.cpu.snap()
        row = report.scenario_row(
            "overload",
            None,
            wall,
            accepted,
            other.errors,
            cpu=self.cpu.delta(a, b),
            open_loop=True,
            capacity_rps=capacity,
            capacity_earlier_rps=earlier,
            offered_rps=round(offered / wall, 1),
            offered=offered,
            accepted=len(accepted),
            max_in_flight=in_flight["max"],
            rejected={"count": len(rejected), **report.latency_stats(rejected)},
            client_send_lag=report.latency_stats(lag),
        )
        row["rps"] = round(len(accepted) / wall, 1)  # goodput; rejected ones are listed apart
        row["requests"] = offered
        if other.error_examples:
            row["error_examples"] = other.error_examples
        self.add(row)
        await asyncio.sleep(1.0)
        await self.recommend("recovery", 8, seconds=min(self.args.seconds, 10))

    async def events(self) -> None:
        for n in CONCURRENCY:
            if self.fits(self.per_run(), f"events-single@{n}"):
                await self.closed(
                    "events-single", n, lambda t: lc.event_single_step(self.c, self.pop, t)
                )
        bodies = lc.batch_bodies(self.pop, 16, self.args.batch_size)
        for n in (1, 4):  # at most 10 s each: tens of thousands of events a second pile up
            if self.fits(self.per_run(), f"events-batch@{n}"):
                await self.closed(
                    "events-batch",
                    n,
                    lambda t: lc.event_batch_step(self.c, bodies, t),
                    seconds=min(self.args.seconds, 10.0),
                    batch_size=self.args.batch_size,
                )

    async def all(self, only: set[str]) -> None:
        self.only = only
        await self.prime_active_users()
        steps = {
            "floor": self.floor,
            "recommend": self.recommend_all,
            "pipeline": self.pipeline,
            "mixed": self.mixed,
            "push": self.push,
            "new_items": self.new_items,
            "retrain": self.retrain,
            "overload": self.overload,
            "events": self.events,
        }
        for name in SCENARIOS:  # the order matters: events last (the log grows most there)
            if name in only:
                print(f"[{name}]", flush=True)
                await steps[name]()


def _either(mixed, push):
    """Worker 0 runs `push`, the others `mixed`."""

    async def step(w, rng, win):
        await (push if w == 0 else mixed)(w, rng, win)

    return step


# ---- results -------------------------------------------------------------------------------------


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores ({model}), "
        f"{mem:.0f} GiB, Python {platform.python_version()}"
    )


def write_results(results: dict, final: bool = True) -> None:
    RESULTS.mkdir(exist_ok=True)
    if final:
        results["targets"] = report.evaluate_targets(results)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    if final:
        (RESULTS / "summary.md").write_text(report.to_markdown(results))
        report.plot(results, RESULTS / "latency.png")


def load_population(data: str | None, fmt: str, seed: int) -> lc.Population:
    from rec import data as rdata

    ds = rdata.generate(seed=seed) if data is None else rdata.load(data, fmt)
    if isinstance(ds, tuple):  # lightgcn: rec serve loads the train part
        ds = ds[0]
    return lc.Population.from_dataset(ds)


def ray_settings(config_path: str | None, replicas: int) -> dict:
    from deployments.runtime import ENV, INGRESS_MAX_ONGOING, MAX_QUEUED
    from rec.config import RecConfig

    config = RecConfig.from_yaml(config_path) if config_path else RecConfig()
    s, t = config.serving, config.train
    settings = {
        "topology": s.topology,
        "ingress_replicas": replicas,
        "replica_cpus": s.replica_cpus,
        "max_ongoing_requests": INGRESS_MAX_ONGOING[s.topology],
        "max_queued_requests": MAX_QUEUED,
        "ann_shards": s.ann_shards,
        "log_impressions": s.log_impressions,
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"],
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": ENV[
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
        ],
        "index": config.recall.index,
        "access_log": ENV["RAY_SERVE_ENABLE_ACCESS_LOG"] == "1",
        "train_cpus_per_worker": t.cpus_per_worker,
        "train_worker_threads": t.worker_threads,
        "dashboard": True,
    }
    return settings


def client_key(args: argparse.Namespace) -> str:
    """The admin key the load test sends. A stack it starts gets REC_API_KEY (a fresh one
    unless set) through the environment it inherits."""
    if not args.attach:
        return os.environ.setdefault(ENV_KEY, secrets.token_urlsafe(24))
    if args.api_key or os.environ.get(ENV_KEY):
        return args.api_key or os.environ[ENV_KEY]
    stored = Path(args.targets).parent / KEY_FILE if args.targets else None
    if stored is not None and stored.exists():
        return stored.read_text().strip()
    return ""  # reads are open by default; writes will answer 401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="data set to load (default: the generated demo data)")
    p.add_argument("--format", default="csv", choices=["csv", "movielens", "lightgcn"])
    p.add_argument("--config", help="RecConfig YAML for the stack (defaults otherwise)")
    p.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("LOADTEST_SECONDS", 15)),
        help="measured seconds per scenario (env LOADTEST_SECONDS; default 15)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    p.add_argument(
        "--overload-seconds",
        type=float,
        default=None,
        help="open-loop overload length (default: --seconds, at most 10)",
    )
    p.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="recommend req/s the overload triples (default: recommend@8 measured just before)",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="events per batched POST")
    p.add_argument("--budget", type=float, default=900, help="the whole run, in seconds")
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="ingress replicas of rec and of the floor (rec serve --replicas)",
    )
    p.add_argument("--port", type=int, default=0, help="stack port (default: a free one)")
    p.add_argument(
        "--attach", metavar="URL", help="use a stack already running at URL instead of starting one"
    )
    p.add_argument(
        "--via",
        choices=["direct", "proxy"],
        default="direct",
        help="direct: the replicas' direct-ingress ports, each request to the one "
        "with the fewest in flight (what a load balancer in front of Serve does; "
        "default); proxy: Serve's proxy only",
    )
    p.add_argument(
        "--targets",
        metavar="FILE",
        help="with --attach: the stack's targets.json (direct-ingress URLs)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="with --attach: an admin key of the stack (default: $REC_API_KEY, else the "
        "api_key file `rec serve` generated beside --targets)",
    )
    args = p.parse_args(argv)
    if args.overload_seconds is None:
        args.overload_seconds = min(args.seconds, 10.0)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - set(SCENARIOS):
        p.error(f"unknown scenarios {sorted(only - set(SCENARIOS))}")

    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on `kill` / `timeout` too
    t_start = time.monotonic()
    deadline = t_start + args.budget - STOP_RESERVE_S
    settings = ray_settings(args.config, args.replicas)
    args.api_key = client_key(args)
    results = {
        "machine": machine(),
        "scenarios": [],
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_id": f"{int(time.time())}",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "ray_settings": settings,
        "data": args.data or "generated (rec.data.generate)",
        "client": {
            "kind": "asyncio + aiohttp + uvloop, closed loop (open loop for "
            "overload), one process on the same machine",
            "seconds_per_scenario": args.seconds,
            "warmup_s": args.warmup,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    print("loading the data set's users and items ...", flush=True)
    pop = load_population(args.data, args.format, 0)
    gc.freeze()  # what the client loaded lives to the end: its collector need not walk it
    stack = None
    if args.attach:
        url = args.attach
    else:
        stack = Stack(
            args.port or free_port(),
            ROOT / "var" / "loadtest",
            args.data,
            args.format,
            args.config,
            args.replicas,
            RESULTS / "server.log",
        )
        url = stack.url
    rc = 0
    try:
        if stack:
            print(f"starting the stack at {url} (log: {stack.log_path}) ...", flush=True)
            stack.start()
        uvloop_run(_run(args, url, pop, stack, results, deadline, only, t_start))
    except Exception as exc:
        rc = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    except KeyboardInterrupt:
        rc = 130
        results["error"] = "interrupted"
    finally:
        if stack:
            print("stopping the stack ...", flush=True)
            results["stack"] = {**results.get("stack", {}), **stack.stop()}
        results["total_s"] = round(time.monotonic() - t_start, 1)
        write_results(results)
    print((RESULTS / "summary.md").read_text())
    print(f"wrote {RESULTS / 'latest.json'}, summary.md, latency.png in {results['total_s']:.0f} s")
    return rc


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def uvloop_run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _run(
    args,
    url: str,
    pop: lc.Population,
    stack: Stack | None,
    results: dict,
    deadline: float,
    only: set[str],
    t_start: float,
) -> None:
    async with lc.Client(url, args.api_key) as proxy, contextlib.AsyncExitStack() as more:
        ready_by = time.monotonic() + min(600.0, deadline - time.monotonic())
        while stack is not None:
            status, _, _ = await proxy.call("GET", "/readyz")
            if status == 200:
                break
            if not stack.alive():
                raise RuntimeError(
                    f"rec serve exited ({stack.proc.returncode}); see {stack.log_path}"
                )
            if time.monotonic() > ready_by:
                raise TimeoutError("the stack was not ready in time")
            await asyncio.sleep(1.0)
        await proxy.wait_ready(["/readyz"], 60)
        results["stack"] = {"ready_s": round(time.monotonic() - t_start, 1), "url": url}
        print(f"stack ready in {results['stack']['ready_s']} s", flush=True)
        clients = {"rec": proxy, "floor": proxy, "proxy": proxy}
        if args.via == "direct":
            path = (
                Path(args.targets)
                if args.targets
                else (stack.data_dir / TARGETS_FILE if stack else None)
            )
            targets = await read_targets(path, ("rec", "floor") if "floor" in only else ("rec",))
            for app, urls in targets.items():
                clients[app] = await more.enter_async_context(lc.Client(urls, args.api_key))
            results["stack"]["direct_ingress"] = targets
            if "rec" not in targets:
                results.setdefault("skipped", []).append(
                    f"direct ingress: no targets in {path}; every scenario went through the proxy"
                )
        results["path"] = "direct ingress" if clients["rec"] is not proxy else "proxy"
        print(f"requests go through: {results['path']}", flush=True)
        run = Run(args, clients, pop, stack, results, deadline)
        try:
            await asyncio.wait_for(run.all(only), max(deadline - time.monotonic(), 1))
        except TimeoutError:
            results.setdefault("skipped", []).append("the budget ran out mid-scenario")


async def read_targets(
    path: Path | None, apps: tuple[str, ...], timeout_s: float = 30.0
) -> dict[str, list[str]]:
    """The direct-ingress URLs `rec serve` keeps in its data dir (deployments.cli), once they
    list every app in `apps` (or what is there after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    targets: dict[str, list[str]] = {}
    while path is not None:
        with contextlib.suppress(OSError, ValueError):
            targets = json.loads(path.read_text())
        if all(app in targets for app in apps) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return {app: urls for app, urls in targets.items() if app in apps and urls}


if __name__ == "__main__":
    sys.exit(main())
