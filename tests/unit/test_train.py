"""Training from a log snapshot: recall models, ranker examples and one model version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rec.config import RecConfig
from rec.data import generate
from rec.events import ItemIn, event_record, item_record
from rec.features import DENSE_FEATURES, ORDERINGS
from rec.model import collect_versions, publish
from rec.pipeline import Recommender
from rec.profile import event_weight
from rec.ranker import Ranker
from rec.train import (
    _fit_recall,
    _gain,
    _item_order,
    _validation_cases,
    choose_ordering,
    holdout_split,
    pick_ordering,
    replay_holdout,
    snapshot_table,
    train,
)

CONFIG = RecConfig.model_validate(
    {
        "recall": {"embedding_dim": 16, "index": "brute", "per_source": 50},
        "ranker": {
            "epochs": 2,
            "batch_size": 128,
            "hidden": [16],
            "item_embedding_dim": 8,
            "device": "cpu",
        },
    }
)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    ds = generate(n_users=200, n_items=100, n_events=5000, seed=0)
    return snapshot_table(ds.item_records() + ds.event_records()).to_pylist()


@pytest.fixture(scope="module")
def model(records):
    return train(snapshot_table(records), CONFIG, version="t1")


def split(records: list[dict], config: RecConfig = CONFIG):
    """What `train` derives from a snapshot: sorted events, id orders and the 80% time cut."""
    events = sorted(
        (r for r in records if r["kind"] == "event"), key=lambda r: (r["ts"], r["offset"])
    )
    item_ids, categories = _item_order(records)
    user_ids = list(dict.fromkeys(r["user_id"] for r in events))
    index = ({i: n for n, i in enumerate(item_ids)}, {u: n for n, u in enumerate(user_ids)})
    return events, item_ids, categories, user_ids, index, holdout_split(events, config)


def fit(events, item_ids, categories, user_ids, index, config=CONFIG):
    return _fit_recall(events, index[0], index[1], config, categories, item_ids, user_ids)


def tiny_log(n_events: int, n_items: int = 6, n_users: int = 4) -> list[dict]:
    rng = np.random.default_rng(3)
    recs = [
        item_record(ItemIn(item_id=f"i{n}", category=f"c{n % 2}"), ts=0.0) for n in range(n_items)
    ]
    for n in range(n_events):
        recs.append(
            event_record(
                user_id=f"u{rng.integers(n_users)}",
                item_id=f"i{rng.integers(n_items)}",
                type="click",
                ts=float(n),
            )
        )
    return snapshot_table(recs).to_pylist()


# ---------------------------------------------------------------------------------------------


def test_no_events_is_an_error() -> None:
    items_only = [item_record(ItemIn(item_id="a"), ts=0.0)]
    with pytest.raises(ValueError, match="no events"):
        train(snapshot_table(items_only), CONFIG)
    with pytest.raises(ValueError, match="no events"):
        train(snapshot_table([]), CONFIG)


def test_model_ids_and_categories(model, records) -> None:
    assert model.version == "t1"
    assert model.item_ids == [f"i{n}" for n in range(100)]  # items first in the snapshot
    payloads = {
        r["item_id"]: json.loads(r["payload"])["category"] for r in records if r["kind"] == "item"
    }
    assert model.item_categories == [payloads[i] for i in model.item_ids]
    assert set(model.user_ids) == {r["user_id"] for r in records if r["kind"] == "event"}
    assert model.metrics["events"] == 5000 and model.metrics["items"] == 100
    assert model.metrics["users"] == len(model.user_ids)


def test_item_order_is_first_appearance_with_the_latest_category() -> None:
    recs = [
        event_record(user_id="u", item_id="b", type="view", ts=0.0),
        item_record(ItemIn(item_id="a", category="x"), ts=1.0),
        item_record(ItemIn(item_id="b", category="y"), ts=2.0),
        item_record(ItemIn(item_id="a", category="z"), ts=3.0),
    ]
    assert _item_order(recs) == (["b", "a"], {"a": "z", "b": "y"})


def test_log_offset_defaults_to_one_past_the_newest_record(model, records) -> None:
    assert model.log_offset == len(records) == max(r["offset"] for r in records) + 1
    small = tiny_log(20)
    assert train(snapshot_table(small), CONFIG, fit_ranker=None).log_offset == len(small)
    assert train(snapshot_table(small), CONFIG, fit_ranker=None, log_offset=7).log_offset == 7


def test_version_name_is_generated_when_not_given() -> None:
    m = train(snapshot_table(tiny_log(20)), CONFIG, fit_ranker=None)
    assert m.version.startswith("v") and len(m.version) == len("v20240101-000000-000000")


def test_ranker_is_trained_and_useful(model) -> None:
    assert model.ranker is not None
    assert model.ranker.n_items == 100 and model.ranker.dense_names == list(DENSE_FEATURES)
    metrics = model.metrics["ranker"]
    assert metrics["valid_auc"] > 0.6
    assert np.isfinite(metrics["train_loss"])
    assert model.metrics["ranker_examples"] > 0


def test_no_ranker_when_not_asked(records) -> None:
    m = train(snapshot_table(records), CONFIG, fit_ranker=None)
    assert m.ranker is None and "ranker" not in m.metrics and "ranker_examples" not in m.metrics


def test_no_ranker_below_fifty_events() -> None:
    calls = []
    m = train(
        snapshot_table(tiny_log(49)),
        CONFIG,
        fit_ranker=lambda ranker, ex: calls.append(len(ex)) or {},
    )
    assert m.ranker is None and calls == []
    assert m.embeddings.item.shape == (6, 16)


def test_ranker_from_fifty_events() -> None:
    m = train(snapshot_table(tiny_log(50, n_items=30, n_users=10)), CONFIG)
    assert m.ranker is not None and m.metrics["ranker_examples"] > 0


def test_fit_ranker_hook_receives_the_examples() -> None:
    seen = []

    def hook(ranker, ex):
        seen.append((ranker.n_items, len(ex), float(ex.labels.sum())))
        return {"custom": 1.0}

    m = train(snapshot_table(tiny_log(200, n_items=30, n_users=10)), CONFIG, fit_ranker=hook)
    assert len(seen) == 1 and seen[0][0] == 30 and seen[0][1] > seen[0][2] > 0
    assert m.metrics["ranker"] == {"custom": 1.0} and m.ranker is not None


def test_rotation_keeps_the_final_fit_inner_products(model, records) -> None:
    """Procrustes turns the embeddings onto the ranker's basis without changing any score."""
    events, item_ids, categories, user_ids, index, _ = split(records)
    unrotated = fit(events, item_ids, categories, user_ids, index).embeddings
    np.testing.assert_allclose(
        model.embeddings.item @ model.embeddings.query.T,
        unrotated.item @ unrotated.query.T,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        model.embeddings.item @ model.embeddings.item.T,
        unrotated.item @ unrotated.item.T,
        rtol=1e-4,
        atol=1e-4,
    )
    assert not np.allclose(model.embeddings.item, unrotated.item, atol=1e-3)  # it did rotate


def test_rotation_moves_towards_the_ranker_basis(model, records) -> None:
    events, item_ids, categories, user_ids, index, (head, _) = split(records)
    basis = fit(head, item_ids, categories, user_ids, index).embeddings
    unrotated = fit(events, item_ids, categories, user_ids, index).embeddings
    assert np.linalg.norm(model.embeddings.item - basis.item) < np.linalg.norm(
        unrotated.item - basis.item
    )


def test_recall_models_fit_the_whole_log(model, records) -> None:
    events, item_ids, categories, user_ids, index, _ = split(records)
    again = fit(events, item_ids, categories, user_ids, index)
    assert (model.itemcf.sim != again.itemcf.sim).nnz == 0
    assert (model.sources["usercf"].users != again.sources["usercf"].users).nnz == 0
    assert model.sources["usercf"].users.shape == (len(user_ids), 100)


def test_pearson_config_trains() -> None:
    config = CONFIG.model_copy(deep=True)
    config.recall.similarity = "pearson"
    m = train(snapshot_table(tiny_log(30)), config, fit_ranker=None)
    assert m.sources["usercf"].similarity == "pearson"


# ---------------------------------------------------------------------------------------------
# ranker examples


@pytest.fixture(scope="module")
def replayed(records):
    events, item_ids, categories, user_ids, index, (head, tail) = split(records)
    prefix = fit(head, item_ids, categories, user_ids, index)
    ex, cases = replay_holdout(prefix, records, head, tail, CONFIG)
    return prefix, ex, cases, head, tail


def positive_events(tail: list[dict]) -> list[int]:
    return [
        n for n, r in enumerate(tail) if event_weight(r["type"], r["value"], CONFIG.profile) > 0
    ]


def training_events(tail: list[dict], config: RecConfig = CONFIG) -> list[int]:
    """Positive held-out events that may train the ranker: those of users without a
    validation case."""
    held_back = {tail[n]["user_id"] for n in _validation_cases(tail, config)}
    return [n for n in positive_events(tail) if tail[n]["user_id"] not in held_back]


def groups(ex) -> list[slice]:
    starts = np.flatnonzero(ex.labels == 1.0)
    return [slice(s, e) for s, e in zip(starts, np.append(starts[1:], len(ex)), strict=True)]


def candidates_of(prefix, records, head, tail, n):
    """What serving's recall returns for held-out event n, after every event before it."""
    rec = Recommender(CONFIG, prefix)
    rec.apply([r for r in records if r["kind"] == "item"])
    rec.apply(head, in_model=True)
    rec.apply([{k: v for k, v in r.items() if k != "offset"} for r in tail[:n]], in_model=True)
    return rec.recall(rec.view(tail[n]["user_id"]))


def test_examples_are_groups_of_one_positive_and_candidate_negatives(replayed) -> None:
    prefix, ex, cases, head, tail = replayed
    assert set(np.unique(ex.labels).tolist()) == {0.0, 1.0}
    sizes = [g.stop - g.start for g in groups(ex)]
    assert ex.labels[0] == 1.0 and min(sizes) >= 2
    assert max(sizes) == 1 + CONFIG.ranker.negatives
    n_train = len(training_events(tail))
    # a group per held-out positive that recall found (the others cannot be ranked)
    assert 0.15 * n_train < len(sizes) <= n_train


def test_examples_are_finite_and_shaped(replayed) -> None:
    prefix, ex, *_ = replayed
    n, d = len(ex), prefix.embeddings.dim
    assert ex.dense.shape == (n, len(DENSE_FEATURES)) and np.isfinite(ex.dense).all()
    assert ex.user_vec.shape == ex.item_vec.shape == (n, d)
    assert np.isfinite(ex.user_vec).all() and np.isfinite(ex.item_vec).all()
    assert ex.item_idx.min() >= 0 and ex.item_idx.max() < prefix.n_items
    np.testing.assert_array_equal(ex.item_vec, prefix.embeddings.item[ex.item_idx])


def test_example_groups_are_the_events_item_among_its_recall_candidates(replayed, records) -> None:
    """Each group's positive is the item of a held-out event and every row of the group is one
    of the candidates serving's recall returned for that event (features as served)."""
    prefix, ex, cases, head, tail = replayed
    first = groups(ex)[0]
    n = next(
        n
        for n in training_events(tail)
        if tail[n]["item_id"] in candidates_of(prefix, records, head, tail, n).item_ids
    )
    cands = candidates_of(prefix, records, head, tail, n)
    group = [prefix.item_ids[i] for i in ex.item_idx[first]]
    assert group[0] == tail[n]["item_id"]
    assert len(set(group)) == len(group) and set(group) <= set(cands.item_ids)
    seen = {r["item_id"] for r in head + tail[:n] if r["user_id"] == tail[n]["user_id"]}
    assert not set(group[1:]) & seen


def test_validation_cases_are_disjoint_from_training_and_whole(replayed) -> None:
    prefix, ex, cases, head, tail = replayed
    assert len(cases) == len(_validation_cases(tail, CONFIG)) > 0
    assert all(
        len(c.inputs.item_idx) > 0 and c.n_relevant == 1 and len(c.positives) <= 1 for c in cases
    )
    assert all(0 <= p < len(c.inputs.item_idx) for c in cases for p in c.positives)
    assert sum(len(c.positives) for c in cases) > len(cases) / 5
    assert 0 < len(groups(ex)) <= len(training_events(tail))
    # no group belongs to a user who has a validation case (rows of a group share one user vector)
    users = {tail[n]["user_id"] for n in _validation_cases(tail, CONFIG)}
    assert 0 < len(users) <= len({r["user_id"] for r in tail}) // 5


def test_a_random_holdout_is_not_replayed_as_a_sequence(records) -> None:
    """Held out at random (data whose order is not time): each group's candidates are recall's
    answer from the user's prefix alone, and the user's other held-out items are no negatives."""
    config = CONFIG.model_copy(deep=True)
    config.train.holdout = "random"
    events, item_ids, categories, user_ids, index, (head, tail) = split(records, config)
    prefix = fit(head, item_ids, categories, user_ids, index, config)
    ex, cases = replay_holdout(prefix, records, head, tail, config)
    base = Recommender(config, prefix)
    base.apply([r for r in records if r["kind"] == "item"])
    base.apply(head, in_model=True)
    held: dict[str, set[str]] = {}
    for r in tail:
        held.setdefault(r["user_id"], set()).add(r["item_id"])
    validation = set(_validation_cases(tail, config))
    checked = 0
    for n in training_events(tail, config):
        cands = base.recall(base.view(tail[n]["user_id"])).item_ids
        if tail[n]["item_id"] not in cands:
            continue
        group = [prefix.item_ids[i] for i in ex.item_idx[groups(ex)[checked]]]
        assert group[0] == tail[n]["item_id"] and set(group) <= set(cands)
        assert not set(group[1:]) & held[tail[n]["user_id"]]
        checked += 1
        if checked == 30:
            break
    assert checked == 30
    # validation: one request per user, every held-out positive item of theirs relevant
    users = list(dict.fromkeys(tail[n]["user_id"] for n in sorted(validation)))
    assert len(cases) == len(users)
    for case, user in zip(cases, users, strict=True):
        liked = {
            r["item_id"]
            for r in tail
            if r["user_id"] == user and event_weight(r["type"], r["value"], config.profile) > 0
        }
        cands = base.recall(base.view(user)).item_ids
        assert case.n_relevant == len(liked)
        assert [cands[p] for p in case.positives] == [i for i in cands if i in liked]


def test_examples_are_capped_at_max_examples(records) -> None:
    config = CONFIG.model_copy(deep=True)
    config.ranker.max_examples = 10
    events, item_ids, categories, user_ids, index, (head, tail) = split(records)
    prefix = fit(head, item_ids, categories, user_ids, index, config)
    ex, _ = replay_holdout(prefix, records, head, tail, config)
    assert 0 < int(ex.labels.sum()) <= 10


def test_examples_are_deterministic(replayed, records) -> None:
    prefix, ex, _, head, tail = replayed
    again, _ = replay_holdout(prefix, records, head, tail, CONFIG)
    np.testing.assert_array_equal(again.item_idx, ex.item_idx)
    np.testing.assert_array_equal(again.dense, ex.dense)


def test_shown_but_not_picked_items_are_the_first_negatives(replayed, records) -> None:
    """Feedback: a click naming the request that caused it gets that answer's other items (those
    still among the candidates) as negatives, ahead of sampled ones."""
    from rec.events import impression_record
    from rec.train import _impressions

    prefix, ex, _, head, tail = replayed
    n = next(
        n
        for n in training_events(tail)
        if tail[n]["item_id"] in candidates_of(prefix, records, head, tail, n).item_ids
    )
    cands = candidates_of(prefix, records, head, tail, n)
    shown_items = [i for i in cands.item_ids if i != tail[n]["item_id"]][-3:]
    tail = [*tail[:n], dict(tail[n], request_id="req-1"), *tail[n + 1 :]]
    impression = impression_record(
        tail[n]["user_id"], "req-1", [tail[n]["item_id"], *shown_items], "v0", tail[n]["ts"]
    )
    shown = _impressions(snapshot_table([impression]).to_pylist())
    assert shown == {"req-1": [tail[n]["item_id"], *shown_items]}
    got, _ = replay_holdout(prefix, records, head, tail, CONFIG, shown)
    first = groups(got)[0]
    group = [prefix.item_ids[i] for i in got.item_idx[first]]
    assert group[0] == tail[n]["item_id"] and got.labels[first][0] == 1.0
    assert group[1:4] == shown_items and not got.labels[first][1:4].any()


def test_validation_gain_is_ndcg_at_20_over_all_relevant_items() -> None:
    ranked = np.arange(30)
    assert _gain(ranked, np.asarray([0])) == 1.0
    assert _gain(ranked, np.asarray([2])) == pytest.approx(0.5)  # 1 / log2(4)
    assert _gain(ranked, np.asarray([25])) == 0.0  # below the cut-off
    # two relevant, found at ranks 1 and 3, a third missed by recall: DCG / IDCG of three
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    idcg = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert _gain(ranked, np.asarray([1, 3]), 3) == pytest.approx(dcg / idcg)


def test_ordering_is_chosen_on_held_out_cases(replayed) -> None:
    """Training measures every ordering on the validation cases and serves what pick_ordering
    decides; a case whose item recall missed scores zero for every ordering."""
    prefix, ex, cases, *_ = replayed
    ranker = Ranker(CONFIG.ranker, prefix.n_items, prefix.embeddings.dim, len(DENSE_FEATURES))
    ranker.fit(ex.item_idx, ex.user_vec, ex.item_vec, ex.dense, ex.labels)
    prefix.ranker = ranker
    served, recall, results = choose_ordering(prefix, cases)
    assert set(results) == set(ORDERINGS)
    assert recall != "ranker" and served in (recall, "ranker")
    assert served != "ranker" or results["ranker"] > results[recall]
    missed = [c for c in cases if not len(c.positives)]
    _, _, zero = choose_ordering(prefix, missed)
    assert not missed or all(v == 0.0 for v in zero.values())


def test_an_ordering_wins_only_beyond_two_standard_errors() -> None:
    base = np.random.default_rng(0).random(400)
    s1, s2 = np.tile([1.0, -1.0], 200), np.tile([1.0, 1.0, -1.0, -1.0], 100)
    # gf's mean is highest, by 0.002 with a paired spread of 0.05 (2 SE = 0.005): noise
    within = {
        "ranker": base + 0.05 * s2,
        "gf": base + 0.05 * s1 + 0.002,
        "ease": base - 0.05 * s1,
        "blend": base,
    }
    assert pick_ordering(within) == ("blend", "blend")
    gf_wins = {**within, "gf": base + 0.05}
    assert pick_ordering(gf_wins) == ("gf", "gf")
    ranker_wins = {**gf_wins, "ranker": base + 0.1}
    assert pick_ordering(ranker_wins) == ("ranker", "gf")
    over_blend_only = {**within, "ranker": base + 0.03, "gf": base + 0.035}  # not beyond gf
    assert pick_ordering(over_blend_only) == ("gf", "gf")


def test_holdout_keeps_one_event_of_a_user_with_few() -> None:
    """A sparse log (two or three events per user) still holds out one event of each user."""
    events = [
        event_record(user_id=f"u{n % 20}", item_id=f"i{n}", type="purchase", ts=float(n))
        for n in range(50)
    ]  # users with 2 or 3 events each
    _, tail = holdout_split(events, CONFIG)
    last = {r["user_id"]: r["ts"] for r in events}
    assert sorted((r["user_id"], r["ts"]) for r in tail) == sorted(last.items())


@pytest.mark.parametrize("mode", ["last", "random"])
def test_holdout_takes_a_fifth_of_each_users_events_and_at_least_one(records, mode) -> None:
    config = CONFIG.model_copy(deep=True)
    config.train.holdout = mode
    events = sorted((r for r in records if r["kind"] == "event"), key=lambda r: r["ts"])
    head, tail = holdout_split(events, config)
    assert len(head) + len(tail) == len(events)
    per_user: dict[str, list[dict]] = {}
    for r in events:
        per_user.setdefault(r["user_id"], []).append(r)
    held = {(r["user_id"], r["offset"]) for r in tail}
    for user, rows in per_user.items():
        mine = [r for r in rows if (user, r["offset"]) in held]
        assert len(mine) == max(int(len(rows) * 0.2), int(len(rows) >= 2))
        if mode == "last" and mine:
            assert mine == rows[-len(mine) :]
    assert holdout_split(events[:49], config) == (events[:49], [])


def test_training_chooses_the_index_graph_that_finds_more(records, monkeypatch) -> None:
    """With an HNSW index configured, fit measures both graphs on its users' fold-ins and keeps
    the one with the higher recall@100; with exact search it measures nothing."""
    hnsw = CONFIG.model_copy(update={"recall": CONFIG.recall.model_copy(update={"index": "hnsw"})})
    seen = []

    def fake(items, queries, **params):
        seen.append((items.shape, queries.shape, params["m"]))
        return False, {"equalised": 0.5, "raw": 0.9}

    monkeypatch.setattr("rec.train.choose_equalise_norms", fake)
    m = train(snapshot_table(records), hnsw, fit_ranker=None, version="t-hnsw")
    assert m.equalise_norms is False and m.metrics["index_recall@100"] == {
        "equalised": 0.5,
        "raw": 0.9,
    }
    ((shape, qshape, degree),) = seen
    assert (
        shape == (100, 16)
        and qshape[1] == 16
        and 0 < qshape[0] <= 200
        and degree == CONFIG.recall.hnsw_m
    )
    assert train(snapshot_table(records), CONFIG, fit_ranker=None).metrics["index_recall@100"] == {}


def test_training_runs_als_on_the_threads_it_is_given(records, monkeypatch) -> None:
    """A Train worker passes its thread budget down: ALS (implicit) would otherwise take every
    core of the node; offline training keeps the default, every core (0)."""
    import rec.recall.embedding as embedding

    seen = []
    real = embedding.als_factors

    def spy(*args, **kwargs):
        seen.append(kwargs["threads"])
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding, "als_factors", spy)
    train(snapshot_table(records), CONFIG, threads=1)
    assert seen == [1, 1]  # the prefix's recall and the final one
    seen.clear()
    train(snapshot_table(records), CONFIG, fit_ranker=None)
    assert seen == [0]


def test_collect_versions_keeps_the_newest_and_the_published(tmp_path) -> None:
    """Only the `keep` newest versions survive (by creation time, not name), the published one
    always, and half-written saves are swept."""
    for n, created in enumerate([5.0, 1.0, 4.0, 2.0, 3.0]):
        d = tmp_path / f"v{n}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"created": created}))
        (d / "arrays.npz").write_bytes(b"x")
    (tmp_path / ".v9.tmp").mkdir()
    (tmp_path / "snapshots").mkdir()  # not a version: left alone
    publish(tmp_path, "v1")  # the oldest, yet published
    gone = collect_versions(tmp_path, keep=2)
    assert sorted(gone) == ["v3", "v4"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["CURRENT", "snapshots", "v0", "v1", "v2"]
    assert collect_versions(tmp_path, keep=2) == []  # v1 is still the published one
    publish(tmp_path, "v0")
    assert collect_versions(tmp_path, keep=2) == ["v1"]
