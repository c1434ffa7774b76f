"""GET /stream: a user's list as Server-Sent Events, now and each time it changes.

Its own Serve application (route /stream), not a route of the Aggregator: an open stream holds
one of its replica's request slots for as long as it lasts, and the Aggregator's slots are its
admission control (deployments.runtime.INGRESS_MAX_ONGOING). A Pusher replica admits
`serving.max_streams` streams (beyond: 503 with Retry-After) and asks the rec application's
ingress for each list with GET /recommend, so a pushed list is exactly what a client would get,
read-your-writes included. It asks on the ingress replicas' direct-ingress ports, where its
requests queue first come first served with the clients'; through a Serve handle they would
wait for a free slot, which a saturated ingress never has (docs/ray-notes.md).

Each replica keeps one watch pending at the log actor naming its streams' users
(rec.push.Watches); the log answers it when it publishes a record that concerns one of them or
the catalogue. The watch is renewed when it times out (WATCH_S) or when a stream of a
new user opens, and the served model version is asked for every `serving.reload_poll_s`: the
CPU an idle replica spends does not grow with its streams.
"""

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import Context

import httpx
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve import Application
from starlette._utils import get_route_path

from deployments import telemetry
from deployments.eventlog import get_or_create_log
from deployments.runtime import actor_options, serve_options
from deployments.web import InvalidInput, allow
from rec.access import Access
from rec.config import RecConfig
from rec.events import ID_MAX
from rec.push import KEEPALIVE, KEEPALIVE_S, Change, Stream, Streams, StreamsFull, sse

log = logging.getLogger("rec.push")
APP_NAME = "rec-stream"
ROUTE = "/stream"
REC_APP = "rec"  # the application whose ingress computes the lists
# Lists one replica asks the rec application for at once (first lists of opening streams and
# pushes together): a burst of connections or a model swap that touches every stream waits
# here instead of overflowing the ingress's queue (its max_queued_requests, per caller).
PUSH_CONCURRENCY = 8
# Request slots beyond max_streams, so that a stream over the bound reaches the code that answers
# it 503 with Retry-After instead of waiting in Serve's queue. Opening streams queue in Serve's
# routers (the proxy's) until the replica takes them, and a burst of reconnects is that many at
# once: up to max_streams of them wait there, beyond that Serve answers 503 itself.
HEADROOM = 16
WATCH_S = 10.0  # how long one watch waits at the log for a change
TARGETS_S = 10.0  # how often the ingress replicas' direct-ingress URLs are looked up again
LIST_TIMEOUT_S = 10.0  # one GET /recommend for a pushed list


class _Bare:
    """/stream itself is the route "/": Starlette would answer it with a redirect to /stream/
    (the path left once the route prefix is taken off is empty), a round trip per connect."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and get_route_path(scope) == "":
            scope = {**scope, "path": scope["path"] + "/", "raw_path": None}
        await self.app(scope, receive, send)


api = FastAPI(title="rec stream", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(_Bare)
telemetry.count_errors(api)


def _ingress_urls(app: str) -> list[str]:
    """The direct-ingress URLs of `app`'s ingress replicas, on the host Serve's HTTP binds
    (none: Serve has no such ports, or they could not be found; the handle serves then)."""
    import ray
    from ray.serve.context import _get_global_client

    from deployments.cli import direct_targets

    try:
        controller = _get_global_client()._controller  # not public API, as direct_targets
        host = ray.get(controller.get_http_config.remote(), timeout=10).host
    except Exception:
        log.exception("finding Serve's HTTP host failed; lists go through the handle")
        return []
    return direct_targets(host).get(app, [])


def _ignore_result(future: asyncio.Future) -> None:
    """A superseded watch: the log answers it with nothing; only an error needs reading."""
    if not future.cancelled():
        future.exception()


@serve.deployment
@serve.ingress(api)
class Pusher:
    def __init__(self, config: dict, log_actor, rec_app: str = REC_APP) -> None:
        self.config = RecConfig.model_validate(config)
        self.log = log_actor
        self.rec_app = rec_app
        self._rec = None  # the rec application's handle, found on first use
        self.access = Access(self.config.access)
        self.metrics = telemetry.push()
        self.streams = Streams(self.config.serving.max_streams)
        self._watcher = uuid.uuid4().hex  # this replica's name for its watch at the log
        self._pusher: asyncio.Task | None = None
        self._asking = asyncio.Semaphore(PUSH_CONCURRENCY)
        self._http = httpx.AsyncClient(timeout=LIST_TIMEOUT_S)
        self._targets: list[str] = []
        self._targets_at = -TARGETS_S
        self._turn = itertools.count()
        self._swapped = asyncio.Event()  # the ingress serves a model version not seen before
        self._versions: asyncio.Task | None = None

    @property
    def rec(self):
        if self._rec is None:
            self._rec = serve.get_app_handle(self.rec_app)
        return self._rec

    async def open(self, user_id: str, k: int, key: str | None = None) -> Stream:
        """A new stream of `user_id`'s lists, its first (the current list) queued; 503 when
        this replica holds serving.max_streams already."""
        try:
            stream = self.streams.open(user_id, k, key)
        except StreamsFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        try:
            head = await self.log.next_offset.remote()
            stream.offer(await self._list(user_id, k, key, head, "connect"), always=True)
        except BaseException:
            self.streams.close(stream)
            raise
        self.metrics.streams.set(len(self.streams))
        # The loops outlive the request that starts them: started in a context of their own,
        # else Serve cancels the actor calls they make when that request's client goes away.
        loop = asyncio.get_running_loop()
        if self._pusher is None or self._pusher.done():
            self._pusher = loop.create_task(self._push_changes(head), context=Context())
        if self._versions is None or self._versions.done():
            self._versions = loop.create_task(self._watch_versions(), context=Context())
        return stream

    async def _sse(self, stream: Stream) -> AsyncIterator[str]:
        """The stream as Server-Sent Events, until the client goes away."""
        try:
            while True:
                answer = await stream.next(KEEPALIVE_S)
                if answer is None:
                    yield KEEPALIVE
                    continue
                yield sse(answer)
        finally:
            self.streams.close(stream)
            self.metrics.streams.set(len(self.streams))

    async def _list(self, user_id: str, k: int, key: str | None, head: int, trigger: str) -> dict:
        """The user's list as a stream sends it: the /recommend answer, which reflects every
        record below log offset `head` (`offset`), and what made it (`trigger`)."""
        async with self._asking:
            out = await self._recommend(user_id, k, key)
        self.metrics.pushes.inc(tags={"trigger": trigger})
        return {**out, "offset": head, "trigger": trigger}

    async def _recommend(self, user_id: str, k: int, key: str | None) -> dict:
        """GET /recommend on an ingress replica's direct-ingress port (round robin), or through
        the handle where Serve has none."""
        now = time.monotonic()
        if now - self._targets_at >= TARGETS_S:
            self._targets_at = now
            self._targets = await asyncio.to_thread(_ingress_urls, self.rec_app)
        if not self._targets:
            return await self.rec.recommend.remote({"user_id": user_id, "k": k})
        url = self._targets[next(self._turn) % len(self._targets)]
        try:
            resp = await self._http.get(
                f"{url}/recommend",
                params={"user_id": user_id, "k": k},
                headers={"X-API-Key": key} if key else None,
            )
        except httpx.HTTPError:
            self._targets_at = -TARGETS_S  # a replica gone: look them up again
            raise
        resp.raise_for_status()
        return resp.json()

    async def _watch_versions(self) -> None:
        """While streams are open: ask the ingress every reload_poll_s which model version it
        serves; a version not seen before sets _swapped (replicas swap one after the other,
        and an old one answering meanwhile is no change). Off the path of the changes: a
        saturated ingress may keep this waiting."""
        seen: set[str | None] = set()
        while len(self.streams):
            try:
                version = await self.rec.served_version.remote()
            except Exception:
                log.exception("asking the served model version failed")
            else:
                if seen and version not in seen:
                    self._swapped.set()
                seen.add(version)
            await asyncio.sleep(self.config.serving.reload_poll_s)

    async def _push_changes(self, after: int) -> None:
        """While streams are open: keep one watch pending at the log for their users and give
        each stream a change touches its new list; every stream when the model changed."""
        while len(self.streams):
            self.streams.changed.clear()
            watch = asyncio.ensure_future(
                self.log.watch.remote(self._watcher, self.streams.users(), after, WATCH_S)
            )
            added = asyncio.ensure_future(self.streams.changed.wait())
            swapped = asyncio.ensure_future(self._swapped.wait())
            try:
                await asyncio.wait({watch, added, swapped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                added.cancel()
                swapped.cancel()
            if not watch.done():  # a user was added, or a new model: the next watch covers it
                watch.add_done_callback(_ignore_result)
                change = Change(after)
            else:
                try:
                    change = watch.result()
                except Exception:  # the log restarting: the next watch finds it back
                    log.exception("watching the log for streams failed")
                    await asyncio.sleep(0.5)
                    continue
            model = self._swapped.is_set()
            self._swapped.clear()
            after = change.head
            touched = self.streams.touched(change, model)
            if touched:
                trigger = "events" if change.users else "catalog" if change.items else "model"
                await self._push(touched, change.head, trigger)

    async def _push(self, touched: list[tuple[Stream, bool]], head: int, trigger: str) -> None:
        """One list per (user, k) for the streams touched, the users who acted first (the
        order they queue for PUSH_CONCURRENCY in)."""
        groups: dict[tuple[str, int], list[tuple[Stream, bool]]] = {}
        for stream, always in sorted(touched, key=lambda t: not t[1]):
            groups.setdefault((stream.user_id, stream.k), []).append((stream, always))

        async def push(user_id: str, k: int, members: list[tuple[Stream, bool]]) -> None:
            try:
                answer = await self._list(user_id, k, members[0][0].key, head, trigger)
            except Exception:  # one user's failure does not stop the others' pushes
                log.exception("computing a pushed list failed")
                return
            for stream, always in members:
                stream.offer(answer, always)

        await asyncio.gather(*(push(u, k, m) for (u, k), m in groups.items()))

    @api.get("/")
    async def http_stream(
        self,
        request: Request,
        user_id: str = Query(min_length=1, max_length=ID_MAX, description="User id."),
        k: int | None = Query(None, ge=1, description="How many items (default from config)."),
    ) -> StreamingResponse:
        allow(self.access, request, "read")
        k = k or self.config.aggregate.default_k
        if k > self.config.aggregate.max_k:
            raise InvalidInput(f"at most {self.config.aggregate.max_k}", "k")
        stream = await self.open(user_id, k, request.headers.get("x-api-key"))
        return StreamingResponse(
            self._sse(stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def build_push(config: RecConfig, log_actor=None, replicas: int = 1) -> Application:
    """The /stream application; the log actor found or created as build_app does."""
    if log_actor is None:
        log_actor = get_or_create_log(config.log_dir, config.eventlog)
    s = config.serving
    common = serve_options(s)
    return Pusher.options(
        num_replicas=replicas,
        max_ongoing_requests=s.max_streams + HEADROOM,
        max_queued_requests=max(s.max_streams, 1),
        ray_actor_options=actor_options(s.replica_cpus, resources=s.replica_resources),
        **common,
    ).bind(config.model_dump(mode="json"), log_actor)
