"""Event schema and validation, and the record format every log entry shares.

The log is the single source of truth: user behaviour, catalogue changes and user deletions are
all records in it, and every piece of serving state (profiles, co-occurrence, catalogue) is a
view rebuilt by replaying it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

EVENT_TYPES = (
    "view",
    "click",
    "add_to_cart",
    "purchase",
    "rating",
    "like",
    "share",
    "skip",
    "dislike",
)

# Record kinds in the log.
KIND_EVENT = "event"
KIND_ITEM = "item"
KIND_ITEM_DELETE = "item_delete"
KIND_USER_DELETE = "user_delete"
KIND_IMPRESSION = "impression"  # what a /recommend answer showed; training reads it as feedback
KINDS = (KIND_EVENT, KIND_ITEM, KIND_ITEM_DELETE, KIND_USER_DELETE, KIND_IMPRESSION)

ID_MAX = 128
CONTEXT_MAX_KEYS = 32

ContextValue = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class EventIn(_Strict):
    """One user interaction as an app posts it."""

    user_id: str = Field(min_length=1, max_length=ID_MAX, description="The acting user.")
    item_id: str = Field(min_length=1, max_length=ID_MAX, description="The item acted on.")
    type: Literal[EVENT_TYPES] = Field(description="Interaction type.")  # type: ignore[valid-type]
    value: float | None = Field(
        None, validate_default=True, description="Rating or other strength; required for 'rating'."
    )
    ts: float | None = Field(
        None, ge=0, description="Event time, Unix seconds; the server's clock when omitted."
    )
    context: dict[str, ContextValue] | None = Field(
        None, description="Free context (device, page, hour ...), at most 32 keys."
    )
    request_id: str | None = Field(
        None, max_length=ID_MAX, description="The /recommend request this event is feedback on."
    )

    @field_validator("value", "ts")
    @classmethod
    def _finite(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None and info.field_name == "value" and info.data.get("type") == "rating":
            raise ValueError("required for type 'rating'")
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("context")
    @classmethod
    def _small_context(cls, v: dict | None) -> dict | None:
        if v is not None and len(v) > CONTEXT_MAX_KEYS:
            raise ValueError(f"at most {CONTEXT_MAX_KEYS} keys")
        return v

    def to_record(self, now: float | None = None) -> dict:
        return event_record(
            user_id=self.user_id,
            item_id=self.item_id,
            type=self.type,
            value=self.value,
            ts=self.ts if self.ts is not None else (now if now is not None else time.time()),
            context=self.context,
            request_id=self.request_id,
        )


class EventBatchIn(_Strict):
    events: list[EventIn] = Field(min_length=1, description="Events to append atomically.")


class ItemIn(_Strict):
    """A catalogue entry."""

    item_id: str = Field(min_length=1, max_length=ID_MAX, description="Item id.")
    category: str | None = Field(None, max_length=ID_MAX, description="Main category.")
    tags: list[str] = Field(default_factory=list, max_length=64, description="Descriptive tags.")
    title: str | None = Field(None, max_length=512, description="Human-readable title.")


def event_record(
    *,
    user_id: str,
    item_id: str,
    type: str,
    ts: float,
    value: float | None = None,
    context: dict | None = None,
    request_id: str | None = None,
) -> dict:
    """A behaviour record in log format (the log adds `offset`)."""
    return {
        "kind": KIND_EVENT,
        "user_id": user_id,
        "item_id": item_id,
        "type": type,
        "value": value,
        "ts": float(ts),
        "context": json.dumps(context, separators=(",", ":")) if context else None,
        "request_id": request_id,
        "payload": None,
    }


def item_record(item: ItemIn, ts: float) -> dict:
    payload = {"category": item.category, "tags": item.tags, "title": item.title}
    return {
        "kind": KIND_ITEM,
        "user_id": None,
        "item_id": item.item_id,
        "type": None,
        "value": None,
        "ts": float(ts),
        "context": None,
        "request_id": None,
        "payload": json.dumps(payload, separators=(",", ":")),
    }


def item_delete_record(item_id: str, ts: float) -> dict:
    return {**_empty(ts), "kind": KIND_ITEM_DELETE, "item_id": item_id}


def user_delete_record(user_id: str, ts: float) -> dict:
    return {**_empty(ts), "kind": KIND_USER_DELETE, "user_id": user_id}


def impression_record(
    user_id: str, request_id: str, item_ids: list[str], model_version: str | None, ts: float
) -> dict:
    payload = {"items": item_ids, "model_version": model_version}
    return {
        **_empty(ts),
        "kind": KIND_IMPRESSION,
        "user_id": user_id,
        "request_id": request_id,
        "payload": json.dumps(payload, separators=(",", ":")),
    }


def _empty(ts: float) -> dict:
    return {
        "kind": None,
        "user_id": None,
        "item_id": None,
        "type": None,
        "value": None,
        "ts": float(ts),
        "context": None,
        "request_id": None,
        "payload": None,
    }


def parse_context(record: dict) -> dict:
    raw = record.get("context")
    return json.loads(raw) if raw else {}


def parse_payload(record: dict) -> dict:
    raw = record.get("payload")
    return json.loads(raw) if raw else {}
