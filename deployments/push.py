"""GET /stream: a user's list as Server-Sent Events, now and each time it changes.

Its own Serve application (route /stream), not a route of the Aggregator: an open stream holds
one of its replica's request slots for as long as it lasts, and the Aggregator's slots are its
admission control (deployments.runtime.INGRESS_MAX_ONGOING). A Pusher replica admits
`serving.max_streams` streams (beyond: 503 with Retry-After) and computes each list with the
rec application's `recommend` through a handle, so a pushed list is exactly what GET
/recommend answers, read-your-writes included.

Each replica keeps one watch pending at the log actor naming its streams' users
(rec.push.Watches); the log answers it when it publishes a record that concerns one of them or
the catalogue. The watch is renewed every `serving.reload_poll_s` (when a model swap is
noticed) or when a stream of a new user opens: the CPU an idle replica spends does not grow
with its streams.
"""

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve import Application
from starlette._utils import get_route_path

from deployments import telemetry
from deployments.eventlog import get_or_create_log
from deployments.ingress import InvalidInput, allow
from deployments.runtime import MAX_QUEUED, actor_options
from rec.access import Access
from rec.config import RecConfig
from rec.events import ID_MAX
from rec.push import Change, Stream, Streams, StreamsFull

log = logging.getLogger("rec.push")
APP_NAME = "rec-stream"
ROUTE = "/stream"
REC_APP = "rec"  # the application whose ingress computes the lists
# A stream with nothing to send writes an SSE comment this often: proxies keep the connection
# and a client that went away is noticed by the failed write.
KEEPALIVE_S = 15.0
PUSH_CONCURRENCY = 16  # pushed lists one replica computes at once
# Request slots beyond max_streams, so that a stream over the bound reaches the code that answers
# it 503 with Retry-After instead of waiting in Serve's queue.
HEADROOM = 16


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

    @property
    def rec(self):
        if self._rec is None:
            self._rec = serve.get_app_handle(self.rec_app)
        return self._rec

    async def open(self, user_id: str, k: int) -> Stream:
        """A new stream of `user_id`'s lists, its first (the current list) queued; 503 when
        this replica holds serving.max_streams already."""
        try:
            stream = self.streams.open(user_id, k)
        except StreamsFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        try:
            head = await self.log.next_offset.remote()
            stream.offer(await self._list(user_id, k, head, "connect"), always=True)
        except BaseException:
            self.streams.close(stream)
            raise
        self.metrics.streams.set(len(self.streams))
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push_changes(head))
        return stream

    async def _sse(self, stream: Stream) -> AsyncIterator[str]:
        """The stream as Server-Sent Events, until the client goes away."""
        try:
            while True:
                answer = await stream.next(KEEPALIVE_S)
                if answer is None:
                    yield ": keepalive\n\n"
                    continue
                data = json.dumps(answer, separators=(",", ":"))
                yield f"event: recommendations\nid: {answer['offset']}\ndata: {data}\n\n"
        finally:
            self.streams.close(stream)
            self.metrics.streams.set(len(self.streams))

    async def _list(self, user_id: str, k: int, head: int, trigger: str) -> dict:
        """The user's list as a stream sends it: the /recommend answer, which reflects every
        record below log offset `head` (`offset`), and what made it (`trigger`)."""
        out = await self.rec.recommend.remote({"user_id": user_id, "k": k})
        self.metrics.pushes.inc(tags={"trigger": trigger})
        return {**out, "offset": head, "trigger": trigger}

    async def _push_changes(self, after: int) -> None:
        """While streams are open: keep one watch pending at the log for their users and give
        each stream a change touches its new list."""
        seen = {await self.rec.served_version.remote()}
        while len(self.streams):
            self.streams.changed.clear()
            watch = asyncio.ensure_future(
                self.log.watch.remote(
                    self._watcher, self.streams.users(), after, self.config.serving.reload_poll_s
                )
            )
            added = asyncio.ensure_future(self.streams.changed.wait())
            try:
                await asyncio.wait({watch, added}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                added.cancel()
            if not watch.done():  # a user was added: the next watch names them too
                watch.add_done_callback(_ignore_result)
                continue
            try:
                change: Change = watch.result()
                version = await self.rec.served_version.remote()
            except Exception:  # the log or the ingress restarting: the next watch finds it
                log.exception("watching the log for streams failed")
                await asyncio.sleep(0.5)
                continue
            after = change.head
            # a version not seen before (replicas swap one after the other: an old one
            # answering meanwhile is no change)
            swapped = version not in seen
            seen.add(version)
            touched = self.streams.touched(change, swapped)
            if touched:
                trigger = "events" if change.users else "catalog" if change.items else "model"
                await self._push(touched, change.head, trigger)

    async def _push(self, touched: list[tuple[Stream, bool]], head: int, trigger: str) -> None:
        """One list per (user, k) for the streams touched, PUSH_CONCURRENCY at a time, the
        users who acted first (a model swap touches every stream at once)."""
        groups: dict[tuple[str, int], list[tuple[Stream, bool]]] = {}
        for stream, always in sorted(touched, key=lambda t: not t[1]):
            groups.setdefault((stream.user_id, stream.k), []).append((stream, always))

        async def push(user_id: str, k: int, members: list[tuple[Stream, bool]]) -> None:
            try:
                answer = await self._list(user_id, k, head, trigger)
            except Exception:  # one user's failure does not stop the others' pushes
                log.exception("computing a pushed list failed")
                return
            for stream, always in members:
                stream.offer(answer, always)

        batch = list(groups.items())
        for start in range(0, len(batch), PUSH_CONCURRENCY):
            await asyncio.gather(
                *(push(u, k, m) for (u, k), m in batch[start : start + PUSH_CONCURRENCY])
            )

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
        stream = await self.open(user_id, k)
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
    spread = {"max_replicas_per_node": s.max_replicas_per_node} if s.max_replicas_per_node else {}
    return Pusher.options(
        num_replicas=replicas,
        max_ongoing_requests=s.max_streams + HEADROOM,
        max_queued_requests=MAX_QUEUED,
        ray_actor_options=actor_options(s.replica_cpus, resources=s.replica_resources),
        **spread,
    ).bind(config.model_dump(mode="json"), log_actor)
