"""Offline ranking metrics for recommendation lists (recall, precision, NDCG, hit rate, coverage).

Conventions follow LightGCN's evaluation so numbers are comparable with the literature: recall
divides by |relevant| (not min(k, |relevant|)), NDCG uses binary gains with an ideal DCG over
min(|relevant|, k) hits, and per-user values are averaged over users with at least one relevant
item. An id repeated within a ranked list counts once, at its first position. Coverage ignores the
padding id -1 that indexes put in short result rows.

`ranked` rows may be lists or arrays of any hashable ids. A 2-D integer ndarray takes a vectorised
path (sorted-key lookups instead of per-user Python sets), fast enough for tens of thousands of
users per second-long evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import numpy as np

PAD_ID = -1


def _check(ranked: Sequence, k: int, relevant: Sequence[Collection] | None = None) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if relevant is not None and len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} ranked lists but {len(relevant)} relevant sets")


def _first_occurrence(rows: np.ndarray) -> np.ndarray:
    """Mask of entries that are the first occurrence of their value within their row."""
    order = np.argsort(rows, axis=1, kind="stable")
    sorted_rows = np.take_along_axis(rows, order, axis=1)
    first = np.ones(rows.shape, dtype=bool)
    np.put_along_axis(first, order[:, 1:], sorted_rows[:, 1:] != sorted_rows[:, :-1], axis=1)
    return first


def _hits_array(ranked: np.ndarray, relevant: Sequence[Collection], k: int) -> np.ndarray:
    """Hit matrix [users, k] for a 2-D integer array, via (user, item) keys and a sorted lookup."""
    top = ranked[:, :k].astype(np.int64, copy=False)
    sizes = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=len(relevant))
    rel_items = np.fromiter(
        itertools.chain.from_iterable(relevant), dtype=np.int64, count=int(sizes.sum())
    )
    if rel_items.size == 0 or top.size == 0:
        return np.zeros((top.shape[0], k), dtype=bool)
    low = min(int(top.min()), int(rel_items.min()))
    span = max(int(top.max()), int(rel_items.max())) - low + 1
    rel_keys = np.sort(np.repeat(np.arange(len(relevant)), sizes) * span + (rel_items - low))
    top_keys = np.arange(top.shape[0])[:, None] * span + (top - low)
    where = np.minimum(np.searchsorted(rel_keys, top_keys), rel_keys.size - 1)
    hits = (rel_keys[where] == top_keys) & _first_occurrence(top)
    return np.pad(hits, ((0, 0), (0, k - top.shape[1])))


def _hits_lists(ranked: Sequence[Sequence], relevant: Sequence[Collection], k: int) -> np.ndarray:
    """Hit matrix [users, k] for arbitrary rows of hashable ids."""
    hits = np.zeros((len(ranked), k), dtype=bool)
    for u, (row, rel) in enumerate(zip(ranked, relevant, strict=True)):
        rel = set(rel)
        seen: set = set()
        for j, item in enumerate(list(row)[:k]):
            if item in rel and item not in seen:
                hits[u, j] = True
            seen.add(item)
    return hits


def _hits(
    ranked: Sequence[Sequence], relevant: Sequence[Collection], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(hits [users, k] bool, |relevant| per user) for the users with a non-empty relevant set."""
    _check(ranked, k, relevant)
    n_rel = np.fromiter((len(set(r)) for r in relevant), dtype=np.int64, count=len(relevant))
    if isinstance(ranked, np.ndarray) and ranked.ndim == 2 and ranked.dtype.kind in "iu":
        hits = _hits_array(ranked, relevant, k)
    else:
        hits = _hits_lists(ranked, relevant, k)
    keep = n_rel > 0
    return hits[keep], n_rel[keep]


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def _from_hits(hits: np.ndarray, n_rel: np.ndarray, k: int) -> dict[str, float]:
    """All per-user-averaged metrics at cut-off k from a hit matrix with at least k columns."""
    top = hits[:, :k]
    n_hits = top.sum(axis=1)
    discounts = _discounts(k)
    ideal = np.cumsum(discounts)[np.minimum(n_rel, k) - 1]
    return {
        f"recall@{k}": _mean(n_hits / n_rel),
        f"precision@{k}": _mean(n_hits / k),
        f"ndcg@{k}": _mean((top * discounts).sum(axis=1) / ideal),
        f"hr@{k}": _mean(n_hits > 0),
    }


def recall_at_k(ranked: Sequence[Sequence], relevant: Sequence[Collection], k: int) -> float:
    """Mean of |top-k ∩ relevant| / |relevant| over users with relevant items."""
    return _from_hits(*_hits(ranked, relevant, k), k)[f"recall@{k}"]


def precision_at_k(ranked: Sequence[Sequence], relevant: Sequence[Collection], k: int) -> float:
    """Mean of |top-k ∩ relevant| / k over users with relevant items."""
    return _from_hits(*_hits(ranked, relevant, k), k)[f"precision@{k}"]


def ndcg_at_k(ranked: Sequence[Sequence], relevant: Sequence[Collection], k: int) -> float:
    """Mean binary-gain NDCG@k; the ideal DCG places min(|relevant|, k) hits at the top."""
    return _from_hits(*_hits(ranked, relevant, k), k)[f"ndcg@{k}"]


def hr_at_k(ranked: Sequence[Sequence], relevant: Sequence[Collection], k: int) -> float:
    """Fraction of users (with relevant items) having at least one hit in their top k."""
    return _from_hits(*_hits(ranked, relevant, k), k)[f"hr@{k}"]


def coverage_at_k(ranked: Sequence[Sequence], k: int, n_items: int) -> float:
    """Distinct items across all users' top-k lists, as a fraction of the catalogue size."""
    _check(ranked, k)
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    if isinstance(ranked, np.ndarray) and ranked.ndim == 2 and ranked.dtype.kind in "iu":
        items = np.sort(ranked[:, :k], axis=None)
        items = items[items != PAD_ID]
        return int(np.count_nonzero(np.diff(items)) + (items.size > 0)) / n_items
    items = set(itertools.chain.from_iterable(list(row)[:k] for row in ranked))
    items.discard(PAD_ID)
    return len(items) / n_items


def evaluate(
    ranked: Sequence[Sequence], relevant: Sequence[Collection], ks: Sequence[int], n_items: int
) -> dict[str, float]:
    """Every metric at every k in `ks`, keyed "recall@10", "ndcg@20", ...; hits are computed once."""
    if not ks:
        return {}
    hits, n_rel = _hits(ranked, relevant, max(ks))
    results: dict[str, float] = {}
    for k in ks:
        _check(ranked, k)
        results.update(_from_hits(hits, n_rel, k))
        results[f"coverage@{k}"] = coverage_at_k(ranked, k, n_items)
    return results
