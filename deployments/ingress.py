"""The Aggregator: the HTTP ingress (FastAPI). It validates input, appends to the event log,
drives the stages (in process or over handles) and mixes, filters and explains the result."""


import asyncio
import json
import time
import uuid

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from deployments.eventlog import get_log
from deployments.runtime import pin_threads
from deployments.stages import LocalStages, RemoteStages, make_live
from rec.config import RecConfig
from rec.events import (
    ID_MAX,
    EventBatchIn,
    EventIn,
    ItemIn,
    item_delete_record,
    item_record,
    user_delete_record,
)
from rec.model import current_version

api = FastAPI(title="rec", description="Real-time recommendations: post events, get items.")


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=ID_MAX, description="Who to recommend for.")
    k: int | None = Field(None, ge=1, description="How many items (default from config).")
    exclude: list[str] = Field(default_factory=list, max_length=1000,
                               description="Item ids never to return.")
    context: dict[str, str | int | float | bool] | None = Field(
        None, description="Request context (e.g. hour, device) passed to the ranker.")
    request_id: str | None = Field(None, max_length=ID_MAX, description="Caller's request id.")


class ItemBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn] = Field(min_length=1, description="Catalogue entries to upsert.")


def _errors(exc: ValidationError) -> list[dict]:
    return [{"field": ".".join(str(p) for p in e["loc"]) or "body", "error": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)]


@serve.deployment
@serve.ingress(api)
class Aggregator:
    def __init__(self, config: dict, profile=None, recall=None, ranker=None, trainer=None) -> None:
        pin_threads()
        self.config = RecConfig.model_validate(config)
        self.log = get_log()
        self.live = make_live(self.config)
        split = profile is not None
        self.stages = RemoteStages(profile, recall, ranker) if split else LocalStages(self.live)
        self.trainer = trainer
        self._started = asyncio.get_event_loop().create_task(self.live.start())

    # ---- helpers -----------------------------------------------------------------------------

    async def _body(self, request: Request) -> object:
        raw = await request.body()
        if len(raw) > self.config.serving.max_body_bytes:
            raise HTTPException(413, f"body larger than {self.config.serving.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"body is not valid JSON: {exc}") from exc

    async def _append(self, records: list[dict]) -> tuple[int, int]:
        first, last = await self.log.append.remote(records)
        return first, last

    async def _recommend(self, req: RecommendIn) -> dict:
        await self._started
        k = req.k or self.config.aggregate.default_k
        if k > self.config.aggregate.max_k:
            raise HTTPException(422, f"k: at most {self.config.aggregate.max_k}")
        view = await self.stages.view(req.user_id)
        cands = await self.stages.recall(view)
        scores = await self.stages.rank(view, cands, req.context)
        await self.live.sync(0.05)  # deletions and categories for the final filter
        return self.live.rec.finalize(view, cands, scores, k, frozenset(req.exclude),
                                      req.request_id or uuid.uuid4().hex)

    # ---- events ------------------------------------------------------------------------------

    @api.post("/events", summary="Record one event or a batch {'events': [...]}")
    async def post_events(self, request: Request) -> dict:
        body = await self._body(request)
        try:
            if isinstance(body, dict) and "events" in body:
                if isinstance(body["events"], list) and \
                        len(body["events"]) > self.config.eventlog.max_batch_events:
                    raise HTTPException(
                        413, f"events: at most {self.config.eventlog.max_batch_events} per batch")
                events = EventBatchIn.model_validate(body).events
            else:
                events = [EventIn.model_validate(body)]
        except ValidationError as exc:
            return JSONResponse({"detail": _errors(exc)}, status_code=422)
        if not self.config.serving.accept_unknown_items:
            await self.live.sync(0.05)
            unknown = sorted({e.item_id for e in events} - set(self.live.rec.catalog.index))
            if unknown:
                raise HTTPException(422, f"item_id: unknown items {unknown[:5]}")
        now = time.time()
        first, last = await self._append([e.to_record(now) for e in events])
        return {"accepted": len(events), "first_offset": first, "last_offset": last}

    # ---- recommendations ---------------------------------------------------------------------

    @api.get("/recommend", summary="Top-k items for a user")
    async def get_recommend(
        self,
        user_id: str = Query(min_length=1, max_length=ID_MAX, description="User id."),
        k: int | None = Query(None, ge=1, description="How many items."),
        exclude: str | None = Query(None, description="Comma-separated item ids to leave out."),
    ) -> dict:
        ex = [x for x in (exclude or "").split(",") if x]
        return await self._recommend(RecommendIn(user_id=user_id, k=k, exclude=ex))

    @api.post("/recommend", summary="Top-k items with exclusions and context")
    async def post_recommend(self, request: Request) -> dict:
        body = await self._body(request)
        try:
            req = RecommendIn.model_validate(body)
        except ValidationError as exc:
            return JSONResponse({"detail": _errors(exc)}, status_code=422)
        return await self._recommend(req)

    @api.get("/similar", summary="Items similar to an item")
    async def similar(
        self,
        item_id: str = Query(min_length=1, max_length=ID_MAX, description="Item id."),
        k: int = Query(10, ge=1, le=200, description="How many items."),
    ) -> dict:
        await self._started
        await self.live.sync(0.05)
        items = self.live.rec.similar(item_id, k)
        if items is None:
            raise HTTPException(404, f"item_id: unknown item {item_id!r}")
        return {"item_id": item_id, "items": items, "model_version": self.live.rec.version}

    # ---- catalogue and users -----------------------------------------------------------------

    @api.post("/items", summary="Add or update catalogue items (one, or {'items': [...]})")
    async def post_items(self, request: Request) -> dict:
        body = await self._body(request)
        try:
            if isinstance(body, dict) and "items" in body:
                items = ItemBatchIn.model_validate(body).items
            else:
                items = [ItemIn.model_validate(body)]
        except ValidationError as exc:
            return JSONResponse({"detail": _errors(exc)}, status_code=422)
        now = time.time()
        first, last = await self._append([item_record(i, now) for i in items])
        return {"accepted": len(items), "first_offset": first, "last_offset": last}

    @api.get("/items/{item_id}", summary="One catalogue item")
    async def get_item(self, item_id: str) -> dict:
        await self._started
        await self.live.sync()
        info = self.live.rec.item_info(item_id)
        if info is None:
            raise HTTPException(404, f"item_id: unknown item {item_id!r}")
        return info

    @api.delete("/items/{item_id}", summary="Remove an item from recommendations for good")
    async def delete_item(self, item_id: str) -> dict:
        first, _ = await self._append([item_delete_record(item_id, time.time())])
        return {"item_id": item_id, "deleted": True, "offset": first}

    @api.delete("/users/{user_id}", summary="Forget a user: profile and events")
    async def delete_user(self, user_id: str) -> dict:
        first, _ = await self._append([user_delete_record(user_id, time.time())])
        removed = await self.log.forget_user.remote(user_id)
        return {"user_id": user_id, "deleted_events": removed, "offset": first}

    # ---- operations --------------------------------------------------------------------------

    @api.get("/healthz", summary="The process is up")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="200 only when a recommendation can be served")
    async def readyz(self) -> JSONResponse:
        if not self._started.done():
            return JSONResponse({"ready": False, "why": "loading"}, status_code=503)
        if self.live.rec.model is None:
            return JSONResponse({"ready": False, "why": "no model published yet"}, 503)
        try:
            out = await self._recommend(RecommendIn(user_id="__readyz__", k=1))
        except Exception as exc:  # not ready is an answer, not a crash
            return JSONResponse({"ready": False, "why": repr(exc)}, status_code=503)
        if not out["items"]:
            return JSONResponse({"ready": False, "why": "no items to recommend"}, 503)
        return JSONResponse({"ready": True, "model_version": out["model_version"]})

    @api.get("/models", summary="Model versions: served, published, available")
    async def models(self) -> dict:
        root = self.config.model_dir
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and
                           not p.name.startswith(".")) if root.exists() else []
        model = self.live.rec.model
        return {"serving": self.live.rec.version, "published": current_version(root),
                "available": available, "reloads": self.live.reloads,
                "metrics": model.metrics if model else None}

    @api.post("/admin/retrain", summary="Retrain from the log now (needs X-API-Key)")
    async def retrain(self, request: Request, wait: bool = Query(
            False, description="Answer when the new version is published.")) -> JSONResponse:
        if request.headers.get("x-api-key") != self.config.serving.api_key:
            raise HTTPException(401, "X-API-Key header missing or wrong")
        if self.trainer is None:
            raise HTTPException(503, "no trainer in this deployment")
        ref = self.trainer.retrain.remote()
        if not wait:
            return JSONResponse({"started": True}, status_code=202)
        return JSONResponse(await ref)
