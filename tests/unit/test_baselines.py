"""Tests for rec.baselines: block structure, exclusion, closed forms, order and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from rec import baselines
from rec.baselines import ALS, BASELINES, EASE, ItemKNN, Model, Popularity, UserKNN, top_k
from rec.metrics import PAD_ID
from rec.splits import Interactions


def interactions(x: np.ndarray) -> Interactions:
    """Click Interactions with one event per nonzero of a users × items 0/1 matrix."""
    users, items = np.nonzero(x)
    n = len(users)
    return Interactions(
        user_ids=[f"u{u}" for u in range(x.shape[0])],
        item_ids=[f"i{i}" for i in range(x.shape[1])],
        users=users.astype(np.int64),
        items=items.astype(np.int64),
        ts=np.arange(n, dtype=np.float64),
        types=np.array(["click"] * n, dtype=object),
        values=np.full(n, np.nan),
    )


def checkerboard() -> np.ndarray:
    """Users 0-3 use items 0-3 and users 4-7 items 4-7; user u misses in-group item u."""
    x = np.zeros((8, 8))
    x[:4, :4] = 1
    x[4:, 4:] = 1
    x[np.arange(8), np.arange(8)] = 0
    return x


PERSONAL = [
    ItemKNN,
    UserKNN,
    lambda: ALS(factors=2),
    EASE,
]


@pytest.mark.parametrize("make", PERSONAL, ids=["itemknn", "userknn", "als", "ease"])
def test_in_group_item_first_and_excluded_items_never(make) -> None:
    train = interactions(checkerboard())
    model = make().fit(train)
    users = np.arange(8)
    seen = train.seen()
    top = model.recommend(users, 8, seen)
    assert top[:, 0].tolist() == users.tolist()  # the one in-group item not yet used
    for u in users:
        assert not set(top[u]) & set(seen[u].indices)
        assert (top[u, 5:] == PAD_ID).all()  # 3 excluded items leave 5 candidates
        other_group = range(4, 8) if u < 4 else range(4)
        assert sorted(top[u, 1:5]) == list(other_group)


def test_item_knn_scores_are_summed_cosines() -> None:
    x = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    # Item vectors over users: i0 = (1,1,0), i1 = (1,1,1), i2 = (0,1,1).
    c01, c02, c12 = 2 / math.sqrt(6), 1 / 2, 2 / math.sqrt(6)
    model = ItemKNN(neighbours=2, shrinkage=0.0).fit(interactions(x))
    expected = np.array([[0, c01, c02], [c01, 0, c12], [c02, c12, 0]])
    np.testing.assert_allclose(model.sim.toarray(), expected, rtol=1e-6)
    # User 0 used items 0 and 1: scores = S[0] + S[1].
    np.testing.assert_allclose(model.scores(np.array([0])), [[c01, c01, c02 + c12]], rtol=1e-6)
    shrunk = ItemKNN(neighbours=2, shrinkage=1.0).fit(interactions(x))
    assert shrunk.sim[0, 1] == pytest.approx(2 / (math.sqrt(6) + 1))
    # One neighbour per item: item 0 keeps only item 1 (2/√6 > 1/2).
    single = ItemKNN(neighbours=1, shrinkage=0.0).fit(interactions(x))
    assert single.sim[0].indices.tolist() == [1]


def test_ease_equals_a_direct_constrained_least_squares_solve(rng) -> None:
    x = (rng.random((12, 5)) < 0.5).astype(float)
    l2 = 2.0
    model = EASE(l2=l2).fit(interactions(x))
    expected = np.zeros((5, 5))
    for j in range(5):
        others = [i for i in range(5) if i != j]
        xo = x[:, others]
        expected[others, j] = np.linalg.solve(xo.T @ xo + l2 * np.eye(4), xo.T @ x[:, j])
    np.testing.assert_allclose(model.b, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.scores(np.arange(12)), x @ expected, rtol=1e-4, atol=1e-5)


def test_ease_refuses_too_many_items(monkeypatch) -> None:
    monkeypatch.setattr(EASE, "max_items", 3)
    with pytest.raises(MemoryError, match="refusing above 3 items"):
        EASE().fit(interactions(np.eye(4)))


def test_popularity_orders_by_train_users_and_respects_exclusion() -> None:
    x = np.array([[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])  # counts 1, 3, 2, 0
    model = Popularity().fit(interactions(x))
    no_exclusion = sp.csr_matrix((3, 4))
    assert model.recommend(np.array([0, 1]), 4, no_exclusion).tolist() == [[1, 2, 0, 3]] * 2
    exclude = sp.csr_matrix(np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]))  # user 2: item 1
    assert model.recommend(np.array([2, 0]), 2, exclude).tolist() == [[2, 0], [1, 2]]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_deterministic_and_batch_independent(name, rng, monkeypatch) -> None:
    x = (rng.random((30, 20)) < 0.25).astype(float)
    train = interactions(x)
    first = BASELINES[name]().fit(train)
    second = BASELINES[name]().fit(train)
    users = np.arange(30)
    np.testing.assert_array_equal(first.scores(users), second.scores(users))
    whole = first.recommend(users, 5, train.seen())
    monkeypatch.setattr(baselines, "BATCH_USERS", 7)
    np.testing.assert_array_equal(first.recommend(users, 5, train.seen()), whole)


def test_scores_are_dense_float32_per_user(rng) -> None:
    train = interactions((rng.random((10, 6)) < 0.4).astype(float))
    for cls in BASELINES.values():
        scores = cls().fit(train).scores(np.array([3, 1]))
        assert scores.shape == (2, 6) and scores.dtype == np.float32, cls.name


def test_top_k_pads_short_rows() -> None:
    scores = np.array([[0.5, -np.inf, 2.0]], dtype=np.float32)
    assert top_k(scores, 4).tolist() == [[2, 0, PAD_ID, PAD_ID]]


def test_observe_is_a_no_op_for_static_models() -> None:
    model = Popularity().fit(interactions(np.eye(3)))
    before = model.scores(np.array([0]))
    model.observe(0, 1, 5.0)
    np.testing.assert_array_equal(model.scores(np.array([0])), before)
    assert isinstance(model, Model)
