"""Tests for rec.metrics: hand-computed values, edge cases and a cross-check with a plain reference."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import pytest

from rec.metrics import (
    coverage_at_k,
    evaluate,
    hr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)


def d(rank: int) -> float:
    """Discount of 0-based rank: 1 / log2(rank + 2)."""
    return 1 / math.log2(rank + 2)


def test_hand_computed_single_user() -> None:
    ranked, relevant = [[1, 2, 3, 4]], [{2, 4}]
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(1 / 2)
    assert precision_at_k(ranked, relevant, 3) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(d(1) / (d(0) + d(1)))
    assert hr_at_k(ranked, relevant, 3) == 1.0
    assert coverage_at_k(ranked, 3, n_items=10) == pytest.approx(3 / 10)


def test_hand_computed_two_users_are_averaged() -> None:
    # User 0: hits at ranks 0 and 2 of 3 relevant; user 1: no hit.
    ranked = [["a", "b", "c"], ["x", "y", "z"]]
    relevant = [{"a", "c", "q"}, {"w"}]
    k = 3
    assert recall_at_k(ranked, relevant, k) == pytest.approx((2 / 3 + 0) / 2)
    assert precision_at_k(ranked, relevant, k) == pytest.approx((2 / 3 + 0) / 2)
    ideal = d(0) + d(1) + d(2)
    assert ndcg_at_k(ranked, relevant, k) == pytest.approx(((d(0) + d(2)) / ideal + 0) / 2)
    assert hr_at_k(ranked, relevant, k) == pytest.approx(1 / 2)
    assert coverage_at_k(ranked, k, n_items=12) == pytest.approx(6 / 12)


def test_ndcg_ideal_is_capped_at_k() -> None:
    # Five relevant items, k = 2, both slots hit: the ideal DCG has only 2 hits, so NDCG is 1.
    ranked, relevant = [[1, 2, 9]], [{1, 2, 3, 4, 5}]
    assert ndcg_at_k(ranked, relevant, 2) == pytest.approx(1.0)
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(2 / 5)  # LightGCN: / |rel|


def test_k_larger_than_list() -> None:
    ranked, relevant = [[7, 8]], [{8}]
    assert recall_at_k(ranked, relevant, 5) == pytest.approx(1.0)
    assert precision_at_k(ranked, relevant, 5) == pytest.approx(1 / 5)
    assert ndcg_at_k(ranked, relevant, 5) == pytest.approx(d(1) / d(0))
    assert coverage_at_k(ranked, 5, n_items=4) == pytest.approx(2 / 4)


def test_no_hits() -> None:
    ranked, relevant = [[1, 2, 3]], [{4, 5}]
    for metric in (recall_at_k, precision_at_k, ndcg_at_k, hr_at_k):
        assert metric(ranked, relevant, 3) == 0.0


def test_users_with_empty_relevant_are_skipped() -> None:
    ranked = [[1, 2], [3, 4], [5, 6]]
    relevant: list[set[int]] = [set(), {4}, set()]
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1.0)
    assert precision_at_k(ranked, relevant, 2) == pytest.approx(1 / 2)
    assert ndcg_at_k(ranked, relevant, 2) == pytest.approx(d(1) / d(0))
    assert hr_at_k(ranked, relevant, 2) == 1.0
    # Coverage still looks at every user's list.
    assert coverage_at_k(ranked, 2, n_items=6) == pytest.approx(1.0)


def test_duplicates_in_ranking_not_double_counted() -> None:
    ranked, relevant = [[3, 3, 5]], [{3, 5}]
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(1.0)
    assert precision_at_k(ranked, relevant, 3) == pytest.approx(2 / 3)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx((d(0) + d(2)) / (d(0) + d(1)))
    assert coverage_at_k(ranked, 3, n_items=10) == pytest.approx(2 / 10)
    array = np.array(ranked)
    assert precision_at_k(array, relevant, 3) == pytest.approx(2 / 3)
    assert ndcg_at_k(array, relevant, 3) == pytest.approx((d(0) + d(2)) / (d(0) + d(1)))


def test_duplicates_in_relevant_count_once() -> None:
    assert recall_at_k([[1, 9]], [[1, 1, 2]], 2) == pytest.approx(1 / 2)


def test_padding_ids_are_not_items() -> None:
    ranked = np.array([[4, -1, -1], [-1, -1, -1]])
    assert coverage_at_k(ranked, 3, n_items=5) == pytest.approx(1 / 5)
    assert coverage_at_k(ranked.tolist(), 3, n_items=5) == pytest.approx(1 / 5)
    assert recall_at_k(ranked, [{4}, {2}], 3) == pytest.approx(1 / 2)


def test_empty_input_is_zero() -> None:
    for metric in (recall_at_k, precision_at_k, ndcg_at_k, hr_at_k):
        assert metric([], [], 10) == 0.0
        assert metric(np.empty((0, 10), dtype=np.int64), [], 10) == 0.0
    assert coverage_at_k([], 10, n_items=5) == 0.0
    assert evaluate([], [], [5], n_items=5) == {
        "recall@5": 0.0,
        "precision@5": 0.0,
        "ndcg@5": 0.0,
        "hr@5": 0.0,
        "coverage@5": 0.0,
    }


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        recall_at_k([[1]], [{1}], 0)
    with pytest.raises(ValueError):
        recall_at_k([[1], [2]], [{1}], 1)
    with pytest.raises(ValueError):
        coverage_at_k([[1]], 1, n_items=0)


# ---- cross-check against an independent, per-user reference -----------------------------------


def reference(
    ranked: Sequence[Sequence[int]], relevant: Sequence[Collection[int]], k: int, n_items: int
) -> dict[str, float]:
    """Straightforward per-user loops written from the metric definitions."""
    sums = {"recall": 0.0, "precision": 0.0, "ndcg": 0.0, "hr": 0.0}
    users = 0
    for row, rel_items in zip(ranked, relevant, strict=True):
        rel = set(rel_items)
        if not rel:
            continue
        users += 1
        counted: list[int] = []
        dcg = 0.0
        for rank, item in enumerate(list(row)[:k]):
            if item in rel and item not in counted:
                dcg += 1 / math.log2(rank + 2)
                counted.append(item)
        idcg = sum(1 / math.log2(rank + 2) for rank in range(min(len(rel), k)))
        sums["recall"] += len(counted) / len(rel)
        sums["precision"] += len(counted) / k
        sums["ndcg"] += dcg / idcg
        sums["hr"] += 1.0 if counted else 0.0
    out = {f"{name}@{k}": (total / users if users else 0.0) for name, total in sums.items()}
    items = {item for row in ranked for item in list(row)[:k] if item != -1}
    out[f"coverage@{k}"] = len(items) / n_items
    return out


def random_case(seed: int) -> tuple[np.ndarray, list[set[int]], int]:
    rng = np.random.default_rng(seed)
    n_users, n_items, length = 200, 60, 15
    ranked = rng.integers(0, n_items, size=(n_users, length))  # small catalogue: repeats occur
    ranked[rng.random((n_users, length)) < 0.05] = -1  # some padding
    relevant = [
        set(rng.choice(n_items, size=rng.integers(0, 12), replace=False).tolist())
        for _ in range(n_users)
    ]
    return ranked, relevant, n_items


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_data(seed: int) -> None:
    ranked, relevant, n_items = random_case(seed)
    ks = [1, 5, 10, 20]
    expected: dict[str, float] = {}
    for k in ks:
        expected.update(reference(ranked.tolist(), relevant, k, n_items))
    for rows in (ranked.tolist(), ranked):  # list path and 2-D ndarray fast path
        got = evaluate(rows, relevant, ks, n_items)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        assert recall_at_k(rows, relevant, 5) == pytest.approx(expected["recall@5"])
        assert precision_at_k(rows, relevant, 5) == pytest.approx(expected["precision@5"])
        assert ndcg_at_k(rows, relevant, 5) == pytest.approx(expected["ndcg@5"])
        assert hr_at_k(rows, relevant, 5) == pytest.approx(expected["hr@5"])
        assert coverage_at_k(rows, 5, n_items) == pytest.approx(expected["coverage@5"])


def test_array_path_equals_list_path() -> None:
    ranked, relevant, n_items = random_case(7)
    as_arrays = [np.array(sorted(r), dtype=np.int64) for r in relevant]
    fast = evaluate(ranked, as_arrays, [3, 10], n_items)
    slow = evaluate([row.tolist() for row in ranked], relevant, [3, 10], n_items)
    assert fast == pytest.approx(slow, rel=1e-12)
    unsigned = evaluate(ranked.clip(0).astype(np.uint32), relevant, [3, 10], n_items)
    assert unsigned == pytest.approx(
        evaluate(ranked.clip(0).tolist(), relevant, [3, 10], n_items), rel=1e-12
    )
