"""Checkpoints of the live state: a state loaded from one and fed the records after it is the
state a full replay builds, for the version it was taken under and for a newer one."""

from __future__ import annotations

import numpy as np
import pytest

from rec import checkpoint
from rec.data import generate
from rec.events import ItemIn, event_record, item_delete_record, item_record, user_delete_record
from rec.pipeline import Recommender
from rec.state import LiveState
from rec.train import snapshot_table, train
from tests.unit.test_pipeline import make_config

CONFIG = make_config()
MODEL_RECORDS = 3000
CUT = 4000  # the checkpoint's offset in the tests that take one after the model's


@pytest.fixture(scope="module")
def log() -> list[dict]:
    """Items, then events, with a deleted item, a re-posted one, a deleted user and a new item
    in the part after the checkpoint."""
    ds = generate(n_users=150, n_items=80, n_events=5000, seed=3)
    records = ds.item_records() + ds.event_records()
    users = sorted({r["user_id"] for r in records if r["kind"] == "event"})
    extra = [
        item_delete_record(records[3]["item_id"], ts=1.7e9),
        user_delete_record(users[0], ts=1.7e9),
        item_record(ItemIn(item_id="fresh", category="c01", title="Fresh"), ts=1.7e9),
        event_record(user_id=users[1], item_id="fresh", type="purchase", ts=1.7e9),
        event_record(user_id="newcomer", item_id="fresh", type="click", ts=1.7e9),
        item_delete_record(records[5]["item_id"], ts=1.7e9),
        item_record(ItemIn(item_id=records[5]["item_id"], category="c02"), ts=1.7e9),
    ]
    records = records[:3500] + extra[:3] + records[3500:] + extra[3:]
    return snapshot_table(records).to_pylist()


@pytest.fixture(scope="module")
def v1(log):
    return train(snapshot_table(log[:MODEL_RECORDS]), CONFIG, fit_ranker=None, version="v1")


@pytest.fixture(scope="module")
def v2(log):
    return train(snapshot_table(log[:CUT]), CONFIG, fit_ranker=None, version="v2")


def replayed(model, log) -> Recommender:
    r = Recommender(CONFIG, model)
    r.apply(log)
    return r


def from_checkpoint(tmp_path, taken: Recommender, model, log, **parts) -> Recommender:
    path = checkpoint.save(taken.state, tmp_path)
    state = checkpoint.load(path, CONFIG, model.basis if model else None, **parts)
    r = Recommender(
        CONFIG,
        model,
        profiles=parts.get("profiles", True),
        recall=parts.get("stats", True),
        state=state,
    )
    r.apply(log[state.offset :])
    return r


def assert_same_state(a: LiveState, b: LiveState) -> None:
    """Equal by item id (a rebased catalogue may order the items a model does not know
    differently)."""
    assert a.offset == b.offset and a.model_offset == b.model_offset
    assert sorted(a.catalog.ids) == sorted(b.catalog.ids)
    assert a.catalog.meta == b.catalog.meta and a.catalog.deleted == b.catalog.deleted
    if a.profiles is not None:
        assert len(a.profiles) == len(b.profiles)
        for user, p in a.profiles.users.items():
            q = b.profiles.users.get(user)
            assert q is not None, user
            assert (list(p.recent), p.items, p.tags, p.counts, p.last_ts) == (
                list(q.recent),
                q.items,
                q.tags,
                q.counts,
                q.last_ts,
            )
            assert a.profiles.view(user) == b.profiles.view(user)
    if a.stats is not None:
        ida, idb = a.catalog.ids, b.catalog.ids
        pa = {ida[i]: c for i, c in enumerate(a.stats.pop_counts[: len(ida)]) if c}
        pb = {idb[i]: c for i, c in enumerate(b.stats.pop_counts[: len(idb)]) if c}
        assert pa == pb
        assert len(a.stats.users) == len(b.stats.users)
        for user, x in a.stats.users.items():
            y = b.stats.users.get(user)
            assert {ida[i] for i in x.touched} == {idb[i] for i in y.touched}
            assert [ida[i] for i in x.partners] == [idb[i] for i in y.partners]
        assert list(a.stats.new_items) == list(b.stats.new_items)
        np.testing.assert_allclose(
            a.stats.trend.vector(a.catalog)[[a.catalog.index[i] for i in sorted(ida)]],
            b.stats.trend.vector(b.catalog)[[b.catalog.index[i] for i in sorted(ida)]],
        )

        def cooc(s: LiveState) -> dict:
            ids = s.catalog.ids
            return {
                (ids[i], ids[j]): c
                for i in s.stats.cooc.partners
                for j, c in zip(*s.stats.cooc.row(i), strict=True)
            }

        assert cooc(a) == cooc(b)


def test_a_checkpoint_then_the_tail_is_a_full_replay(tmp_path, v1, log) -> None:
    full = replayed(v1, log)
    taken = replayed(v1, log[:CUT])
    resumed = from_checkpoint(tmp_path, taken, v1, log)
    assert resumed.state.model_version == "v1" and resumed.offset == len(log)
    assert_same_state(full.state, resumed.state)
    users = [u for u in full.profiles.users.live][:25] + ["newcomer", "nobody"]
    for user in users:
        assert full.recommend(user, 10, request_id="r") == resumed.recommend(
            user, 10, request_id="r"
        )


def test_a_checkpoint_of_a_checkpoint_keeps_its_unchanged_users(tmp_path, v1, log) -> None:
    """The second checkpoint merges the first's untouched rows with the users written since."""
    first = from_checkpoint(tmp_path / "a", replayed(v1, log[:3200]), v1, log[:CUT])
    assert first.profiles.users.origin is not None and first.profiles.users.live
    resumed = from_checkpoint(tmp_path / "b", first, v1, log)
    assert_same_state(replayed(v1, log).state, resumed.state)


def test_a_newer_version_starts_from_a_checkpoint_taken_before_its_training(
    tmp_path, v1, v2, log
) -> None:
    taken = replayed(v1, log[:CUT])  # the trainer's checkpoint at v2's snapshot offset
    resumed = from_checkpoint(tmp_path, taken, v2, log)
    full = replayed(v2, log)
    assert resumed.state.model_version == "v2"
    assert resumed.catalog.ids[: v2.n_items] == v2.item_ids
    assert_same_state(full.state, resumed.state)
    for user in list(full.profiles.users.live)[:25]:
        assert full.recommend(user, 10)["items"] == resumed.recommend(user, 10)["items"]


def test_a_swap_shares_the_serving_profiles_and_applies_each_record_once(
    tmp_path, v1, v2, log
) -> None:
    """A replica's swap: the next version's state starts from a checkpoint without profiles
    and takes the serving state's store, which is ahead of it; the two then apply the log in
    interleaved pages (the serving one follows requests, the warming one replays). Every
    record reaches the store once, and the warming state ends as a full replay of v2."""
    serving = replayed(v1, log[:4500])
    path = checkpoint.save(replayed(v1, log[:CUT]).state, tmp_path)
    warming_state = checkpoint.load(path, CONFIG, v2.basis, profiles=False)
    assert warming_state.profiles is None and warming_state.offset == CUT
    with pytest.raises(ValueError, match="behind"):
        warming_state.share_profiles(replayed(v1, log[:3000]).state)
    warming_state.share_profiles(serving.state)
    warming = Recommender(CONFIG, v2, state=warming_state)
    for who, stop in ((warming, 4300), (serving, 4700), (warming, 4700), (serving, len(log))):
        who.apply(log[who.offset : stop])
    assert warming.profiles is serving.profiles and warming.profiles.offset == len(log)
    with pytest.raises(ValueError, match="shared"):  # its counts are behind its profiles
        checkpoint.save(warming.state, tmp_path / "mid")
    warming.apply(log[warming.offset :])
    assert_same_state(replayed(v2, log).state, warming.state)
    assert checkpoint.save(warming.state, tmp_path / "end").exists()


def test_a_checkpoint_taken_after_a_versions_training_cannot_serve_it(tmp_path, v1, v2, log):
    path = checkpoint.save(replayed(v1, log[: CUT + 100]).state, tmp_path)
    assert checkpoint.usable(tmp_path, v2.basis) == []
    assert checkpoint.usable(tmp_path, v1.basis) == [path]
    assert checkpoint.usable(tmp_path, v2.basis, any_version=True) == [path]
    with pytest.raises(ValueError, match="cannot serve"):
        checkpoint.load(path, CONFIG, v2.basis)
    profiles_only = checkpoint.load(path, CONFIG, v2.basis, stats=False)
    assert profiles_only.stats is None and len(profiles_only.profiles) > 0


def test_each_stage_loads_its_part(tmp_path, v1, log) -> None:
    full = replayed(v1, log)
    taken = replayed(v1, log[:CUT])
    profiles = from_checkpoint(tmp_path, taken, None, log, stats=False)
    assert profiles.state.stats is None and len(profiles.profiles) == len(full.profiles)
    for user in list(full.profiles.users.live)[:25] + ["newcomer"]:
        assert profiles.view(user) == full.view(user)
    recall = from_checkpoint(tmp_path, taken, v1, log, profiles=False)
    assert recall.state.profiles is None
    recall_only = Recommender(CONFIG, v1, profiles=False)
    recall_only.apply(log)
    assert_same_state(recall_only.state, recall.state)


def test_usable_prefers_its_own_version_and_collect_keeps_the_newest(tmp_path, v1, v2, log):
    old = checkpoint.save(replayed(v1, log[:2000]).state, tmp_path)
    at_cut = checkpoint.save(replayed(v1, log[:CUT]).state, tmp_path)
    own = checkpoint.save(replayed(v2, log[: CUT + 500]).state, tmp_path)
    assert checkpoint.usable(tmp_path, v2.basis) == [own, at_cut, old]
    (tmp_path / ".000000000009-v2.tmp").mkdir()
    assert checkpoint.collect(tmp_path, keep=2) == [old.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([at_cut.name, own.name])


def test_a_state_without_a_model_checkpoints_too(tmp_path, log) -> None:
    full = replayed(None, log)
    resumed = from_checkpoint(tmp_path, replayed(None, log[:CUT]), None, log)
    assert resumed.state.model_version is None
    assert_same_state(full.state, resumed.state)
