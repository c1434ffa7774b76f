"""The in-process serving pipeline (`Recommender`) and model versions on disk (`ModelBundle`).

One small synthetic log is trained on once per module: the model sees the first 4000 records,
the pipeline follows all of them, so the last ~1100 events arrive "live" after the model."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from rec.config import RecConfig
from rec.data import generate
from rec.events import ItemIn, event_record, item_delete_record, item_record, user_delete_record
from rec.features import DENSE_FEATURES, ORDERINGS
from rec.finalize import reason
from rec.model import ModelBundle, current_version, load_saved_index, new_version_name, publish
from rec.pipeline import Recommender
from rec.recall import EASE
from rec.recall.stage import SOURCES, merge_lists
from rec.train import snapshot_table, train

MODEL_RECORDS = 4000


def make_config(**sections) -> RecConfig:
    data = {
        "recall": {"embedding_dim": 16, "index": "brute", "per_source": 50},
        "ranker": {"epochs": 1, "hidden": [16], "item_embedding_dim": 8, "device": "cpu"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return RecConfig.model_validate(data)


CONFIG = make_config()


@pytest.fixture(scope="module")
def log() -> list[dict]:
    """Items then events of a small synthetic data set, as log records with offsets."""
    ds = generate(n_users=200, n_items=100, n_events=5000, seed=0)
    return snapshot_table(ds.item_records() + ds.event_records()).to_pylist()


@pytest.fixture(scope="module")
def model(log) -> ModelBundle:
    return train(snapshot_table(log[:MODEL_RECORDS]), CONFIG, version="v1")


@pytest.fixture(scope="module")
def model2(log) -> ModelBundle:
    return train(snapshot_table(log[:4500]), CONFIG, fit_ranker=None, version="v2")


@pytest.fixture
def rec(model, log) -> Recommender:
    r = Recommender(CONFIG, model)
    r.apply(log)
    return r


@pytest.fixture(scope="module")
def users(log) -> list[str]:
    """Users by number of events, most active first."""
    counts: dict[str, int] = {}
    for r in log:
        if r["kind"] == "event":
            counts[r["user_id"]] = counts.get(r["user_id"], 0) + 1
    return sorted(counts, key=lambda u: (-counts[u], u))


def live(r: Recommender, *records: dict) -> list[dict]:
    """Append records to the log after everything applied so far, and apply them."""
    batch = [{**rec, "offset": r.offset + n} for n, rec in enumerate(records)]
    r.apply(batch)
    return batch


def ev(user: str, item: str, type_: str = "click", ts: float = 1_706_000_000.0) -> dict:
    return event_record(
        user_id=user, item_id=item, type=type_, ts=ts, value=4.0 if type_ == "rating" else None
    )


def ids(response: dict) -> list[str]:
    return [x["item_id"] for x in response["items"]]


def test_fixture_model(model, rec) -> None:
    assert model.ranker is not None and model.log_offset == MODEL_RECORDS
    assert rec.version == "v1" and rec.offset == 5100 and len(rec.catalog) == 100


# ---------------------------------------------------------------------------------------------
# read-your-writes, deletions, new items


@pytest.mark.parametrize("user_rank", [0, 50, 199])
def test_read_your_writes(rec, users, user_rank) -> None:
    user = users[user_rank]
    for type_ in ("view", "click", "purchase", "skip"):
        top = ids(rec.recommend(user))[0]
        live(rec, ev(user, top, type_))
        assert rec.view(user).recent[-1][0] == top
        assert top not in ids(rec.recommend(user, k=50))


def test_read_your_writes_for_a_new_user(rec) -> None:
    first = ids(rec.recommend("fresh"))
    live(rec, ev("fresh", first[0]))
    view = rec.view("fresh")
    assert view.known and [r[0] for r in view.recent] == [first[0]]
    second = ids(rec.recommend("fresh", k=50))
    assert first[0] not in second and second


def test_deleted_items_are_never_served(rec, users) -> None:
    top = ids(rec.recommend(users[0]))[0]
    neighbour = rec.similar(top)[0]["item_id"]
    live(
        rec,
        item_delete_record(top, ts=1_706_000_000.0),
        item_delete_record(neighbour, ts=1_706_000_000.0),
    )
    gone = {top, neighbour}
    for user in users[:40]:
        assert not gone & set(ids(rec.recommend(user, k=50)))
        assert not gone & set(rec.recall(rec.view(user)).item_ids)
    for item_id in rec.catalog.ids:
        assert not gone & {x["item_id"] for x in rec.similar(item_id, k=100)}
    assert rec.item_info(top)["deleted"] is True


def test_event_on_a_deleted_item_does_not_bring_it_back(rec, users) -> None:
    top = ids(rec.recommend(users[0]))[0]
    live(rec, item_delete_record(top, ts=1_706_000_000.0), ev("someone", top, "purchase"))
    assert top not in ids(rec.recommend(users[1], k=50))
    assert top not in rec.recall(rec.view(users[1])).item_ids


def test_reposting_a_deleted_item_undeletes_it(rec) -> None:
    item = rec.catalog.ids[5]
    live(rec, item_delete_record(item, ts=1.7e9))
    live(rec, item_record(ItemIn(item_id=item, category="c01"), ts=1.7e9))
    assert item not in rec.catalog.deleted and rec.catalog.category(item) == "c01"
    assert rec.item_info(item)["deleted"] is False


def test_reposting_a_deleted_item_makes_it_searchable_again(rec) -> None:
    item = rec.catalog.ids[5]
    live(rec, item_delete_record(item, ts=1.7e9))
    assert len(rec.index) == 99
    live(rec, item_record(ItemIn(item_id=item, category="c01"), ts=1.7e9))
    assert len(rec.index) == 100
    found, _ = rec.index.search(rec.recaller.item_vecs[5], 100)
    assert 5 in found[0].tolist()


def test_new_item_becomes_reachable_through_cooccurrence(rec) -> None:
    anchor = rec.catalog.ids[7]
    category = rec.catalog.category(anchor)
    live(rec, item_record(ItemIn(item_id="new1", category=category, title="New"), ts=1.7e9))
    assert rec.catalog.index["new1"] == 100 and rec.catalog.category("new1") == category

    live(rec, ev("third", anchor))
    before = rec.recall(rec.view("third"))
    sources = dict(zip(before.item_ids, before.sources, strict=True))
    assert "itemcf" not in sources.get("new1", ())  # offered only as a new arrival
    assert "new1" not in {x["item_id"] for x in rec.similar(anchor)}

    for user in ("first", "second"):
        live(rec, ev(user, anchor), ev(user, "new1"))
    after = rec.recall(rec.view("third"))
    sources = dict(zip(after.item_ids, after.sources, strict=True))
    assert "itemcf" in sources["new1"]
    row = after.item_ids.index("new1")
    assert after.scores[row, 0] > 0  # its item-CF score is a ranker feature too
    i = rec.catalog.index[anchor]
    expected = 2 / np.sqrt(
        rec.state.stats.cooc.item_users[i] * 2
    )  # 2 shared users, 2 users of new1
    assert rec.state.stats.cooc.similarity(i, 100) == pytest.approx(expected, rel=1e-6)
    similar = {x["item_id"]: x["score"] for x in rec.similar(anchor, k=100)}
    assert similar["new1"] == pytest.approx(expected, abs=1e-6)
    assert anchor in {x["item_id"] for x in rec.similar("new1")}


def test_new_item_gets_its_category_mean_vector(rec, model) -> None:
    category = model.item_categories[3]
    live(rec, item_record(ItemIn(item_id="new2", category=category), ts=1.7e9))
    members = [i for i, c in enumerate(model.item_categories) if c == category]
    np.testing.assert_allclose(
        rec.recaller.item_vecs[100], model.embeddings.item[members].mean(axis=0), rtol=1e-5
    )
    live(rec, item_record(ItemIn(item_id="new3", category="no-such-category"), ts=1.7e9))
    np.testing.assert_array_equal(rec.recaller.item_vecs[101], 0.0)


# ---------------------------------------------------------------------------------------------
# responses


def test_unknown_user_gets_trending_and_new_items(rec) -> None:
    assert not rec.view("nobody").known
    response = rec.recommend("nobody")
    assert response["items"]
    for item in response["items"]:
        assert item["reason"] == "trending now" or item["reason"].startswith("new ")
        assert set(item["sources"]) <= {"pop", "new"}
    assert "nobody" not in rec.profiles.users  # recommending does not create a profile


def test_response_shape(rec, model, users) -> None:
    for user in [*users[:30], "nobody"]:
        response = rec.recommend(user, request_id="req-1")
        assert response["user_id"] == user
        assert response["model_version"] == model.version
        assert response["request_id"] == "req-1"
        assert len(response["items"]) == CONFIG.aggregate.default_k
        assert len(set(ids(response))) == len(response["items"])
        for item in response["items"]:
            assert isinstance(item["reason"], str) and item["reason"]
            assert item["sources"] and set(item["sources"]) <= set(SOURCES)
            assert isinstance(item["score"], float)
    assert rec.recommend(users[0])["request_id"] != rec.recommend(users[0])["request_id"]


def test_finalize_respects_k_and_exclude(rec, users) -> None:
    user = users[3]
    first = ids(rec.recommend(user, k=12))
    assert len(first) == 12
    assert len(ids(rec.recommend(user, k=3))) == 3
    excluded = frozenset(first[:5])
    second = ids(rec.recommend(user, k=12, exclude=excluded))
    assert len(second) == 12 and not excluded & set(second)
    view = rec.view(user)
    assert not view.seen & set(first)


def test_request_filters_categories_and_seen(rec, users) -> None:
    """categories: only these, a full list even when narrow (recall leaves the rest out);
    exclude_categories: none of those; include_seen: items the user acted on may return."""
    from rec.filters import Filters

    user = users[3]
    seen = rec.view(user).seen
    unseen: dict[str, int] = {}  # per category, the items this user has not acted on
    for item in rec.catalog.ids:
        if item not in seen and rec.catalog.category(item) is not None:
            unseen[rec.catalog.category(item)] = unseen.get(rec.catalog.category(item), 0) + 1
    cats = sorted(unseen, key=lambda c: (-unseen[c], c))
    assert len(cats) >= 3 and unseen[cats[0]] >= 4
    only = frozenset(cats[:1])
    got = rec.recommend(user, k=10, filters=Filters(categories=only))
    # every unseen item of the category the list has room for: recall left the others out
    assert len(got["items"]) == min(10, unseen[cats[0]])
    assert {rec.catalog.category(i) for i in ids(got)} == set(only)
    unwanted = frozenset(cats[:2])
    got = rec.recommend(user, k=10, filters=Filters(exclude_categories=unwanted))
    assert len(got["items"]) == 10
    assert not {rec.catalog.category(i) for i in ids(got)} & unwanted
    assert not seen & set(ids(rec.recommend(user, k=50)))
    again = ids(rec.recommend(user, k=50, filters=Filters(include_seen=True)))
    assert seen & set(again)  # a heavy user's favourites come back


def test_filters_outside_and_known_categories() -> None:
    from rec.catalog import Catalog
    from rec.filters import Filters

    catalog = Catalog()
    for n, cat in enumerate(["a", "b", None, "a", "c"]):
        catalog.upsert(f"i{n}", cat, ["t"], None, 0.0)
    assert catalog.category_names() == {"a", "b", "c"}  # tags are not categories
    assert Filters(categories=frozenset({"a"})).outside(catalog).tolist() == [1, 2, 4]
    assert Filters(exclude_categories=frozenset({"a", "c"})).outside(catalog).tolist() == [0, 3, 4]
    assert Filters().outside(catalog).tolist() == [] and not Filters().narrows
    catalog.upsert("i5", "d", [], None, 0.0)
    assert "d" in catalog.category_names()  # the cached set follows the catalogue


def _category_counts(model, log, users, **aggregate) -> list[list[str]]:
    r = Recommender(make_config(aggregate=aggregate), model)
    r.apply(log)
    out = []
    for user in users[:10]:
        got = ids(r.recommend(user, k=8))
        assert len(got) == 8
        out.append([r.catalog.category(i) for i in got])
    return out


def test_finalize_caps_items_per_category(model, log, users) -> None:
    for categories in _category_counts(model, log, users, max_per_category=1, explore_fraction=0.0):
        assert None not in categories and len(set(categories)) == len(categories)
    for categories in _category_counts(model, log, users, max_per_category=2, explore_fraction=0.0):
        assert max(categories.count(c) for c in categories) <= 2


def test_exploration_slots_respect_max_per_category(model, log, users) -> None:
    for categories in _category_counts(
        model, log, users, max_per_category=1, explore_fraction=0.25
    ):
        assert len(set(categories)) == len(categories)


def test_finalize_orders_by_score_and_explains(rec, users) -> None:
    view = rec.view(users[0])
    cands = rec.recall(view)
    scores = np.linspace(1.0, 0.0, len(cands), dtype=np.float32)
    out = rec.finalize(view, cands, scores, k=5)
    got = [x["score"] for x in out["items"]]
    model_items = [x for x in out["items"] if not set(x["sources"]) <= {"pop", "new"}]
    assert [x["score"] for x in model_items] == sorted(
        (x["score"] for x in model_items), reverse=True
    )
    assert len(got) == 5
    for x in out["items"]:
        if "itemcf" in x["sources"] and x["reason"].startswith("because you interacted with "):
            anchor = x["reason"].removeprefix("because you interacted with ")
            assert anchor in view.seen


def test_rank_many_equals_rank(rec, users) -> None:
    requests = []
    for user, context in ((users[0], {"hour": 3}), (users[9], None), ("nobody", None)):
        view = rec.view(user)
        requests.append((view, rec.recall(view), context))
    batched = rec.rank_many(requests)
    assert len(batched) == 3
    for (view, cands, context), probs in zip(requests, batched, strict=True):
        assert probs.shape == (len(cands),)
        np.testing.assert_allclose(probs, rec.rank(view, cands, context), rtol=1e-5, atol=1e-6)
        assert ((probs > 0) & (probs < 1)).all()


def test_candidate_indices_count_only_in_the_catalogue_that_recalled_them(
    rec, model, log, users
) -> None:
    """Recall hands its catalogue indices on to ranking in the same process; a stage with
    another catalogue (another replica, another version) looks the ids up instead."""
    view = rec.view(users[0])
    cands = rec.recall(view)
    np.testing.assert_array_equal(cands.idx, [rec.catalog.index[i] for i in cands.item_ids])
    garbled = dataclasses.replace(cands, idx=cands.idx[::-1].copy())
    other = Recommender(CONFIG, model)
    other.apply(log)
    assert other.catalog.token != rec.catalog.token
    np.testing.assert_allclose(
        other.rank(other.view(users[0]), garbled), rec.rank(view, cands), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(rec.rank(view, garbled), rec.rank(view, cands))


def test_features_are_finite(rec, users) -> None:
    view = rec.view(users[0])
    cands = rec.recall(view)
    f = rec.features(view, cands)
    assert f.shape == (len(cands), len(DENSE_FEATURES)) and np.isfinite(f).all()
    np.testing.assert_array_equal(f[:, : cands.scores.shape[1]], cands.scores)


def test_features_of_a_newly_posted_item(rec) -> None:
    """Catalogue metadata kept in arrays: an item posted at runtime has its features at once."""
    category = rec.catalog.category(rec.catalog.ids[0])
    for item in ("sibling", "posted"):
        live(
            rec, item_record(ItemIn(item_id=item, category=category, tags=["fresh", "x"]), ts=1.7e9)
        )
    live(rec, ev("someone", "sibling", ts=1.7e9 + 10))
    view = rec.view("someone")
    cands = rec.recall(view)
    row = cands.item_ids.index("posted")
    f = rec.features(view, cands)
    col = {name: j for j, name in enumerate(DENSE_FEATURES)}
    tags = view.tags
    total = sum(v for v in tags.values() if v > 0)
    assert tags["fresh"] > 0 and tags[category] > 0
    assert f[row, col["cat_affinity"]] == np.float32(tags[category] / total)
    assert f[row, col["tag_affinity"]] == np.float32((tags["fresh"] + tags["x"]) / total)
    assert f[row, col["last_cat_match"]] == 1.0
    age = np.log1p(max(rec.state.stats.trend.latest - 1.7e9, 0.0) / 86400.0)
    assert f[row, col["log_age_days"]] == np.float32(age)


def test_similar(rec) -> None:
    item = rec.catalog.ids[0]
    got = rec.similar(item, k=5)
    assert len(got) == 5 and item not in {x["item_id"] for x in got}
    assert [x["score"] for x in got] == sorted((x["score"] for x in got), reverse=True)
    assert rec.similar("no-such-item") is None


def test_merge_lists_keeps_first_appearance_and_names_every_holder() -> None:
    lists = [
        ("a", np.asarray([5, 3, 9])),
        ("b", np.asarray([3, 7])),
        ("c", np.asarray([], np.int64)),
        ("d", np.asarray([9, 1, 5, 8])),
    ]
    cand, sources = merge_lists(lists, limit=10)
    assert cand.tolist() == [5, 3, 9, 7, 1, 8]
    assert sources == (("a", "d"), ("a", "b"), ("a", "d"), ("b",), ("d",), ("d",))
    # over the limit: the items with the best position in any list, best first
    cand, sources = merge_lists(lists, limit=4)
    assert cand.tolist() == [5, 3, 9, 7]  # positions 0, 0 (b), 0 (d), 1 beat 1 and 3
    assert sources[1] == ("a", "b")
    empty, none = merge_lists([("a", np.asarray([], np.int64))], limit=3)
    assert len(empty) == 0 and none == ()


# ---------------------------------------------------------------------------------------------
# state: offsets, forgetting, model swaps


def test_apply_skips_records_already_applied(rec, users) -> None:
    user = users[5]
    batch = live(
        rec,
        ev(user, rec.catalog.ids[1], "view"),
        ev(user, rec.catalog.ids[2]),
        ev("x", rec.catalog.ids[1], "purchase"),
    )
    state = (
        dict(rec.view(user).counts),
        rec.state.stats.pop_counts.tolist(),
        rec.offset,
        len(rec.view(user).recent),
    )
    rec.apply(batch)
    rec.apply(batch[1:])
    assert (
        dict(rec.view(user).counts),
        rec.state.stats.pop_counts.tolist(),
        rec.offset,
        len(rec.view(user).recent),
    ) == state


def test_user_delete_forgets_the_profile(rec, users) -> None:
    user = users[0]
    assert rec.view(user).known
    live(rec, user_delete_record(user, ts=1.7e9))
    view = rec.view(user)
    assert not view.known and view.recent == () and view.seen == frozenset()
    response = rec.recommend(user)
    assert response["items"] and all(
        x["reason"] == "trending now" or x["reason"].startswith("new ") for x in response["items"]
    )


def test_a_new_version_replayed_from_the_log_keeps_profiles(rec, model2, log, users) -> None:
    """A replica moving to a new version replays the log into a new Recommender: profiles,
    new and deleted items carry over and user vectors are refolded on the new factors."""
    extra = live(rec, item_record(ItemIn(item_id="new1", category="c01"), ts=1.7e9))
    gone = rec.catalog.ids[4]
    extra += live(rec, item_delete_record(gone, ts=1.7e9))
    before = {u: rec.view(u) for u in users[:20]}
    fresh = Recommender(CONFIG, model2)
    fresh.apply(log + extra)
    assert fresh.version == "v2" and fresh.offset == rec.offset
    assert fresh.catalog.ids[:100] == model2.item_ids and fresh.catalog.ids[100] == "new1"
    assert gone in fresh.catalog.deleted
    for user, old in before.items():
        view = fresh.view(user)
        assert view.recent == old.recent and view.counts == old.counts
        items = fresh.profiles.users.get(user).items
        idx = np.asarray([fresh.catalog.index[i] for i in items])
        w = np.asarray(list(items.values()), np.float32)
        np.testing.assert_allclose(
            fresh.recaller.user_vector(view),
            model2.embeddings.fold_in(idx, w),
            rtol=1e-5,
            atol=1e-6,
        )
        response = fresh.recommend(user)
        assert response["model_version"] == "v2"
        assert gone not in ids(response)


def test_a_swapped_out_version_is_freed_without_the_cycle_collector(model, log) -> None:
    """A replica freezes its objects out of the collector's sight (gc.freeze) after a swap, so
    the version it swaps out must go by reference counting alone: a reference cycle in it
    would keep the whole old pipeline (profiles, counts, models) for good."""
    import gc
    import weakref

    r = Recommender(CONFIG, model)
    r.apply(log)
    r.recommend(log[-1]["user_id"])
    parts = [weakref.ref(x) for x in (r, r.recaller, r.state, r.state.catalog, model.ranker)]
    gc.disable()
    try:
        del r
        alive = [ref() for ref in parts[:-1]]
        assert alive == [None] * len(alive)
        assert parts[-1]() is not None  # the model itself is the fixture's, still held
    finally:
        gc.enable()


def test_records_in_the_model_do_not_count_cooccurrence_twice(model, log) -> None:
    """Training's replay applies the events its model was fitted on (interleaved with held-out
    ones, so no log offset separates them): their pairs are in item-CF already."""
    held = copy.copy(model)
    held.log_offset = 0  # a model that says nothing about which records it has seen
    r = Recommender(CONFIG, held)
    events = [x for x in log[:MODEL_RECORDS] if x["kind"] == "event"]
    r.apply(events, in_model=True)
    assert r.state.stats.cooc.partners == {} and r.state.stats.cooc.item_users.sum() == 0
    assert r.profiles.users  # profiles and popularity still follow every record
    after = [x for x in log[MODEL_RECORDS:] if x["kind"] == "event"]
    r.apply(after)
    assert r.state.stats.cooc.item_users.sum() > 0


def test_events_before_the_model_offset_are_not_counted_twice(model, log) -> None:
    r = Recommender(CONFIG, model)
    r.apply(log[:MODEL_RECORDS])
    assert not any(
        r.state.stats.cooc.partners.values()
    )  # those pairs are in the model's item-CF already
    r.apply(log[MODEL_RECORDS:])
    assert any(r.state.stats.cooc.partners.values())


def test_live_event_by_an_existing_user_on_a_new_version(model, log, users) -> None:
    """Co-occurrence starts empty on a new version while users' histories hold high indices."""
    r = Recommender(CONFIG, model)
    r.apply(log[:MODEL_RECORDS])
    user = users[0]
    high = [i for i, _, _ in r.view(user).recent if r.catalog.index[i] >= 64]
    assert high
    target = next(i for i in r.catalog.ids[:64] if i not in r.view(user).seen)
    live(r, ev(user, target))
    assert target not in ids(r.recommend(user))
    assert r.similar(target)


def test_cooccurrence_counts_each_user_once() -> None:
    r = Recommender(CONFIG)
    live(r, ev("u", "a", "view"), ev("u", "a", "view"), ev("u", "a", "view"), ev("u", "b"))
    i, j = r.catalog.index["a"], r.catalog.index["b"]
    assert r.state.stats.cooc.similarity(i, j) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# without a model


def test_recommender_without_a_model(log, users) -> None:
    r = Recommender(CONFIG)
    r.apply(log)
    assert r.version is None and r.model is None and len(r.catalog) == 100
    for user in users[:10]:
        response = r.recommend(user)
        assert response["model_version"] is None
        assert len(response["items"]) == CONFIG.aggregate.default_k
        for item in response["items"]:
            assert set(item["sources"]) <= {"itemcf", "pop", "new"} and item["reason"]
            assert 0 < item["score"] < 1
    assert r.recaller.user_vector(r.view(users[0])) is None
    top = ids(r.recommend(users[0]))[0]
    live(r, ev(users[0], top))
    assert top not in ids(r.recommend(users[0], k=50))


def test_recommender_without_a_model_uses_online_cooccurrence() -> None:
    r = Recommender(CONFIG)
    live(r, ev("a", "x"), ev("a", "y"), ev("b", "x"), ev("b", "y"), ev("c", "x"))
    cands = r.recall(r.view("c"))
    sources = dict(zip(cands.item_ids, cands.sources, strict=True))
    assert "itemcf" in sources["y"]
    assert ids(r.recommend("c")) == ["y"]
    assert r.recommend("c")["items"][0]["reason"] == "because you interacted with x"


def test_similar_without_a_model_uses_online_cooccurrence() -> None:
    r = Recommender(CONFIG)
    live(r, ev("a", "x"), ev("a", "y"), ev("b", "x"), ev("b", "y"))
    assert [x["item_id"] for x in r.similar("x")] == ["y"]


# ---------------------------------------------------------------------------------------------
# model versions on disk


def test_model_bundle_save_load_round_trip(model, log, users, tmp_path: Path) -> None:
    path = model.save(tmp_path, index=model.build_index(CONFIG.recall))
    assert path == tmp_path / model.version and not (tmp_path / f".{model.version}.tmp").exists()
    with np.load(path / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}  # every array loads without pickle
    assert arrays["item_ids"].tolist() == model.item_ids
    meta = json.loads((path / "meta.json").read_text())
    assert meta["log_offset"] == model.log_offset and meta["version"] == model.version

    loaded = ModelBundle.load(path, device="cpu")
    assert (
        loaded.version,
        loaded.item_ids,
        loaded.user_ids,
        loaded.item_categories,
        loaded.log_offset,
        loaded.equalise_norms,
    ) == (
        model.version,
        model.item_ids,
        model.user_ids,
        model.item_categories,
        model.log_offset,
        model.equalise_norms,
    )
    flipped = dataclasses.replace(model, equalise_norms=not model.equalise_norms)
    assert (
        ModelBundle.load(flipped.save(tmp_path / "flipped")).equalise_norms
        is flipped.equalise_norms
    )
    hnsw = CONFIG.recall.model_copy(update={"index": "hnsw"})
    assert flipped.build_index(hnsw).shards[0].equalise_norms is flipped.equalise_norms
    assert loaded.ranker is not None
    np.testing.assert_array_equal(loaded.embeddings.item, model.embeddings.item)

    a = Recommender(CONFIG, model)
    b = Recommender(CONFIG, loaded, index=load_saved_index(path))
    a.apply(log)
    b.apply(log)
    for user in [*users[:5], "nobody"]:
        ra, rb = a.recommend(user), b.recommend(user)
        assert ids(ra) == ids(rb)
        assert [x["score"] for x in ra["items"]] == pytest.approx(
            [x["score"] for x in rb["items"]], abs=1e-6
        )


def test_auto_index_is_exact_up_to_brute_max_items(model) -> None:
    from rec.index import BruteForceIndex, HNSWIndex

    n = model.n_items
    exact = CONFIG.recall.model_copy(update={"index": "auto", "brute_max_items": n})
    approx = CONFIG.recall.model_copy(update={"index": "auto", "brute_max_items": n - 1})
    assert (exact.index_kind(n), approx.index_kind(n)) == ("brute", "hnsw")
    assert isinstance(model.build_index(exact).shards[0], BruteForceIndex)
    assert isinstance(model.build_index(approx).shards[0], HNSWIndex)
    forced = CONFIG.recall.model_copy(update={"index": "hnsw", "brute_max_items": n})
    assert forced.index_kind(n) == "hnsw"  # an explicit kind is kept whatever the size


def test_model_without_ranker_round_trips(model2, tmp_path: Path) -> None:
    loaded = ModelBundle.load(model2.save(tmp_path))
    assert loaded.ranker is None and load_saved_index(tmp_path / model2.version) is None


def test_publish_and_current_version(tmp_path: Path) -> None:
    assert current_version(tmp_path) is None
    publish(tmp_path, "v1")
    assert current_version(tmp_path) == "v1"
    publish(tmp_path, "v2")
    assert current_version(tmp_path) == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]


def test_version_names_sort_by_time() -> None:
    assert new_version_name(0.0) == "v19700101-000000-000000"
    assert new_version_name(1.5) == "v19700101-000001-500000"
    assert new_version_name(100.25) < new_version_name(1000.0)


# ---------------------------------------------------------------------------------------------
# the stages apart: what the split topology builds


def test_stage_parts_hold_what_the_whole_pipeline_holds(model, log, users) -> None:
    """The profile stage's part (profiles only) and the recall stage's (catalogue, item counts,
    the model) answer as the fused pipeline does, and neither holds the other's state."""
    whole = Recommender(CONFIG, model)
    profiles = Recommender(CONFIG, profiles=True, recall=False)
    recall = Recommender(CONFIG, model, profiles=False)
    for r in (whole, profiles, recall):
        r.apply(log)
    assert profiles.state.stats is None and profiles.recaller is None and profiles.model is None
    assert recall.profiles is None
    for user in [*users[:15], "nobody"]:
        view = profiles.view(user)
        assert view == whole.view(user)
        a, b = whole.recalled(view), recall.recalled(view)
        assert a.cands.item_ids == b.cands.item_ids and a.cands.seeds == b.cands.seeds
        np.testing.assert_array_equal(a.cands.anchor_of, b.cands.anchor_of)
        np.testing.assert_array_equal(a.cands.scores, b.cands.scores)
        assert a.version == b.version == "v1"


def test_a_reason_names_the_source_that_recalled_the_item() -> None:
    assert reason(("gf",), None, None) == "related to items you liked"
    assert reason(("gf", "pop"), None, "i3") == "because you liked i3"
    assert reason(("ease", "ann", "pop"), "c1", None) == EASE.reason
    assert reason(("itemcf", "usercf"), None, "i2") == "because you interacted with i2"
    assert reason(("usercf", "pop"), None, "i2") == "popular with users like you"
    assert reason(("ann", "pop"), "c1", None) == "matches your taste for c1"
    assert reason(("pop",), "c1", "i2") == "trending now"
    assert reason(("gf", "new"), "c1", "i2") == "new in c1"


def test_no_personalised_item_is_explained_as_trending(rec, users) -> None:
    for user in users[:30]:
        for item in rec.recommend(user, k=30)["items"]:
            if set(item["sources"]) & {"itemcf", "usercf", "gf", "ease", "ann"}:
                assert item["reason"] != "trending now", item


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_every_ordering_scores_each_candidate_in_0_1(model, log, users, ordering) -> None:
    """The contract of every way a version may order its lists (the ranker and each recall
    order): one finite probability-like score per candidate, whatever the candidates."""
    served = copy.copy(model)
    served.ordering = ordering
    r = Recommender(CONFIG, served)
    r.apply(log)
    assert r.ordering == ordering
    for user in [*users[:5], "nobody"]:
        view = r.view(user)
        out = r.recalled(view, rank=True)
        assert out.inputs is None and out.version == "v1"
        assert out.scores.shape == (len(out.cands),) and out.scores.dtype == np.float32
        assert np.all((out.scores > 0) & (out.scores < 1))
        unranked = r.recalled(view)
        if ordering == "ranker":  # the split topology's ranker gets the inputs instead
            assert unranked.scores is None and len(unranked.inputs) == len(out.cands)
        else:
            np.testing.assert_array_equal(unranked.scores, out.scores)
