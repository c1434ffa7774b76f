"""The Aggregator: the HTTP ingress (FastAPI). It validates input, appends to the event log,
drives the stages (in process or over handles) and mixes, filters and explains the result. In
the split topology it holds no pipeline state: the candidates carry what finalize reads.

Each route is a thin HTTP shell over a plain async method taking parsed JSON (`ingest_events`,
`recommend`, ...), so the same logic is reachable through a DeploymentHandle in tests."""

import asyncio
import functools
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from deployments import telemetry
from deployments.runtime import Startup, pin_threads
from deployments.stages import LocalStages, RemoteStages, make_live
from deployments.web import InvalidInput, allow
from rec.access import Access
from rec.config import RecConfig
from rec.events import (
    ID_MAX,
    EventBatchIn,
    EventIn,
    ItemIn,
    impression_record,
    item_delete_record,
    item_record,
    user_delete_record,
)
from rec.filters import Filters
from rec.finalize import finalize
from rec.model import current_version

READYZ_USER = "__readyz__"
PAGE = Path(__file__).with_name("page") / "index.html"
IMPRESSION_FLUSH_S = 0.5  # impressions wait at most this long to be appended, in one batch
IMPRESSION_BATCH = 1000
# How long a write waits for the event log (a restarting log answers when it is back; the
# caller's retry is written once, see EventLogService.append) before a 503.
APPEND_TIMEOUT_S = 30.0
api = FastAPI(title="rec", description="Real-time recommendations: post events, get items.")
# OpenAPI: routes that write or administer need a key (KEYED); reads take one optionally
# (access.open_reads decides per deployment); rec.access names the scopes.
KEYED = {"security": [{"ApiKey": []}]}
ERRORS = {  # what any route may answer besides 200 (every error body is {"detail": ...})
    "400": "Body is not valid JSON.",
    "401": "No X-API-Key, or not a known key.",
    "403": "The key lacks the route's scope.",
    "404": "Unknown item.",
    "413": "Body or batch too large.",
    "422": "A field is invalid (named in detail).",
    "429": "The key is over its rate; see Retry-After.",
    "503": "Not ready, or overloaded.",
}
OPTIONAL_KEY = {"security": [{}, {"ApiKey": []}]}
# OpenAPI links: what a client can do next with what it just sent (generated clients and
# schemathesis's stateful run follow them): an item added -> read it, act on it, delete it;
# an event posted -> that user's recommendations, or forgetting the user.
LINKS = {
    ("/items", "post"): {
        "GetItem": ("/items/{item_id}", "get", {"item_id": "$request.body#/item_id"}),
        "DeleteItem": ("/items/{item_id}", "delete", {"item_id": "$request.body#/item_id"}),
        "ActOnItem": (
            "/events",
            "post",
            {"user_id": "linked-user", "item_id": "$request.body#/item_id", "type": "click"},
        ),
    },
    ("/events", "post"): {
        "Recommend": ("/recommend", "get", {"user_id": "$request.body#/user_id"}),
        "ForgetUser": ("/users/{user_id}", "delete", {"user_id": "$request.body#/user_id"}),
    },
}


def _body(*models: type[BaseModel]) -> dict:
    """openapi_extra of a route that reads its JSON body itself (the fast path: no FastAPI
    body parsing): the body it takes, one of `models`, as `_openapi` declares them."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _link(path: str, method: str, values: dict) -> dict:
    """An OpenAPI link to `method path`: `values` fill its path/query parameters, or its JSON
    body when the target takes one."""
    ref = "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method
    key = "requestBody" if method == "post" else "parameters"
    return {"operationRef": ref, key: values}


def _openapi() -> dict:
    if api.openapi_schema is None:
        schema = FastAPI.openapi(api)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in BODIES:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
        schemas["Error"] = {
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"description": "What was wrong (a field list for 422)."}},
        }
        error = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for code, what in ERRORS.items():
                    responses.setdefault(code, {"description": what, **error})
        for (path, method), links in LINKS.items():
            ok = schema["paths"][path][method]["responses"]["200"]
            ok["links"] = {name: _link(*target) for name, target in links.items()}
        components["securitySchemes"] = {
            "ApiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "Scopes: read, events (POST /events), catalog (POST/DELETE "
                "/items), admin (DELETE /users, /admin/*, and every other scope).",
            }
        }
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


telemetry.count_errors(api)


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=ID_MAX, description="Who to recommend for.")
    k: int | None = Field(None, ge=1, description="How many items (default from config).")
    exclude: list[str] = Field(
        default_factory=list, max_length=1000, description="Item ids never to return."
    )
    context: dict[str, str | int | float | bool] | None = Field(
        None, description="Request context (e.g. hour, device) passed to the ranker."
    )
    request_id: str | None = Field(None, max_length=ID_MAX, description="Caller's request id.")
    categories: list[str] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Only items of these categories (422 names unknown ones).",
    )
    exclude_categories: list[str] = Field(
        default_factory=list, max_length=100, description="No items of these categories."
    )
    include_seen: bool = Field(
        False, description="Items the user already acted on may come back (default: never)."
    )


def _query(name: str, description: str, kind: str = "string", **schema) -> dict:
    """One query parameter of GET /recommend, as the OpenAPI page declares it."""
    required = name == "user_id"
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": kind, **schema},
    }


RECOMMEND_QUERY = [
    _query("user_id", "User id.", minLength=1, maxLength=ID_MAX),
    _query("k", "How many items (default from config).", "integer", minimum=1),
    _query("exclude", "Comma-separated item ids to leave out."),
    _query("categories", "Comma-separated categories: only items of these."),
    _query("exclude_categories", "Comma-separated categories: no items of these."),
    _query("include_seen", "true: items the user already acted on may come back.", "boolean"),
]


class ItemBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn] = Field(min_length=1, description="Catalogue entries to upsert.")


BODIES = (EventIn, EventBatchIn, ItemIn, ItemBatchIn, RecommendIn)


def _csv(query, name: str) -> list[str]:
    return [x for x in query.get(name, "").split(",") if x]


@functools.cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def _parse(model: type[BaseModel], body: object) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput(exc) from None


@serve.deployment
@serve.ingress(api)
class Aggregator:
    def __init__(
        self, config: dict, log, profile=None, recall=None, ranker=None, trainer=None
    ) -> None:
        pin_threads()
        self.config = RecConfig.model_validate(config)
        self.log = log
        self.live = None if profile is not None else make_live(self.config, log)
        if self.live is None:
            self.stages = RemoteStages(profile, recall, ranker)
            self._started = Startup()
        else:
            self.stages = LocalStages(self.live)
            self._started = Startup(self.live.start())
        self.trainer = trainer
        self.access = Access(self.config.access)
        self.metrics = telemetry.serving()
        self._impressions: list[dict] = []
        self._impression_timer: asyncio.TimerHandle | None = None

    # ---- the logic, HTTP-free ----------------------------------------------------------------

    async def ingest_events(self, body: object) -> dict:
        """Validate one event or {"events": [...]}, append durably, return the offsets."""
        limit = self.config.eventlog.max_batch_events
        if isinstance(body, dict) and "events" in body:
            if isinstance(body["events"], list) and len(body["events"]) > limit:
                raise HTTPException(413, f"events: at most {limit} per batch")
            events = _parse(EventBatchIn, body).events
        else:
            events = [_parse(EventIn, body)]
        if not self.config.serving.accept_unknown_items:
            await self._started.wait()
            unknown = await self.stages.unknown_items(sorted({e.item_id for e in events}))
            if unknown:
                raise InvalidInput(f"unknown items {unknown[:5]}", "item_id")
        now = time.time()
        first, last = await self._append([e.to_record(now) for e in events])
        types: dict[str, int] = {}
        for e in events:
            types[e.type] = types.get(e.type, 0) + 1
        for kind, n in types.items():
            self.metrics.events.inc(n, tags={"type": kind})
        return {"accepted": len(events), "first_offset": first, "last_offset": last}

    async def _append(self, records: list[dict]) -> tuple[int, int]:
        """Append durably and apply here at once: the user's next request often comes back to
        this replica, and then finds its writes applied without reading the log (another
        replica reads them as before)."""
        try:  # the token makes Ray's resend after a log restart a no-op if the first landed
            first, last = await asyncio.wait_for(
                self.log.append.remote(records, uuid.uuid4().hex), APPEND_TIMEOUT_S
            )
        except TimeoutError:
            raise HTTPException(
                503,
                f"the event log did not answer within {APPEND_TIMEOUT_S:.0f} s: not "
                "acknowledged (it may still be written); retry",
                headers={"Retry-After": "1"},
            ) from None
        self.stages.applied(records, first)
        return first, last

    async def recommend(self, body: object) -> dict:
        req = _parse(RecommendIn, body)
        await self._started.wait()
        k = req.k or self.config.aggregate.default_k
        if k > self.config.aggregate.max_k:
            raise InvalidInput(f"at most {self.config.aggregate.max_k}", "k")
        filters = Filters(
            None if req.categories is None else frozenset(req.categories),
            frozenset(req.exclude_categories),
            req.include_seen,
        )
        if filters.narrows:
            unknown = await self.stages.unknown_categories(filters.named())
            if unknown:
                raise InvalidInput(f"unknown categories {unknown[:10]}", "categories")
        t0 = time.perf_counter()
        view = await self.stages.view(req.user_id)
        t1 = time.perf_counter()
        recalled = await self.stages.recall(view, req.context, filters)
        t2 = time.perf_counter()
        scores = await self.stages.rank(recalled)
        t3 = time.perf_counter()
        out = finalize(
            self.config.aggregate,
            view,
            recalled.cands,
            scores,
            k,
            frozenset(req.exclude),
            recalled.version,
            req.request_id or uuid.uuid4().hex,
            filters,
        )
        self._measured(out, recalled, (t0, t1, t2, t3, time.perf_counter()))
        if self.config.serving.log_impressions and req.user_id != READYZ_USER:
            self.metrics.impressions.inc(len(out["items"]))
            self._log_impression(
                impression_record(
                    req.user_id,
                    out["request_id"],
                    [i["item_id"] for i in out["items"]],
                    out["model_version"],
                    time.time(),
                )
            )
        return out

    def _measured(self, out: dict, recalled, times: tuple[float, ...]) -> None:
        """One answer into the metrics: stage latencies, its ordering and sources."""
        m = self.metrics
        for stage, start, end in zip(telemetry.STAGES, times[:-1], times[1:], strict=True):
            m.stage_ms.observe((end - start) * 1000, tags={"stage": stage})
        m.answers.inc(tags={"ordering": recalled.ordering})
        sources: dict[str, int] = {}
        for item in out["items"]:
            for source in item["sources"]:
                sources[source] = sources.get(source, 0) + 1
        for source, n in sources.items():
            m.source_items.inc(n, tags={"source": source})
        m.serving(recalled.version)
        if self.live is not None:
            m.applied.set(self.live.rec.offset, tags={"part": "all"})

    def _log_impression(self, record: dict) -> None:
        """Feedback for training, not awaited: the answer does not wait for the disk. Records
        are gathered for IMPRESSION_FLUSH_S and appended together: one actor call, one log
        frame and one read by every follower per flush instead of per request."""
        self._impressions.append(record)
        if len(self._impressions) >= IMPRESSION_BATCH:
            self._flush_impressions()
        elif self._impression_timer is None:
            self._impression_timer = asyncio.get_running_loop().call_later(
                IMPRESSION_FLUSH_S, self._flush_impressions
            )

    def _flush_impressions(self):
        """Append the gathered impressions (not awaited); returns the append's reference."""
        if self._impression_timer is not None:
            self._impression_timer.cancel()
            self._impression_timer = None
        batch, self._impressions = self._impressions, []
        return self.log.append.remote(batch, uuid.uuid4().hex) if batch else None

    def check_health(self) -> None:
        """Serve's health check: a fused replica that cannot follow the log or models fails
        it (a split ingress holds no state; its stages check their own)."""
        problem = self.live.problem() if self.live is not None else None
        if problem is not None:
            raise RuntimeError(problem)

    async def __del__(self) -> None:
        """Serve's graceful shutdown, once the last request has drained: the impressions still
        gathered reach the log before the replica goes, and the live state's tasks stop."""
        appended = self._flush_impressions()
        if appended is not None:
            await appended
        if self.live is not None:
            self.live.stop()

    async def similar_items(self, item_id: str, k: int) -> dict:
        await self._started.wait()
        out = await self.stages.similar(item_id, k)
        if out is None:
            raise HTTPException(404, f"item_id: unknown item {item_id!r}")
        return out

    async def upsert_items(self, body: object) -> dict:
        if isinstance(body, dict) and "items" in body:
            items = _parse(ItemBatchIn, body).items
        else:
            items = [_parse(ItemIn, body)]
        now = time.time()
        first, last = await self._append([item_record(i, now) for i in items])
        return {"accepted": len(items), "first_offset": first, "last_offset": last}

    async def item(self, item_id: str) -> dict:
        await self._started.wait()
        info = await self.stages.item(item_id)
        if info is None:
            raise HTTPException(404, f"item_id: unknown item {item_id!r}")
        return info

    async def remove_item(self, item_id: str) -> dict:
        first, _ = await self._append([item_delete_record(item_id, time.time())])
        return {"item_id": item_id, "deleted": True, "offset": first}

    async def forget_user(self, user_id: str) -> dict:
        first, _ = await self._append([user_delete_record(user_id, time.time())])
        removed = await self.log.forget_user.remote(user_id)
        return {"user_id": user_id, "deleted_events": removed, "offset": first}

    async def known_users(self, limit: int) -> dict:
        """Users with the newest events, for the page's picker."""
        return {"users": await self.log.recent_users.remote(limit)}

    async def served_version(self) -> str | None:
        """The model version this replica's pipeline serves (GET /stream pushes on a change)."""
        return (await self.stages.model_info()).get("serving")

    async def readiness(self) -> tuple[bool, dict]:
        if not self._started.done():
            return False, {"ready": False, "why": "loading"}
        info = await self.stages.model_info()
        if info.get("loading"):
            return False, {"ready": False, "why": "loading"}  # a stage still replays the log
        if info["serving"] is None:
            return False, {"ready": False, "why": await self._no_model_why()}
        try:
            out = await self.recommend({"user_id": READYZ_USER, "k": 1})
        except Exception as exc:  # not ready is an answer, not a crash
            return False, {"ready": False, "why": repr(exc)}
        if not out["items"]:
            return False, {"ready": False, "why": "no items to recommend"}
        return True, {"ready": True, "model_version": out["model_version"]}

    async def _no_model_why(self) -> str:
        """What to do when no model is published yet (a fresh `serve deploy`)."""
        need = self.config.train.min_events
        try:
            have = await asyncio.wait_for(self.log.next_offset.remote(), 5)
        except Exception:  # the answer stays useful without the count
            have = None
        if current_version(self.config.model_dir) is not None:
            return "a model is published; the replicas are loading it"
        held = "" if have is None else f"the log holds {have} records; "
        return (
            f"no model published yet: {held}the trainer trains the first one once it holds "
            f"train.min_events ({need}): post events and items, or POST /admin/retrain"
        )

    async def model_info(self) -> dict:
        root = self.config.model_dir
        available = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if root.exists()
            else []
        )
        await self._started.wait()
        return {
            "published": current_version(root),
            "available": available,
            **(await self.stages.model_info()),
        }

    # ---- HTTP --------------------------------------------------------------------------------
    # Routes answer with a JSONResponse: a returned dict would go through FastAPI's
    # jsonable_encoder and a response model inferred from the annotation (~150 µs per
    # /recommend answer here, against ~17 µs for the json.dumps the JSONResponse does).

    async def _json(self, request: Request) -> object:
        raw = await request.body()
        if len(raw) > self.config.serving.max_body_bytes:
            raise HTTPException(413, f"body larger than {self.config.serving.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"body is not valid JSON: {exc}") from exc

    @api.post(
        "/events",
        summary="Record one event or a batch {'events': [...]}",
        openapi_extra={**KEYED, **_body(EventIn, EventBatchIn)},
    )
    async def http_post_events(self, request: Request) -> JSONResponse:
        allow(self.access, request, "events")
        return JSONResponse(await self.ingest_events(await self._json(request)))

    # The hot route reads its query itself and validates it as RecommendIn (the POST body's
    # model, same 422s): FastAPI's per-parameter dependency solving cost ~5% of a replica's
    # CPU under load. The parameters are declared for the OpenAPI page by hand.
    @api.get(
        "/recommend",
        summary="Top-k items for a user",
        openapi_extra={"parameters": RECOMMEND_QUERY, **OPTIONAL_KEY},
    )
    async def http_get_recommend(self, request: Request) -> JSONResponse:
        allow(self.access, request, "read")
        q = request.query_params
        body = {"user_id": q.get("user_id"), "k": q.get("k"), "exclude": _csv(q, "exclude")}
        if _csv(q, "categories"):  # `categories=` alone restricts nothing
            body["categories"] = _csv(q, "categories")
        if "exclude_categories" in q:
            body["exclude_categories"] = _csv(q, "exclude_categories")
        if "include_seen" in q:
            body["include_seen"] = q["include_seen"]
        return JSONResponse(await self.recommend(body))

    @api.post(
        "/recommend",
        summary="Top-k items with exclusions and context",
        openapi_extra={**OPTIONAL_KEY, **_body(RecommendIn)},
    )
    async def http_post_recommend(self, request: Request) -> JSONResponse:
        allow(self.access, request, "read")
        return JSONResponse(await self.recommend(await self._json(request)))

    @api.get("/similar", summary="Items similar to an item", openapi_extra=OPTIONAL_KEY)
    async def http_similar(
        self,
        request: Request,
        item_id: str = Query(min_length=1, max_length=ID_MAX, description="Item id."),
        k: int = Query(10, ge=1, le=200, description="How many items."),
    ) -> JSONResponse:
        allow(self.access, request, "read")
        return JSONResponse(await self.similar_items(item_id, k))

    @api.post(
        "/items",
        summary="Add or update catalogue items (one, or {'items': [...]})",
        openapi_extra={**KEYED, **_body(ItemIn, ItemBatchIn)},
    )
    async def http_post_items(self, request: Request) -> JSONResponse:
        allow(self.access, request, "catalog")
        return JSONResponse(await self.upsert_items(await self._json(request)))

    @api.get("/items/{item_id}", summary="One catalogue item", openapi_extra=OPTIONAL_KEY)
    async def http_get_item(self, request: Request, item_id: str) -> JSONResponse:
        allow(self.access, request, "read")
        return JSONResponse(await self.item(item_id))

    @api.delete(
        "/items/{item_id}",
        summary="Remove an item from recommendations for good",
        openapi_extra=KEYED,
    )
    async def http_delete_item(self, request: Request, item_id: str) -> JSONResponse:
        allow(self.access, request, "catalog")
        return JSONResponse(await self.remove_item(item_id))

    @api.delete(
        "/users/{user_id}", summary="Forget a user: profile and events", openapi_extra=KEYED
    )
    async def http_delete_user(self, request: Request, user_id: str) -> JSONResponse:
        allow(self.access, request, "admin")
        return JSONResponse(await self.forget_user(user_id))

    @api.get("/healthz", summary="The process is up")
    async def http_healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/readyz", summary="200 only when a recommendation can be served")
    async def http_readyz(self) -> JSONResponse:
        ok, body = await self.readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get(
        "/users",
        summary="Users with the newest events (the page's picker)",
        openapi_extra=KEYED,
    )
    async def http_users(
        self,
        request: Request,
        limit: int = Query(12, ge=1, le=100, description="How many users."),
    ) -> JSONResponse:
        allow(self.access, request, "events")
        return JSONResponse(await self.known_users(limit))

    @api.get(
        "/", summary="A page that shows a user's recommendations live", include_in_schema=False
    )
    async def http_page(self) -> HTMLResponse:
        return HTMLResponse(_page())

    @api.get(
        "/models",
        summary="Model versions: served, published, available",
        openapi_extra=OPTIONAL_KEY,
    )
    async def http_models(self, request: Request) -> JSONResponse:
        allow(self.access, request, "read")
        return JSONResponse(await self.model_info())

    @api.post("/admin/retrain", summary="Retrain from the log now", openapi_extra=KEYED)
    async def http_retrain(
        self,
        request: Request,
        wait: bool = Query(False, description="Answer when the new version is published."),
    ) -> JSONResponse:
        allow(self.access, request, "admin")
        if self.trainer is None:
            raise HTTPException(503, "no trainer in this deployment")
        ref = self.trainer.retrain.remote()
        if not wait:
            return JSONResponse({"started": True}, status_code=202)
        return JSONResponse(await ref)
