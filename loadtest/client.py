"""The load generator: an asyncio closed-loop client (N workers, each sends its next request as
soon as the last one is answered) and an open-loop one (requests at a fixed rate whatever the
answers do, for overload), on aiohttp + uvloop in one process.

Why not locust: the client shares the server's 2 cores, so its CPU per request matters. Against
a trivial local HTTP server, aiohttp used 0.14 ms CPU per request, locust's FastHttpUser
0.28 ms (its start-up included) and httpx 1.5 ms. Locust also has no open-loop mode (the
overload scenario needs a fixed arrival rate at 3x capacity, not N users that slow down with the
server) and no natural place for the freshness timing (POST answer -> reflecting GET answer).
`loadtest/locustfile.py` stays for interactive exploration.

Each scenario records latencies of the requests started inside its measuring window (after a
warm-up), counts non-200 answers and transport failures as errors, and the runner adds the CPU
time this process, the server's processes and the whole machine used meanwhile.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp

from rec.push import KEEPALIVE_S, SSEReader

JSON = {"Content-Type": "application/json"}
FRESH_RETRY_S = 2.0  # how long a freshness probe re-reads before giving up
# A refused connection is resent to the next replica; once every one refused, the round starts
# again after a pause, at most this many rounds (HAProxy's `retries` with `option redispatch`).
REDISPATCH_ROUNDS = 3
REDISPATCH_WAIT_S = 0.1


@dataclass
class Tally:
    """What one stream of requests did inside the measuring window."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    units: int = 0  # events acknowledged (event streams)
    started: list[float] = field(default_factory=list)  # perf_counter at start, when given

    def add(
        self, status: int, ms: float, units: int = 0, why: str = "", t: float | None = None
    ) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.latencies_ms.append(ms)
            self.units += units
            if t is not None:
                self.started.append(t)
        else:
            self.errors += 1
            if len(self.error_examples) < 5:
                self.error_examples.append(f"{status} {why}"[:300])


@dataclass
class Window:
    """The measuring window: requests started in [start, end) count."""

    start: float = float("inf")
    end: float = float("inf")

    def active(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class Population:
    """Who and what the traffic is about, taken from the data set the stack was loaded with."""

    users: list[str]  # known users
    user_cum: list[float]  # cumulative activity weights
    items: list[str]  # by popularity, most popular first
    item_cum: list[float]
    categories: list[str]
    active: list[str] = field(default_factory=list)  # users who acted since the model was trained

    @classmethod
    def from_dataset(cls, ds) -> Population:
        users = Counter(ds.events.column("user_id").to_pylist())
        items = Counter(ds.events.column("item_id").to_pylist())
        cats = sorted({c for c in ds.items.column("category").to_pylist() if c})
        u_ids, u_w = zip(*users.most_common(), strict=True)
        i_ids, i_w = zip(*items.most_common(), strict=True)
        return cls(
            list(u_ids),
            list(itertools.accumulate(u_w)),
            list(i_ids),
            list(itertools.accumulate(i_w)),
            cats,
        )

    def known_user(self, rng: random.Random) -> str:
        return self.users[bisect.bisect(self.user_cum, rng.random() * self.user_cum[-1])]

    def item(self, rng: random.Random) -> str:
        i = bisect.bisect(self.item_cum, rng.random() * self.item_cum[-1])
        return self.items[min(i, len(self.items) - 1)]

    def user_mix(self, rng: random.Random) -> tuple[str, str]:
        """The recommend mix: 70% known users (by activity), 15% cold, 15% just active."""
        r = rng.random()
        if r < 0.70 or not self.active:
            return "known", self.known_user(rng)
        if r < 0.85:
            return "cold", f"cold-{rng.getrandbits(48):x}"
        return "active", rng.choice(self.active)

    def event(self, rng: random.Random, user: str | None = None) -> dict:
        types, weights = ("view", "click", "add_to_cart", "purchase", "like"), (60, 25, 8, 4, 3)
        kind = rng.choices(types, weights)[0]
        return {"user_id": user or self.known_user(rng), "item_id": self.item(rng), "type": kind}


class Client:
    """One aiohttp session against the stack (127.0.0.1 only). Given several base URLs (the
    direct-ingress replicas of one app), each request goes to the one with the fewest requests
    in flight, first in turn among equals (HAProxy's `balance leastconn`, the usual choice in
    front of Serve's direct ingress): a replica slowed by an expensive request gets less.
    Like such a balancer, a request whose connection is refused (nothing was sent, so even a
    POST is safe to resend) goes to the next replica, and `set_bases` follows replicas that
    restarted on new ports."""

    def __init__(self, base: str | list[str], api_key: str = "") -> None:
        self.bases = _local([base] if isinstance(base, str) else list(base))
        self._in_flight = dict.fromkeys(self.bases, 0)
        self._turn = 0
        self.api_key = api_key
        self.session: aiohttp.ClientSession | None = None
        self.failovers = 0  # requests resent to another replica after a refused connection

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=30),
            skip_auto_headers=("User-Agent",),
            headers={"X-API-Key": self.api_key} if self.api_key else None,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, bytes, float]:
        """(status, body, seconds); status -1 for a transport failure (body = the error)."""
        t = time.perf_counter()
        extra = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        tried: set[str] = set()
        rounds = 0
        while True:
            if len(tried) >= len(self.bases):  # every replica refused: a new round shortly
                tried.clear()
                await asyncio.sleep(REDISPATCH_WAIT_S)
            base = self._pick(tried)
            tried.add(base)
            self._in_flight[base] = self._in_flight.get(base, 0) + 1
            try:
                async with self.session.request(
                    method, base + path, data=body, headers=headers, **extra
                ) as r:
                    data = await r.read()
                    status = r.status
            except aiohttp.ClientConnectorError as exc:  # refused: nothing was sent
                status, data = -1, repr(exc).encode()
                rounds += len(tried) >= len(self.bases)
                if rounds < REDISPATCH_ROUNDS:
                    self.failovers += 1
                    continue
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status, data = -1, repr(exc).encode()
            finally:
                self._in_flight[base] -= 1
            return status, data, time.perf_counter() - t

    def set_bases(self, bases: list[str]) -> None:
        """Balance over these URLs from now on (requests in flight finish where they are)."""
        if bases:
            self.bases = _local(bases)
            for b in self.bases:
                self._in_flight.setdefault(b, 0)

    def _pick(self, tried: set[str] = frozenset()) -> str:
        n = len(self.bases)
        if n == 1:
            return self.bases[0]
        self._turn = (self._turn + 1) % n
        order = [b for b in self.bases[self._turn :] + self.bases[: self._turn] if b not in tried]
        return min(order or self.bases, key=self._in_flight.__getitem__)

    async def timed(
        self,
        tally: Tally | None,
        win: Window,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        units=None,
    ) -> tuple[int, bytes]:
        """A call recorded in `tally` when it started inside the window; `units(body)` says how
        many events a 200 acknowledged."""
        t0 = time.perf_counter()
        status, data, dt = await self.call(method, path, body, headers)
        if tally is not None and win.active(t0):
            n = units(data) if (units and status == 200) else 0
            tally.add(
                status, dt * 1000, n, "" if status == 200 else data[:200].decode(errors="replace")
            )
        return status, data

    # ---- requests ----------------------------------------------------------------------------

    @staticmethod
    def recommend_path(user: str, k: int = 10) -> str:
        return f"/recommend?user_id={quote(user, safe='')}&k={k}"

    async def recommend_items(self, user: str, k: int = 10) -> list[str] | None:
        status, data, _ = await self.call("GET", self.recommend_path(user, k))
        return [i["item_id"] for i in json.loads(data)["items"]] if status == 200 else None

    async def post_json(self, path: str, obj) -> tuple[int, bytes]:
        status, data, _ = await self.call("POST", path, json.dumps(obj).encode(), JSON)
        return status, data

    async def wait_ready(self, paths: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for path in paths:
            while True:
                status, data, _ = await self.call("GET", path)
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} not ready: {status} {data[:200]!r}")
                await asyncio.sleep(0.5)


def _local(bases: list[str]) -> list[str]:
    if not bases:
        raise ValueError("no base URL")
    for b in bases:
        if not b.startswith(("http://127.", "http://localhost", "http://[::1]")):
            raise ValueError("load tests only target this machine (127.0.0.0/8, localhost, ::1)")
    return [b.rstrip("/") for b in bases]


def _accepted(data: bytes) -> int:
    return int(json.loads(data)["accepted"])


# ---- drivers -------------------------------------------------------------------------------


async def closed_loop(
    n: int,
    seconds: float,
    warmup: float,
    step,
    stop: asyncio.Event | None = None,
    max_seconds: float | None = None,
) -> tuple[Window, float]:
    """n workers call `await step(worker, rng, win)` back to back. Measures for `seconds` after
    `warmup`, or, given `stop`, until it is set (at most `max_seconds`). Returns the window and
    its length."""
    win = Window()
    done = False

    async def worker(w: int) -> None:
        rng = random.Random(1000 + w)
        while not done:
            await step(w, rng, win)

    tasks = [asyncio.create_task(worker(w)) for w in range(n)]
    try:
        await asyncio.sleep(warmup)
        win.start = time.perf_counter()
        if stop is None:
            await asyncio.sleep(seconds)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max_seconds)
        win.end = time.perf_counter()
        done = True
        await asyncio.gather(*tasks)
    finally:
        done = True
        for t in tasks:
            t.cancel()
    return win, win.end - win.start


async def open_loop(rate: float, seconds: float, fire) -> int:
    """Starts `fire(scheduled_time)` `rate` times a second for `seconds`, whatever the answers
    do (late ticks fire at once, so the offered load is kept). Returns how many were started."""
    # Only unfinished tasks are kept: thousands of finished ones kept alive only slow the
    # client's garbage collector.
    pending: set[asyncio.Task] = set()
    t0 = time.perf_counter()
    started = 0
    for i in itertools.count():
        due = t0 + i / rate
        if due - t0 >= seconds:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(fire(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        started += 1
    await asyncio.gather(*pending)
    return started


# ---- scenario steps ------------------------------------------------------------------------


def floor_step(client: Client, tally: Tally):
    async def step(_w, _rng, win):
        await client.timed(tally, win, "GET", "/floor")

    return step


def recommend_step(client: Client, pop: Population, tallies: dict[str, Tally]):
    """GET /recommend over the user mix; `tallies` gets one Tally per user kind and "all"."""

    async def step(_w, rng, win):
        kind, user = pop.user_mix(rng)
        t0 = time.perf_counter()
        status, data, dt = await client.call("GET", client.recommend_path(user))
        if win.active(t0):
            why = "" if status == 200 else data[:200].decode(errors="replace")
            for key in ("all", kind):
                tallies.setdefault(key, Tally()).add(status, dt * 1000, why=why, t=t0)

    return step


@dataclass
class Freshness:
    """Read-your-writes probes: POST /events answer -> first /recommend answer reflecting it."""

    ms: list[float] = field(default_factory=list)
    stale_first_reads: int = 0
    never: int = 0


def mixed_step(
    client: Client,
    pop: Population,
    rec: Tally,
    ev: Tally,
    fresh: Freshness,
    event_share: float = 0.10,
):
    """90% GET /recommend (the user mix) / 10% POST /events. Every event is a click on an item
    the user was just recommended, and the worker's next request is that user's /recommend,
    which must no longer contain it (seen items are filtered): the freshness probe."""
    act_p = event_share / (1 - event_share)  # an act = one event + one recommend
    last: list[dict[str, str]] = []

    async def step(w, rng, win):
        while len(last) <= w:
            last.append({})
        mine = last[w]
        if mine and rng.random() < act_p:
            user, item = mine.popitem()
            body = json.dumps({"user_id": user, "item_id": item, "type": "click"}).encode()
            status, _ = await client.timed(ev, win, "POST", "/events", body, JSON)
            if status != 200:
                return
            acked = time.perf_counter()
            measuring = win.active(acked)
            first = True
            while time.perf_counter() - acked < FRESH_RETRY_S:
                status, data = await client.timed(rec, win, "GET", client.recommend_path(user))
                if status == 200 and item not in {i["item_id"] for i in json.loads(data)["items"]}:
                    if measuring:
                        fresh.ms.append((time.perf_counter() - acked) * 1000)
                    return
                if measuring and first:
                    fresh.stale_first_reads += 1
                first = False
            if measuring:
                fresh.never += 1
            return
        kind, user = pop.user_mix(rng)
        status, data = await client.timed(rec, win, "GET", client.recommend_path(user))
        if status == 200 and kind != "cold" and len(mine) < 64:
            items = json.loads(data)["items"]
            if items:
                mine[user] = items[0]["item_id"]

    return step


def event_single_step(client: Client, pop: Population, tally: Tally):
    async def step(_w, rng, win):
        body = json.dumps(pop.event(rng)).encode()
        await client.timed(tally, win, "POST", "/events", body, JSON, units=_accepted)

    return step


def event_batch_step(client: Client, bodies: list[bytes], tally: Tally):
    async def step(_w, rng, win):
        await client.timed(tally, win, "POST", "/events", rng.choice(bodies), JSON, units=_accepted)

    return step


def batch_bodies(pop: Population, n_bodies: int, size: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [
        json.dumps({"events": [pop.event(rng) for _ in range(size)]}).encode()
        for _ in range(n_bodies)
    ]


async def new_item_trial(
    client: Client, item: dict, user: str, timeout_s: float, interval_s: float = 0.02
) -> float | None:
    """POST /items, then poll /recommend for a known user until the item is in the answer;
    seconds from the POST answer to that answer (None: not within timeout_s)."""
    status, data = await client.post_json("/items", item)
    if status != 200:
        raise RuntimeError(f"POST /items: {status} {data[:200]!r}")
    acked = time.perf_counter()
    while time.perf_counter() - acked < timeout_s:
        items = await client.recommend_items(user)
        if items and item["item_id"] in items:
            return time.perf_counter() - acked
        await asyncio.sleep(interval_s)
    return None


class Pushes:
    """Push probes: a click posted for a user with a stream open, and the time from its POST
    answer to the first list on that stream whose offset is past the event's (0 when the
    list came before the answer)."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.never = 0
        self.messages = 0
        self.shown: dict[str, str] = {}  # user -> first item of the newest list
        self.connects: dict[str, list[float]] = {}  # user -> arrivals of its `connect` lists
        self._got: dict[str, tuple[int, float]] = {}  # user -> (newest offset, arrival)
        self._waiting: dict[str, list[tuple[int, float, asyncio.Future]]] = {}

    def received(self, user: str, message: dict, at: float) -> None:
        self.messages += 1
        self._got[user] = (message["offset"], at)
        if message.get("trigger") == "connect":
            self.connects.setdefault(user, []).append(at)
        if message["items"]:
            self.shown[user] = message["items"][0]["item_id"]
        keep = []
        for last, acked, done in self._waiting.pop(user, []):
            if done.done():  # timed out
                continue
            if message["offset"] > last:
                done.set_result(max(at - acked, 0.0))
            else:
                keep.append((last, acked, done))
        if keep:
            self._waiting[user] = keep

    async def answered(self, user: str, last_offset: int, acked: float, timeout_s: float):
        """Seconds from `acked` to the list reflecting offset `last_offset`, None if none came."""
        offset, at = self._got.get(user, (-1, 0.0))
        if offset > last_offset:
            return max(at - acked, 0.0)
        done = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user, []).append((last_offset, acked, done))
        try:
            return await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            return None


async def follow(
    client: Client,
    user: str,
    pushes: Pushes,
    opened: asyncio.Event,
    open_timeout_s: float | None = None,
    silent_s: float | None = None,
) -> None:
    """Read GET /stream for `user` until cancelled, handing each list to `pushes`; TimeoutError
    when the answer takes over `open_timeout_s`, or the stream says nothing (lists or
    keepalives) for `silent_s`."""
    path = f"/stream?user_id={quote(user)}&k=10"
    request = client.session.get(
        client._pick() + path, timeout=aiohttp.ClientTimeout(total=None, sock_read=silent_s)
    )
    async with await asyncio.wait_for(request, open_timeout_s) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /stream answered {resp.status}: {await resp.text()}")
        opened.set()
        reader = SSEReader()
        async for raw in resp.content:
            if (message := reader.line(raw.decode())) is not None:
                pushes.received(user, message, time.perf_counter())


# The page's reconnection (deployments/page/index.html): 0.5 s, doubling to 8 s, from 0.5 s
# again after a stream that opened; an attempt unanswered for OPEN_TIMEOUT_S, or a stream
# silent for two keepalives, is given up and made again.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 8.0
OPEN_TIMEOUT_S = 5.0
SILENT_S = 2 * KEEPALIVE_S


async def follow_reconnecting(
    client: Client, user: str, pushes: Pushes, trace: list | None = None
) -> None:
    """`follow`, opened again whenever the stream ends or fails, until cancelled; `trace`
    gets (perf_counter, how the attempt ended) for each attempt."""
    attempt = 0
    while True:
        opened = asyncio.Event()
        try:
            await follow(client, user, pushes, opened, OPEN_TIMEOUT_S, SILENT_S)
            how = "ended"
        except (aiohttp.ClientError, OSError, RuntimeError, TimeoutError) as exc:
            how = f"{type(exc).__name__}: {exc}"[:80]
        if trace is not None:
            trace.append((time.perf_counter(), how if not opened.is_set() else f"open, {how}"))
        attempt = 0 if opened.is_set() else attempt + 1
        await asyncio.sleep(min(RECONNECT_FIRST_S * 2**attempt, RECONNECT_MAX_S))


class Streams:
    """GET /stream open for `users` through `client`, each reopened as the page does
    (follow_reconnecting), every list handed to `pushes`; `trace` gets each attempt's end."""

    def __init__(self, client: Client, users: list[str]) -> None:
        self.client = client
        self.users = users
        self.pushes = Pushes()
        self.readers: list[asyncio.Task] = []
        self.trace: list[tuple[float, str]] = []

    async def open(self, timeout_s: float = 60.0) -> None:
        """Open every stream; RuntimeError when some have sent no list within `timeout_s`."""
        self.readers = [
            asyncio.create_task(follow_reconnecting(self.client, u, self.pushes, self.trace))
            for u in self.users
        ]
        deadline = time.monotonic() + timeout_s
        while len(self.pushes.connects) < len(self.users):
            if time.monotonic() > deadline:
                opened = len(self.pushes.connects)
                await self.close()
                raise RuntimeError(
                    f"{opened} of {len(self.users)} streams opened: {self.trace[:1]}"
                )
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for r in self.readers:
            r.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def push_step(
    client: Client, users: list[str], pushes: Pushes, ev: Tally, timeout_s: float, pace_s: float
):
    """A click for a streamed user (round robin) on the first item of its newest list, wait
    for the list that reflects it, then `pace_s`."""
    turn = itertools.cycle(users)

    async def step(_w, _rng, win):
        user = next(turn)
        item = pushes.shown.get(user)
        if item is None:
            await asyncio.sleep(0.01)
            return
        body = json.dumps({"user_id": user, "item_id": item, "type": "click"}).encode()
        status, data = await client.timed(ev, win, "POST", "/events", body, JSON)
        if status != 200:
            return
        acked = time.perf_counter()
        took = await pushes.answered(user, json.loads(data)["last_offset"], acked, timeout_s)
        if win.active(acked):
            if took is None:
                pushes.never += 1
            else:
                pushes.ms.append(took * 1000)
        await asyncio.sleep(pace_s)

    return step
