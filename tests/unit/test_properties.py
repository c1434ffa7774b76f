"""Property tests (hypothesis): event parsing takes anything JSON and answers an event or a
ValidationError, never a crash; the log's frame reader fed truncated and corrupted segments
answers a cut tail (a prefix of what was written) or CorruptLogError, never a wrong record."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rec.eventlog import CorruptLogError, EventLog
from rec.events import EVENT_TYPES, EventBatchIn, EventIn, ItemIn
from tests.unit.test_eventlog import make_records, segments, with_offsets

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELD = st.sampled_from(["user_id", "item_id", "type", "value", "ts", "context", "request_id", "x"])
# bodies shaped like events: the real keys, each with any JSON value, or a plausible one
PLAUSIBLE = {
    "user_id": st.text(min_size=0, max_size=140),
    "item_id": st.text(min_size=0, max_size=140),
    "type": st.sampled_from([*EVENT_TYPES, "", "CLICK", "teleport"]),
    "value": st.none() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
    "ts": st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
}
EVENTISH = st.fixed_dictionaries(
    {}, optional={k: v | JSON for k, v in PLAUSIBLE.items()} | {"context": JSON, "extra": JSON}
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.one_of(JSON, EVENTISH, st.dictionaries(FIELD, JSON, max_size=6)))
def test_event_parsing_answers_an_event_or_a_validation_error(body) -> None:
    for model in (EventIn, EventBatchIn, ItemIn):
        try:
            parsed = model.model_validate(body)
        except ValidationError as exc:
            assert exc.errors(), body  # says which field
            continue
        if isinstance(parsed, EventIn):
            record = parsed.to_record(now=1.0)
            assert record["user_id"] == parsed.user_id and record["type"] == parsed.type
            assert len(parsed.user_id) >= 1 and len(parsed.item_id) >= 1
            assert parsed.type in EVENT_TYPES


@FAST
@given(st.lists(EVENTISH, min_size=1, max_size=5))
def test_a_batch_is_all_valid_or_refused_whole(events) -> None:
    try:
        batch = EventBatchIn.model_validate({"events": events})
    except ValidationError:
        return
    assert len(batch.events) == len(events)


def _written(root: Path, sizes: list[int]) -> list[dict]:
    out, offset = [], 0
    with EventLog(root) as log:
        for n, size in enumerate(sizes):
            records = make_records(size, seed=n)
            log.append(records)
            out += with_offsets(records, offset)
            offset += size
    return out


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    where=st.floats(0.0, 1.0),
    damage=st.sampled_from(["truncate", "flip", "overwrite", "append"]),
    junk=st.binary(min_size=1, max_size=64),
)
def test_a_damaged_segment_opens_to_a_prefix_or_a_clear_error(sizes, where, damage, junk):
    root = Path(tempfile.mkdtemp())
    try:
        written = _written(root, sizes)
        seg = segments(root)[-1]
        data = bytearray(seg.read_bytes())
        at = min(int(where * len(data)), len(data) - 1)
        if damage == "truncate":
            data = data[:at]
        elif damage == "flip":
            data[at] ^= 0xFF
        elif damage == "overwrite":
            data[at : at + len(junk)] = junk
        else:
            data += junk
        seg.write_bytes(bytes(data))
        try:
            log = EventLog(root)
        except CorruptLogError:
            return  # damage before valid frames: refused, not guessed at
        with log:
            got = log.read()
            assert got == written[: len(got)]  # a prefix: never a wrong or reordered record
            assert log.next_offset == len(got)
            if damage == "append":
                assert got == written  # junk after the last frame only cuts the junk
            assert log.append(make_records(1, seed=99)) == (len(got), len(got))
    finally:
        shutil.rmtree(root, ignore_errors=True)
