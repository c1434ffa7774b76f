"""`make chaos`: one fault at a time under the `mixed` load at 8 clients, each scenario on a
stack of its own topology, reported like the load test (loadtest/results/chaos.json and
chaos.md).

Scenarios (fused: the default topology; split: Aggregator -> Profile -> Recall -> Ranker with
`ann_shards: 2`):
  ingress   ray.kill of one ingress replica (fused and split); Serve starts a replacement
  log       SIGKILL of the event-log actor's process; Ray restarts it, the log cuts a torn tail
  shard     SIGKILL of index shard actor 0 (split); it restarts and reloads the served version
  trainer   SIGKILL of the trainer actor in the middle of a retrain (fused); then a retrain
            must publish, and the served version must not change before it
  proxy     ray.kill of Serve's HTTP proxy (fused), the load through it; the controller
            starts another
  proxy_direct  the same, the load on the direct-ingress path (the proxy is not on it)
  pusher    ray.kill of the /stream app's replica (fused) with STREAMS streams open through
            the proxy, each reopened with the page's backoff; every stream must get a list
            again, and after that a click must be pushed to its user's stream

Requests go where a load balancer in front of Serve sends them: the ingress replicas' direct
ports (the client balances over them, resends a request whose connection was refused, and
rereads the replicas' URLs from the stack's targets.json every second), except in the proxy
scenario, whose load goes through the proxy (Serve's HTTP port), the one thing it can hurt.

For each: requests and failed requests (non-200 answers and transport errors), the failures
outside the fault's first second (target: at most 0.1% of the scenario's requests), the time
from the fault to the last failure (target: 10 s at most), and acknowledged events lost:
every event the load posted carries a request_id, and every one whose POST got a 200 must be
in the log afterwards (read back through the log actor; target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import client as lc
from loadtest import report
from loadtest.run import (
    RESULTS,
    ROOT,
    Stack,
    client_key,
    free_port,
    load_population,
    machine,
    uvloop_run,
)

BEFORE_S = 8.0  # load before the fault
AFTER_S = 20.0  # load after it (the trainer scenario runs on until its next retrain published)
CLIENTS = 8
EVENT_SHARE = 0.10
FIRST_S = 1.0  # failures in the fault's first second are the fault's own, not counted
TARGET_FAILED_SHARE = 0.001
TARGET_RECOVERY_S = 10.0
STREAMS = 20  # open in the pusher scenario
PUSH_PROBES = 5  # clicks whose push is awaited once the streams are back
PUSH_TIMEOUT_S = 5.0
TOPOLOGIES = {
    "fused": ("ingress", "log", "trainer", "proxy", "proxy_direct", "pusher"),
    "split": ("ingress", "shard", "log"),
}


# ---- what a scenario's requests say (pure) ------------------------------------------------


@dataclass
class Answer:
    start: float  # seconds since the scenario began
    end: float
    kind: str  # "recommend" or "events"
    status: int  # -1: transport failure
    why: str = ""


def summarize(answers: list[Answer], t_fault: float, acked: set[str], logged: list[str]) -> dict:
    """The figures of one scenario: failures (all, and outside the fault's first second),
    recovery (fault -> end of the last failed request, 0 when none failed) and acknowledged
    events missing from the log or logged more than once."""
    failed = [a for a in answers if a.status != 200]
    late = [a for a in failed if a.start >= t_fault + FIRST_S or a.end < t_fault]
    after = [a for a in failed if a.end >= t_fault]
    recovery = max((a.end for a in after), default=t_fault) - t_fault
    seen = set(logged)
    out = {
        "requests": len(answers),
        "failed": len(failed),
        "failed_outside_first_s": len(late),
        "failed_share": round(len(late) / max(len(answers), 1), 5),
        "recovery_s": round(recovery, 2),
        "by_kind": {
            k: {
                "requests": sum(a.kind == k for a in answers),
                "failed": sum(a.kind == k for a in failed),
                **report.latency_stats(
                    [(a.end - a.start) * 1000 for a in answers if a.kind == k and a.status == 200]
                ),
            }
            for k in ("recommend", "events")
        },
        "events_acked": len(acked),
        "events_lost": len(acked - seen),
        "events_logged_twice": len(logged) - len(seen),
        "failure_examples": sorted({f"{a.status} {a.why}"[:160] for a in failed})[:5],
    }
    out["targets_met"] = (
        out["failed_share"] <= TARGET_FAILED_SHARE
        and out["recovery_s"] <= TARGET_RECOVERY_S
        and out["events_lost"] == 0
    )
    return out


# ---- the load ------------------------------------------------------------------------------


@dataclass
class Load:
    """`mixed` at CLIENTS clients: 90% GET /recommend over the user mix, 10% POST /events (a
    click on an item the user was shown), each event with a request_id of its own."""

    client: lc.Client
    pop: lc.Population
    tag: str
    t0: float = field(default_factory=time.perf_counter)
    answers: list[Answer] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def worker(self, w: int) -> None:
        rng = random.Random(f"{self.tag}-{w}")
        shown: dict[str, str] = {}
        for n in range(10**9):
            if self.stop.is_set():
                return
            start = self.now()
            if shown and rng.random() < EVENT_SHARE:
                user, item = shown.popitem()
                rid = f"{self.tag}-{w}-{n}"
                body = {"user_id": user, "item_id": item, "type": "click", "request_id": rid}
                status, data = await self.client.post_json("/events", body)
                kind = "events"
                if status == 200:
                    self.acked.add(rid)
            else:
                kind, user = self.pop.user_mix(rng)
                status, data, _ = await self.client.call("GET", self.client.recommend_path(user))
                if status == 200 and kind != "cold" and len(shown) < 64:
                    items = json.loads(data)["items"]
                    if items:
                        shown[user] = items[0]["item_id"]
                kind = "recommend"
            why = "" if status == 200 else data[:200].decode(errors="replace")
            self.answers.append(Answer(start, self.now(), kind, status, why))
            if status != 200:
                await asyncio.sleep(0.01)  # a failing stack is not hammered in a tight loop

    async def run(self, until: asyncio.Future) -> None:
        workers = [asyncio.create_task(self.worker(w)) for w in range(CLIENTS)]
        try:
            await until
        finally:
            self.stop.set()
            await asyncio.gather(*workers, return_exceptions=True)


async def follow_targets(client: lc.Client, path: Path, stop: asyncio.Event) -> None:
    """Reread the direct-ingress URLs every second (rec serve rewrites them when replicas
    restart on new ports), as Serve's HAProxy mode follows the controller's target groups."""
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            urls = json.loads(path.read_text()).get("rec")
            if urls:
                client.set_bases(urls)
        await asyncio.sleep(1.0)


# ---- faults (a Ray driver attached to the stack's cluster) ---------------------------------


def attach() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)


def actor_pid(name: str, namespace: str) -> int | None:
    from ray.util.state import list_actors

    rows = list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")], detail=True)
    return next((r.pid for r in rows if r.ray_namespace == namespace), None)


def named(prefix: str, namespace: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith(prefix)
    )


def wait_until(condition, timeout_s: float, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = condition()
            if value:
                return value
        time.sleep(interval_s)
    return None


def ingress_replicas() -> list[str]:
    return named("SERVE_REPLICA::rec#Aggregator#", "serve")


def kill_ingress() -> dict:
    import ray

    before = ingress_replicas()
    victim = before[0]
    t0 = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"))
    back = wait_until(
        lambda: len(r := ingress_replicas()) == len(before) and victim not in r and r, 60
    )
    return {
        "killed": victim.split("#", 1)[1],
        "replaced_s": round(time.monotonic() - t0, 1) if back else None,
    }


def sigkill_log() -> dict:
    import ray

    from deployments.eventlog import get_log

    log = get_log()
    before = ray.get(log.recovery.remote())
    t0 = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_until(
        lambda: (r := ray.get(log.recovery.remote(), timeout=5))["pid"] != before["pid"] and r, 60
    )
    return {
        "pid": before["pid"],
        "restarted_s": round(time.monotonic() - t0, 1) if after else None,
        "torn_tail_bytes_cut": after["bytes_cut"] if after else None,
    }


def sigkill_shard() -> dict:
    name = "rec_index_shard_0"
    pid = actor_pid(name, "rec")
    if pid is None:
        raise RuntimeError(f"no live actor {name}")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    new = wait_until(lambda: (p := actor_pid(name, "rec")) not in (None, pid) and p, 60)
    return {"pid": pid, "restarted_s": round(time.monotonic() - t0, 1) if new else None}


def pusher_replicas() -> list[str]:
    from deployments.push import APP_NAME

    return named(f"SERVE_REPLICA::{APP_NAME}#Pusher#", "serve")


def kill_pusher() -> dict:
    import ray

    victim = pusher_replicas()[0]
    t0 = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"))
    back = wait_until(lambda: (r := pusher_replicas()) and victim not in r, 60)
    return {"replaced_s": round(time.monotonic() - t0, 1) if back else None}


def kill_proxy() -> dict:
    import ray

    before = named("SERVE_PROXY_ACTOR", "serve")
    victim = before[0]
    pid = actor_pid(victim, "serve")
    t0 = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"))
    new = wait_until(lambda: (p := actor_pid(victim, "serve")) not in (None, pid) and p, 60)
    return {"restarted_s": round(time.monotonic() - t0, 1) if new else None}


def trainer_leftovers(data_dir: Path) -> dict:
    """What a killed retrain may leave: snapshots, half-written versions, Train runs of
    versions never saved, and Ray Train workers still alive."""
    from ray.util.state import list_actors

    models, runs = data_dir / "models", data_dir / "ray_train"
    workers = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    return {
        "snapshots": sorted(p.name for p in (data_dir / "snapshots").glob("*")),
        "half_written_versions": sorted(p.name for p in models.glob(".*.tmp")),
        "runs_without_version": sorted(
            p.name for p in runs.glob("v*") if not (models / p.name / "meta.json").exists()
        ),
        "train_workers_alive": sum("RayTrainWorker" in (w.class_name or "") for w in workers),
    }


# ---- one scenario ------------------------------------------------------------------------


class Chaos:
    def __init__(self, args, pop: lc.Population, results: dict) -> None:
        self.args, self.pop, self.results = args, pop, results

    async def scenario(self, topology: str, fault: str, stack: Stack, clients: dict) -> dict:
        import ray

        from deployments.eventlog import get_log

        log = get_log()
        start_offset = ray.get(log.next_offset.remote())
        client = clients["proxy" if fault == "proxy" else "rec"]
        load = Load(client, self.pop, f"chaos-{topology}-{fault}-{self.results['run_id']}")
        info: dict = {}
        streams = Streamed(clients["proxy"], self.pop, load.tag) if fault == "pusher" else None
        if streams:
            await streams.open()
        done = asyncio.get_running_loop().create_future()

        async def drive() -> None:
            try:
                await asyncio.sleep(BEFORE_S)
                info["t_fault"] = load.now()
                if fault == "trainer":
                    info.update(await self.trainer_fault(stack, clients["proxy"], load))
                else:
                    kill = {
                        "ingress": kill_ingress,
                        "log": sigkill_log,
                        "shard": sigkill_shard,
                        "proxy": kill_proxy,
                        "proxy_direct": kill_proxy,
                        "pusher": kill_pusher,
                    }[fault]
                    info.update(await asyncio.to_thread(kill))
                    await asyncio.sleep(max(AFTER_S - (load.now() - info["t_fault"]), 0))
            except Exception as exc:
                info["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                done.set_result(None)

        driver = asyncio.create_task(drive())
        await load.run(done)
        await driver
        if fault == "trainer" and "error" not in info:
            info["retrain_after"] = await self.retrain_after(clients["proxy"])
        t_fault = info.pop("t_fault", BEFORE_S)
        if streams:
            try:
                info["streams"] = await streams.check(load.t0 + t_fault, clients["rec"])
            finally:
                await streams.close()
        logged = await asyncio.to_thread(read_request_ids, start_offset, load.tag)
        row = {
            "topology": topology,
            "fault": fault,
            "path": "proxy" if fault == "proxy" else "direct ingress",
            "seconds": round(load.now(), 1),
            "fault_at_s": round(t_fault, 1),
            **summarize(load.answers, t_fault, load.acked, logged),
            "failovers": client.failovers,
            "timeline": timeline(load.answers, t_fault),
            **info,
        }
        if streams:
            row["targets_met"] = row["targets_met"] and info["streams"]["met"]
        client.failovers = 0
        return row

    async def trainer_fault(self, stack: Stack, admin: lc.Client, load: Load) -> dict:
        """Retrain, SIGKILL the trainer while the Ray Train job runs, check what it left and
        that nothing was published, then retrain again until the new version is served."""
        from deployments.trainer import TRAINER_ACTOR

        served = await served_version(admin)
        runs = stack.data_dir / "ray_train"
        before = set(runs.glob("v*"))
        status, data, _ = await admin.call("POST", "/admin/retrain")
        if status not in (200, 202):
            raise RuntimeError(f"POST /admin/retrain: {status} {data[:200]!r}")
        t_job = await asyncio.to_thread(  # this retrain's Ray Train run has started
            wait_until, lambda: set(runs.glob("v*")) - before and time.monotonic(), 120
        )
        await asyncio.sleep(5.0)  # into the job's training
        pid = await asyncio.to_thread(actor_pid, TRAINER_ACTOR, "rec")
        info = {"killed_after_job_start_s": round(time.monotonic() - t_job, 1) if t_job else None}
        info["t_fault"] = load.now()
        os.kill(pid, signal.SIGKILL)
        new = await asyncio.to_thread(
            wait_until, lambda: (p := actor_pid(TRAINER_ACTOR, "rec")) not in (None, pid) and p, 60
        )
        info["restarted_s"] = round(load.now() - info["t_fault"], 1) if new else None
        await asyncio.sleep(3.0)
        info["left_behind"] = await asyncio.to_thread(trainer_leftovers, stack.data_dir)
        info["served_unchanged"] = await served_version(admin) == served
        await asyncio.sleep(max(AFTER_S - (load.now() - info["t_fault"]), 0))
        return info

    async def retrain_after(self, admin: lc.Client) -> dict:
        """After the trainer's restart (the load stopped: a retrain under it takes minutes on
        2 cores): a retrain publishes, and the replicas serve it."""
        t0 = time.monotonic()
        status, data, _ = await admin.call("POST", "/admin/retrain?wait=true", timeout_s=600)
        published = json.loads(data).get("published") if status == 200 else None
        swapped = False
        while published and not swapped and time.monotonic() - t0 < 660:
            swapped = await served_version(admin) == published
            await asyncio.sleep(0.2)
        return {
            "status": status,
            "published": published,
            "served_s": round(time.monotonic() - t0, 1) if swapped else None,
        }


class Streamed(lc.Streams):
    """STREAMS known users' GET /stream through the proxy (the stream app's route)."""

    def __init__(self, proxy: lc.Client, pop: lc.Population, tag: str) -> None:
        rng = random.Random(tag)
        super().__init__(proxy, sorted({pop.known_user(rng) for _ in range(STREAMS * 4)})[:STREAMS])

    async def check(self, t_fault: float, direct: lc.Client) -> dict:
        """After the fault (perf_counter `t_fault`): when each stream had its list again (the
        first `connect` list after the fault), then PUSH_PROBES clicks posted on the direct
        path, each to be pushed to its user's stream within PUSH_TIMEOUT_S."""
        back = [
            min((t for t in self.pushes.connects.get(u, []) if t > t_fault), default=None)
            for u in self.users
        ]
        reopened = [t - t_fault for t in back if t is not None]
        probes = []
        for user in self.users[:PUSH_PROBES]:
            item = self.pushes.shown.get(user)
            body = {"user_id": user, "item_id": item, "type": "click"}
            status, data = await direct.post_json("/events", body)
            if status != 200:
                probes.append(None)
                continue
            acked = time.perf_counter()
            took = await self.pushes.answered(
                user, json.loads(data)["last_offset"], acked, PUSH_TIMEOUT_S
            )
            probes.append(None if took is None else round(took * 1000, 1))
        out = {
            "streams": len(self.users),
            "reopened": len(reopened),
            "reopened_s_max": round(max(reopened), 2) if reopened else None,
            "reopened_s_p50": round(sorted(reopened)[len(reopened) // 2], 2) if reopened else None,
            "connects": sum(len(v) for v in self.pushes.connects.values()),
            "attempts": attempts(self.trace, t_fault),
            "probe_push_ms": probes,
        }
        out["met"] = (
            out["reopened"] == len(self.users)
            and out["reopened_s_max"] <= TARGET_RECOVERY_S
            and None not in probes
        )
        return out


def attempts(trace: list[tuple[float, str]], t_fault: float) -> list[dict]:
    """How stream connections ended, per second from the fault: [{t_s, how, n}]."""
    counts: dict[tuple[int, str], int] = {}
    for t, how in trace:
        key = (int((t - t_fault) // 1), how)
        counts[key] = counts.get(key, 0) + 1
    return [{"t_s": t, "how": how, "n": n} for (t, how), n in sorted(counts.items())]


def read_request_ids(start: int, tag: str) -> list[str]:
    """request_ids of the log's events from `start` on that carry this scenario's tag."""
    import ray

    from deployments.eventlog import get_log

    log, out = get_log(), []
    while True:
        page = ray.get(log.read.remote(start, 20_000))
        if not page:
            return out
        out += [r["request_id"] for r in page if (r.get("request_id") or "").startswith(tag)]
        start = page[-1]["offset"] + 1


async def served_version(client: lc.Client) -> str | None:
    status, data, _ = await client.call("GET", "/models")
    return json.loads(data).get("serving") if status == 200 else None


def timeline(answers: list[Answer], t_fault: float, step_s: float = 1.0) -> list[dict]:
    """Requests and failures per second around the fault (seconds from it)."""
    buckets: dict[int, list[int]] = {}
    for a in answers:
        b = buckets.setdefault(int((a.start - t_fault) // step_s), [0, 0])
        b[0] += 1
        b[1] += a.status != 200
    return [
        {"t_s": k * step_s, "requests": n, "failed": f} for k, (n, f) in sorted(buckets.items())
    ]


# ---- the run -----------------------------------------------------------------------------


def config_file(topology: str, dest: Path) -> Path:
    """The stack's RecConfig: defaults, the topology, two index shards when split."""
    from rec.config import RecConfig

    config = RecConfig()
    config.serving.topology = topology
    if topology == "split":
        config.serving.ann_shards = 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    return dest


async def run_topology(
    args, topology: str, faults: tuple[str, ...], pop: lc.Population, results: dict
) -> None:
    work = ROOT / "var" / "chaos" / topology
    stack = local_stack(args, work, config_file(topology, work / "config.yaml"))
    print(f"[{topology}] starting the stack (log: {stack.log_path}) ...", flush=True)
    stack.start()
    stop = asyncio.Event()
    try:
        async with lc.Client(stack.url, args.api_key) as proxy:
            targets, urls = await started(stack, proxy)
            async with lc.Client(urls, args.api_key) as direct:
                follower = asyncio.create_task(follow_targets(direct, targets, stop))
                chaos = Chaos(args, pop, results)
                for fault in faults:
                    print(f"[{topology}] {fault} ...", flush=True)
                    row = await chaos.scenario(
                        topology, fault, stack, {"rec": direct, "proxy": proxy}
                    )
                    results["scenarios"].append(row)
                    print("  " + line(row), flush=True)
                    write(results, final=False)
                    await asyncio.sleep(3.0)  # settle between faults
                stop.set()
                await follower
    finally:
        stop.set()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        results.setdefault("stacks", {})[topology] = stack.stop()


def local_stack(args, work: Path, config: Path) -> Stack:
    """`rec serve` with 2 ingress replicas on a fresh data dir under `work`, no floor app."""
    return Stack(
        free_port(),
        work / "data",
        args.data,
        args.format,
        str(config),
        2,
        work / "server.log",
        floor=False,
    )


async def started(stack: Stack, proxy: lc.Client) -> tuple[Path, list[str]]:
    """Wait until the stack answers /readyz and lists its direct-ingress URLs, and attach
    this process to its Ray cluster; returns the targets file and the URLs."""
    from deployments.cli import TARGETS_FILE

    ready = time.monotonic() + 600
    while (await proxy.call("GET", "/readyz"))[0] != 200:
        if not stack.alive() or time.monotonic() > ready:
            raise RuntimeError(f"the stack did not start; see {stack.log_path}")
        await asyncio.sleep(1.0)
    targets = stack.data_dir / TARGETS_FILE
    urls = await wait_targets(targets)
    attach()
    return targets, urls


async def wait_targets(path: Path, timeout_s: float = 180.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            urls = json.loads(path.read_text()).get("rec")
            if urls and len(urls) >= 2:
                return urls
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no direct-ingress targets in {path}")


def line(row: dict) -> str:
    if "error" in row and not row.get("requests"):
        return f"{row['topology']}/{row['fault']}: {row['error']}"
    return (
        f"{row['topology']}/{row['fault']}: {row['requests']} requests, {row['failed']} failed "
        f"({row['failed_outside_first_s']} outside the first second, "
        f"{row['failed_share']:.3%}), recovery {row['recovery_s']} s, events "
        f"{row['events_acked']} acknowledged / {row['events_lost']} lost / "
        f"{row['events_logged_twice']} logged twice"
        + (f"  ERROR {row['error']}" if "error" in row else "")
    )


def to_markdown(results: dict) -> str:
    out = [
        "# make chaos",
        "",
        f"{results['started']} on {results['machine']}. Load: mixed (90% GET /recommend, 10% "
        f"POST /events) at {CLIENTS} clients, {BEFORE_S:.0f} s before the fault and "
        f"{AFTER_S:.0f} s after it. Targets: failed requests outside the fault's first second "
        f"≤ {TARGET_FAILED_SHARE:.1%} of the scenario's, recovery (fault → last failure) ≤ "
        f"{TARGET_RECOVERY_S:.0f} s, 0 acknowledged events lost (read back from the log).",
        "",
        "| topology | fault | path | requests | failed | outside 1st s | recovery s "
        "| events acked | lost | twice | recovered | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["scenarios"]:
        if not r.get("requests"):
            out.append(
                f"| {r['topology']} | {r['fault']} | | | | | | | | | {r.get('error')} | no |"
            )
            continue
        recovered = ", ".join(
            f"{k} {r[k]}" for k in ("replaced_s", "restarted_s") if r.get(k) is not None
        )
        if r["fault"] == "trainer":
            ra = r.get("retrain_after", {})
            recovered += (
                f"; served unchanged: {r.get('served_unchanged')}; left behind: "
                f"{r.get('left_behind')}; next retrain served in {ra.get('served_s')} s"
            )
        if r.get("streams"):
            st = r["streams"]
            recovered += (
                f"; streams with a list again: {st['reopened']} of {st['streams']}, the last "
                f"after {st['reopened_s_max']} s; clicks pushed after it (ms): "
                f"{st['probe_push_ms']}"
            )
        if r.get("error"):
            recovered += f"; ERROR {r['error']}"
        out.append(
            f"| {r['topology']} | {r['fault']} | {r['path']} | {r['requests']} | {r['failed']} "
            f"| {r['failed_outside_first_s']} ({r['failed_share']:.2%}) | {r['recovery_s']} "
            f"| {r['events_acked']} | {r['events_lost']} | {r['events_logged_twice']} "
            f"| {recovered} | {'yes' if r['targets_met'] else 'no'} |"
        )
    examples = [
        (r["fault"], r["failure_examples"])
        for r in results["scenarios"]
        if r.get("failure_examples")
    ]
    if examples:
        out += ["", "Failure examples:", ""]
        out += [f"- {r}: {e}" for r, ex in examples for e in ex]
    out += ["", f"Reproduce: `make chaos` ({results.get('total_s', '?')} s)."]
    return "\n".join(out) + "\n"


def write(results: dict, final: bool = True) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(results, indent=2))
    if final:
        (RESULTS / "chaos.md").write_text(to_markdown(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="data set to load (default: the generated demo data)")
    p.add_argument("--format", default="csv", choices=["csv", "movielens", "lightgcn"])
    p.add_argument(
        "--only",
        default="",
        help="comma-separated topology/fault pairs, e.g. fused/log,split/shard",
    )
    args = p.parse_args(argv)
    args.attach = args.targets = args.api_key = None
    args.api_key = client_key(args)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    plan = {
        t: tuple(f for f in faults if not wanted or f"{t}/{f}" in wanted)
        for t, faults in TOPOLOGIES.items()
    }
    results = {
        "machine": machine(),
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_id": f"{int(time.time())}",
        "load": {
            "clients": CLIENTS,
            "event_share": EVENT_SHARE,
            "before_s": BEFORE_S,
            "after_s": AFTER_S,
        },
        "scenarios": [],
    }
    t0 = time.monotonic()
    pop = load_population(args.data, args.format, 0)
    rc = 0
    try:
        for topology, faults in plan.items():
            if faults:
                uvloop_run(run_topology(args, topology, faults, pop, results))
    except Exception as exc:
        rc = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        import traceback

        traceback.print_exc()
    finally:
        results["total_s"] = round(time.monotonic() - t0, 1)
        write(results)
    print((RESULTS / "chaos.md").read_text())
    met = all(r.get("targets_met") for r in results["scenarios"])
    return rc or (0 if met else 3)


if __name__ == "__main__":
    sys.exit(main())
