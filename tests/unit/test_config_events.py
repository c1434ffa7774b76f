"""Config models (defaults, YAML round trip, strictness, documentation) and the event schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from rec.config import AggregateConfig, RecallConfig, RecConfig
from rec.events import (
    CONTEXT_MAX_KEYS,
    EVENT_TYPES,
    ID_MAX,
    KIND_EVENT,
    KIND_ITEM,
    KIND_ITEM_DELETE,
    KIND_USER_DELETE,
    EventBatchIn,
    EventIn,
    ItemIn,
    event_record,
    item_delete_record,
    item_record,
    parse_context,
    parse_payload,
    user_delete_record,
)

# ---------------------------------------------------------------------------------------------
# config


def _config_models(model: type[BaseModel], seen: set | None = None) -> list[type[BaseModel]]:
    """`model` and every config model nested in its fields, depth first."""
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for field in model.model_fields.values():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _config_models(ann, seen)
    return out


def test_default_config_equals_validated_empty_dict() -> None:
    assert RecConfig() == RecConfig.model_validate({})


def test_yaml_round_trip_of_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rec.yaml"
    path.write_text(RecConfig().to_yaml())
    assert RecConfig.from_yaml(path) == RecConfig()


def test_yaml_round_trip_of_non_defaults(tmp_path: Path) -> None:
    config = RecConfig.model_validate(
        {
            "data_dir": "/srv/rec",
            "seed": 7,
            "recall": {"similarity": "pearson", "index": "brute", "per_source": 12},
            "ranker": {"hidden": [8, 4], "dropout": 0.0},
            "aggregate": {"max_per_category": 2},
            "profile": {"type_weights": {"view": 0.5}},
            "serving": {"topology": "split"},
        }
    )
    path = tmp_path / "rec.yaml"
    path.write_text(config.to_yaml())
    loaded = RecConfig.from_yaml(path)
    assert loaded == config
    assert loaded.data_dir == Path("/srv/rec")
    assert loaded.ranker.hidden == [8, 4]
    assert loaded.aggregate.max_per_category == 2


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert RecConfig.from_yaml(path) == RecConfig()


def test_data_dir_derived_paths() -> None:
    config = RecConfig(data_dir=Path("/d"))
    assert config.log_dir == Path("/d/log")
    assert config.model_dir == Path("/d/models")


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"seeed": 1}, ("seeed",)),
        ({"recall": {"simlarity": "cosine"}}, ("recall", "simlarity")),
        ({"ranker": {"epochs": 1, "lr": 0.1}}, ("ranker", "lr")),
        ({"serving": {"topology": "fused", "extra": True}}, ("serving", "extra")),
    ],
)
def test_unknown_keys_are_rejected_at_any_depth(data: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as info:
        RecConfig.model_validate(data)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [loc]
    assert errors[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    "data",
    [
        {"recall": {"similarity": "jaccard"}},
        {"recall": {"per_source": 0}},
        {"ranker": {"dropout": 1.0}},
        {"aggregate": {"explore_fraction": 1.5}},
        {"aggregate": {"max_per_category": 0}},
    ],
)
def test_out_of_range_values_are_rejected(data: dict) -> None:
    with pytest.raises(ValidationError):
        RecConfig.model_validate(data)


def test_assignment_is_validated() -> None:
    config = RecConfig()
    with pytest.raises(ValidationError):
        config.recall.per_source = 0
    with pytest.raises(ValidationError):
        config.aggregate = {"max_k": 0}  # type: ignore[assignment]
    config.aggregate = {"max_k": 5}  # type: ignore[assignment]
    assert config.aggregate == AggregateConfig(max_k=5)


def test_every_config_field_has_a_description() -> None:
    models = _config_models(RecConfig)
    assert RecallConfig in models and len(models) == 10  # RecConfig + its 9 sections
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert missing == []


# ---------------------------------------------------------------------------------------------
# events

VALID = {"user_id": "u1", "item_id": "i1", "type": "click"}


def _error_locs(data: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as info:
        EventIn.model_validate(data)
    return [e["loc"] for e in info.value.errors()]


def test_valid_event_is_accepted() -> None:
    ev = EventIn.model_validate(
        {
            **VALID,
            "value": 2.5,
            "ts": 10.0,
            "context": {"device": "ios", "hour": 3, "x": 1.5, "ok": True},
            "request_id": "r1",
        }
    )
    assert (ev.user_id, ev.item_id, ev.type, ev.value, ev.ts) == ("u1", "i1", "click", 2.5, 10.0)
    assert ev.context == {"device": "ios", "hour": 3, "x": 1.5, "ok": True}


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_accepted(event_type: str) -> None:
    value = 4.0 if event_type == "rating" else None
    assert EventIn.model_validate({**VALID, "type": event_type, "value": value}).type == event_type


def test_ids_are_stripped_of_whitespace() -> None:
    ev = EventIn.model_validate({**VALID, "user_id": "  u1 ", "item_id": "\ti1\n"})
    assert (ev.user_id, ev.item_id) == ("u1", "i1")


@pytest.mark.parametrize("field", ["user_id", "item_id", "type"])
def test_missing_required_field_is_named(field: str) -> None:
    data = {k: v for k, v in VALID.items() if k != field}
    assert _error_locs(data) == [(field,)]


@pytest.mark.parametrize("field", ["user_id", "item_id"])
@pytest.mark.parametrize("bad", [5, 5.0, None, ["u"]])
def test_ids_must_be_strings(field: str, bad) -> None:
    """Pydantic's lax mode does not coerce numbers to str, so a numeric id is an error."""
    assert _error_locs({**VALID, field: bad}) == [(field,)]


@pytest.mark.parametrize("field", ["user_id", "item_id"])
@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_ids_are_rejected(field: str, bad: str) -> None:
    assert _error_locs({**VALID, field: bad}) == [(field,)]


@pytest.mark.parametrize("field", ["user_id", "item_id", "request_id"])
def test_ids_longer_than_the_limit_are_rejected(field: str) -> None:
    EventIn.model_validate({**VALID, field: "x" * ID_MAX})
    assert _error_locs({**VALID, field: "x" * (ID_MAX + 1)}) == [(field,)]


def test_unknown_type_is_rejected() -> None:
    assert _error_locs({**VALID, "type": "follow"}) == [("type",)]


def test_extra_fields_are_rejected() -> None:
    assert _error_locs({**VALID, "score": 1.0}) == [("score",)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_non_finite_value_is_rejected(bad) -> None:
    assert _error_locs({**VALID, "value": bad}) == [("value",)]


def test_rating_without_value_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        EventIn.model_validate({**VALID, "type": "rating"})
    assert "required for type 'rating'" in str(info.value)
    assert EventIn.model_validate({**VALID, "type": "rating", "value": 1}).value == 1.0


def test_rating_without_value_names_the_field() -> None:
    assert _error_locs({**VALID, "type": "rating"}) == [("value",)]


def test_negative_ts_is_rejected() -> None:
    assert _error_locs({**VALID, "ts": -1.0}) == [("ts",)]
    assert EventIn.model_validate({**VALID, "ts": 0}).ts == 0.0


def test_nan_ts_is_rejected() -> None:
    assert _error_locs({**VALID, "ts": math.nan}) == [("ts",)]


def test_infinite_ts_is_rejected() -> None:
    assert _error_locs({**VALID, "ts": math.inf}) == [("ts",)]


def test_context_key_limit() -> None:
    ok = {str(i): i for i in range(CONTEXT_MAX_KEYS)}
    assert EventIn.model_validate({**VALID, "context": ok}).context == ok
    too_many = {str(i): i for i in range(CONTEXT_MAX_KEYS + 1)}
    assert _error_locs({**VALID, "context": too_many}) == [("context",)]


def test_context_values_must_be_scalars() -> None:
    locs = _error_locs({**VALID, "context": {"nested": {"a": 1}}})
    assert locs and all(loc[:2] == ("context", "nested") for loc in locs)


def test_to_record_fills_ts_with_now_only_when_missing() -> None:
    rec = EventIn.model_validate(VALID).to_record(now=123.0)
    assert rec["ts"] == 123.0
    assert EventIn.model_validate({**VALID, "ts": 5}).to_record(now=123.0)["ts"] == 5.0


def test_to_record_format() -> None:
    ev = EventIn.model_validate(
        {
            **VALID,
            "type": "rating",
            "value": 4,
            "ts": 1.5,
            "context": {"b": 1, "a": "x"},
            "request_id": "r",
        }
    )
    rec = ev.to_record()
    assert rec == {
        "kind": KIND_EVENT,
        "user_id": "u1",
        "item_id": "i1",
        "type": "rating",
        "value": 4.0,
        "ts": 1.5,
        "context": '{"b":1,"a":"x"}',
        "request_id": "r",
        "payload": None,
    }
    assert parse_context(rec) == {"b": 1, "a": "x"}
    assert parse_context(EventIn.model_validate(VALID).to_record(now=0.0)) == {}


def test_event_record_stores_no_context_when_empty() -> None:
    rec = event_record(user_id="u", item_id="i", type="view", ts=1, context={})
    assert rec["context"] is None and isinstance(rec["ts"], float)


def test_batch_needs_at_least_one_event() -> None:
    with pytest.raises(ValidationError):
        EventBatchIn.model_validate({"events": []})
    batch = EventBatchIn.model_validate({"events": [VALID, {**VALID, "item_id": "i2"}]})
    assert [e.item_id for e in batch.events] == ["i1", "i2"]


def test_item_record_carries_metadata_payload() -> None:
    item = ItemIn(item_id="i9", category="shoes", tags=["red", "sale"], title="Red shoes")
    rec = item_record(item, ts=7)
    assert rec["kind"] == KIND_ITEM and rec["item_id"] == "i9" and rec["ts"] == 7.0
    assert rec["user_id"] is None and rec["type"] is None
    assert json.loads(rec["payload"]) == {
        "category": "shoes",
        "tags": ["red", "sale"],
        "title": "Red shoes",
    }
    assert parse_payload(rec) == json.loads(rec["payload"])


def test_item_in_limits() -> None:
    with pytest.raises(ValidationError):
        ItemIn(item_id="i", tags=["t"] * 65)
    with pytest.raises(ValidationError):
        ItemIn(item_id="i", title="x" * 513)
    with pytest.raises(ValidationError):
        ItemIn.model_validate({"item_id": "i", "price": 3})


def test_delete_records() -> None:
    item = item_delete_record("i1", ts=3)
    user = user_delete_record("u1", ts=4)
    assert (item["kind"], item["item_id"], item["user_id"], item["ts"]) == (
        KIND_ITEM_DELETE,
        "i1",
        None,
        3.0,
    )
    assert (user["kind"], user["user_id"], user["item_id"], user["ts"]) == (
        KIND_USER_DELETE,
        "u1",
        None,
        4.0,
    )
    # Every record kind shares one set of fields (the log's schema).
    keys = set(event_record(user_id="u", item_id="i", type="view", ts=0))
    assert set(item) == set(user) == keys
    assert parse_payload(item) == {} and parse_context(user) == {}
