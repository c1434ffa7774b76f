"""Tests for rec.index: one contract run against every implementation, plus HNSW recall and merging."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
import pytest

from rec.index import (
    BruteForceIndex,
    HNSWIndex,
    Index,
    ShardedIndex,
    choose_equalise_norms,
    load_index,
    make_index,
    merge_topk,
)

DIM = 4
EYE = np.eye(DIM, dtype=np.float32)

FACTORIES: dict[str, Callable[..., Index]] = {
    "brute": lambda dim=DIM: BruteForceIndex(dim),
    "hnsw": lambda dim=DIM: HNSWIndex(dim, max_elements=8),
    "sharded": lambda dim=DIM: ShardedIndex(
        [HNSWIndex(dim, max_elements=8), HNSWIndex(dim, max_elements=8)]
    ),
}


@pytest.fixture(params=list(FACTORIES))
def new_index(request: pytest.FixtureRequest) -> Callable[..., Index]:
    return FACTORIES[request.param]


@pytest.fixture
def index(new_index: Callable[..., Index]) -> Index:
    """Items 10..13 are the one-hot vectors e0..e3 (even and odd ids, so both shards are used)."""
    idx = new_index()
    idx.add(np.array([10, 11, 12, 13]), EYE)
    return idx


def _query(*weights: float) -> np.ndarray:
    return np.array(weights, dtype=np.float32)


class TestIndexContract:
    def test_is_an_index(self, index: Index) -> None:
        assert isinstance(index, Index)
        assert index.dim == DIM

    def test_exact_answers(self, index: Index) -> None:
        # Inner products with 10..13 are 0.4, 0.3, 0.2, 0.1.
        ids, scores = index.search(
            np.stack([_query(0.4, 0.3, 0.2, 0.1), _query(0.1, 0, 1, 0.5)]), 3
        )
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        assert ids.shape == scores.shape == (2, 3)
        np.testing.assert_array_equal(ids, [[10, 11, 12], [12, 13, 10]])
        np.testing.assert_allclose(scores[0], [0.4, 0.3, 0.2], atol=1e-6)
        np.testing.assert_allclose(scores[1], [1.0, 0.5, 0.1], atol=1e-6)

    def test_upsert_replaces_vector(self, index: Index) -> None:
        index.add(np.array([10]), _query(0, 0, 0, 2).reshape(1, -1))
        ids, scores = index.search(_query(0, 0, 0, 1), 2)
        np.testing.assert_array_equal(ids, [[10, 13]])
        np.testing.assert_allclose(scores, [[2.0, 1.0]], atol=1e-6)
        assert len(index) == 4

    def test_repeated_id_in_one_batch_keeps_last(self, new_index: Callable[..., Index]) -> None:
        idx = new_index()
        idx.add(np.array([5, 5]), np.stack([EYE[0], EYE[1]]))
        assert len(idx) == 1
        ids, _ = idx.search(EYE[1], 1)
        np.testing.assert_array_equal(ids, [[5]])
        _, scores = idx.search(EYE[0], 1)
        assert scores[0, 0] == pytest.approx(0.0, abs=1e-6)

    def test_mark_deleted_never_returned(self, index: Index, tmp_path: Path) -> None:
        index.mark_deleted(np.array([10, 12, 999]))  # 999 is unknown: ignored
        index.mark_deleted(np.array([10]))  # already deleted: ignored
        assert len(index) == 2
        ids, _ = index.search(EYE, 4)
        assert not np.isin(ids, [10, 12]).any()
        assert set(ids[0].tolist()) == {11, 13, -1}
        index.save(tmp_path / "idx")
        loaded = load_index(tmp_path / "idx")
        assert len(loaded) == 2
        ids, _ = loaded.search(EYE, 4)
        assert not np.isin(ids, [10, 12]).any()

    def test_upsert_undeletes(self, index: Index) -> None:
        index.mark_deleted(np.array([11]))
        index.add(np.array([11]), EYE[1:2])
        assert len(index) == 4
        ids, _ = index.search(EYE[1], 1)
        np.testing.assert_array_equal(ids, [[11]])

    def test_filter_ids_excluded(self, index: Index) -> None:
        ids, scores = index.search(_query(0.4, 0.3, 0.2, 0.1), 2, filter_ids=np.array([10, 12, 77]))
        np.testing.assert_array_equal(ids, [[11, 13]])
        np.testing.assert_allclose(scores, [[0.3, 0.1]], atol=1e-6)

    def test_filter_everything_pads(self, index: Index) -> None:
        ids, scores = index.search(EYE[0], 2, filter_ids=np.array([10, 11, 12, 13]))
        np.testing.assert_array_equal(ids, [[-1, -1]])
        assert np.isneginf(scores).all()

    def test_k_larger_than_live_pads(self, index: Index) -> None:
        index.mark_deleted(np.array([13]))
        ids, scores = index.search(_query(0.4, 0.3, 0.2, 0.1), 6)
        np.testing.assert_array_equal(ids, [[10, 11, 12, -1, -1, -1]])
        np.testing.assert_allclose(scores[0, :3], [0.4, 0.3, 0.2], atol=1e-6)
        assert np.isneginf(scores[0, 3:]).all()

    def test_empty_index_pads(self, new_index: Callable[..., Index]) -> None:
        idx = new_index()
        assert len(idx) == 0
        ids, scores = idx.search(EYE[:2], 3)
        np.testing.assert_array_equal(ids, np.full((2, 3), -1))
        assert np.isneginf(scores).all() and scores.dtype == np.float32

    def test_one_dimensional_query(self, index: Index) -> None:
        ids, scores = index.search(EYE[2], 1)
        assert ids.shape == scores.shape == (1, 1)
        assert ids[0, 0] == 12

    def test_wrong_dim_rejected(self, index: Index) -> None:
        with pytest.raises(ValueError):
            index.search(np.ones(DIM + 1, dtype=np.float32), 1)
        with pytest.raises(ValueError):
            index.add(np.array([1]), np.ones((1, DIM + 1), dtype=np.float32))

    def test_negative_ids_rejected(self, index: Index) -> None:
        with pytest.raises(ValueError):
            index.add(np.array([-3]), EYE[:1])

    def test_save_load_round_trip(self, new_index: Callable[..., Index], tmp_path: Path) -> None:
        rng = np.random.default_rng(1)
        idx = new_index(8)
        idx.add(np.arange(60), rng.standard_normal((60, 8)).astype(np.float32))
        idx.mark_deleted(np.arange(0, 60, 7))
        queries = rng.standard_normal((5, 8)).astype(np.float32)
        before = idx.search(queries, 10, filter_ids=np.array([1, 2]))
        idx.save(tmp_path / "idx")
        loaded = load_index(tmp_path / "idx")
        assert type(loaded) is type(idx)
        assert len(loaded) == len(idx) == 60 - 9
        after = loaded.search(queries, 10, filter_ids=np.array([1, 2]))
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        # The loaded index stays writable.
        loaded.add(np.array([0]), queries[0] * 100)
        assert loaded.search(queries[0], 1)[0][0, 0] == 0

    def test_saved_files_hold_no_pickle(self, index: Index, tmp_path: Path) -> None:
        index.mark_deleted(np.array([11]))
        index.save(tmp_path / "idx")
        npz_files = list((tmp_path / "idx").rglob("*.npz"))
        assert npz_files
        for path in npz_files:
            with np.load(path, allow_pickle=False) as arrays:
                for name in arrays.files:
                    assert arrays[name].dtype != object

    def test_len_counts_live_items(self, index: Index) -> None:
        assert len(index) == 4
        index.add(np.array([10, 20]), EYE[:2])
        assert len(index) == 5
        index.mark_deleted(np.array([20, 13]))
        assert len(index) == 3

    def test_grows_past_initial_capacity(self, new_index: Callable[..., Index]) -> None:
        rng = np.random.default_rng(2)
        vectors = rng.standard_normal((100, DIM)).astype(np.float32)
        idx = new_index()  # HNSW variants start with max_elements=8
        for start in range(0, 100, 30):
            idx.add(np.arange(start, min(start + 30, 100)), vectors[start : start + 30])
        assert len(idx) == 100
        ids, _ = idx.search(vectors, 1)
        exact = np.argmax(vectors @ vectors.T, axis=1)
        assert (ids[:, 0] == exact).mean() >= 0.95


def hnsw_recall(
    vectors: np.ndarray, queries: np.ndarray, k: int, approx: HNSWIndex
) -> tuple[float, np.ndarray, np.ndarray]:
    """Recall@k of `approx` against exact search over the same vectors, and its answers."""
    ids = np.arange(len(vectors))
    exact = BruteForceIndex(vectors.shape[1])
    exact.add(ids, vectors)
    approx.add(ids, vectors)
    truth, _ = exact.search(queries, k)
    found, scores = approx.search(queries, k)
    recall = np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found, strict=True)])
    return float(recall), found, scores


def test_hnsw_recall_against_brute_force() -> None:
    """Default HNSW parameters find >= 95% of the exact top-10 on clustered data."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32)) * 2
    vectors = (centres[rng.integers(0, 50, 5_000)] + rng.standard_normal((5_000, 32))).astype(
        np.float32
    )
    queries = (centres[rng.integers(0, 50, 200)] + rng.standard_normal((200, 32))).astype(
        np.float32
    )
    recall, _, _ = hnsw_recall(vectors, queries, 10, HNSWIndex(32))
    assert recall >= 0.95


def test_hnsw_recall_with_uneven_norms() -> None:
    """Recommender item vectors: directions clustered, norms spanning 100x (popularity). HNSW's
    inner-product top-20 is >= 95% of the exact one, and the scores it returns (vectors stored
    with the norm-equalising coordinate) are the exact inner products."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 32))
    direction = centres[rng.integers(0, 40, 8_000)] + 0.7 * rng.standard_normal((8_000, 32))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    vectors = (direction * np.exp(rng.uniform(0, np.log(100), (8_000, 1)))).astype(np.float32)
    queries = (centres[rng.integers(0, 40, 200)] + rng.standard_normal((200, 32))).astype(
        np.float32
    )
    recall, found, scores = hnsw_recall(
        vectors, queries, 20, HNSWIndex(32, max_elements=len(vectors))
    )
    assert recall >= 0.95
    np.testing.assert_allclose(
        scores, np.einsum("qd,qkd->qk", queries, vectors[found]), rtol=1e-4, atol=1e-3
    )


def test_most_vectors_near_zero_need_the_raw_inner_product_graph() -> None:
    """80% of the vectors 50x shorter than the rest (ALS's items seen once): equalising norms
    collapses them onto the extra axis and the graph loses them; the raw inner-product graph
    does not, its scores are the exact inner products, and `choose_equalise_norms` picks it."""
    rng = np.random.default_rng(0)
    direction = rng.standard_normal((3_000, 16))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    norms = np.where(rng.random(3_000) < 0.8, 0.02, 1.0) * rng.uniform(0.5, 1.0, 3_000)
    vectors = (direction * norms[:, None]).astype(np.float32)
    queries = rng.standard_normal((100, 16)).astype(np.float32)
    params = dict(m=16, ef_construction=100, ef_search=64)
    raw, found, scores = hnsw_recall(
        vectors,
        queries,
        50,
        HNSWIndex(16, max_elements=len(vectors), equalise_norms=False, **params),
    )
    equalised, _, _ = hnsw_recall(
        vectors, queries, 50, HNSWIndex(16, max_elements=len(vectors), **params)
    )
    assert raw >= 0.95 and equalised < raw - 0.1
    np.testing.assert_allclose(
        scores, np.einsum("qd,qkd->qk", queries, vectors[found]), rtol=1e-4, atol=1e-4
    )
    choice, recalls = choose_equalise_norms(vectors, queries, k=50, **params)
    assert choice is False and recalls["raw"] > recalls["equalised"]
    assert recalls["raw"] == pytest.approx(raw, abs=0.02)


def test_brute_force_matches_numpy_in_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring in blocks of queries (to bound memory) gives the plain full-matrix answer."""
    monkeypatch.setattr("rec.index._QUERY_BLOCK_CELLS", 50)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((20, 6)).astype(np.float32)
    queries = rng.standard_normal((9, 6)).astype(np.float32)
    idx = BruteForceIndex(6)
    idx.add(np.arange(100, 120), vectors)
    ids, scores = idx.search(queries, 5)
    full = queries @ vectors.T
    np.testing.assert_array_equal(ids, 100 + np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :5], rtol=1e-6)


def test_hnsw_search_degrades_when_graph_cannot_fill_k(tmp_path: Path) -> None:
    """If hnswlib cannot return as many neighbours as asked, results shrink instead of failing."""

    class Capped(hnswlib.Index):
        def knn_query(self, data, k=1, **kwargs):  # type: ignore[no-untyped-def]
            if k > 2:
                raise RuntimeError("Cannot return the results in a contiguous 2D array.")
            return super().knn_query(data, k=k, **kwargs)

    idx = HNSWIndex(DIM)
    idx.add(np.array([10, 11, 12, 13]), EYE)
    idx.save(tmp_path / "idx")
    capped = Capped(space="ip", dim=DIM)
    capped.load_index(str(tmp_path / "idx" / "hnsw.bin"))
    idx._index = capped
    ids, _ = idx.search(_query(0.4, 0.3, 0.2, 0.1), 4)
    np.testing.assert_array_equal(ids, [[10, 11, -1, -1]])


def test_make_index() -> None:
    assert isinstance(make_index("brute", 3), BruteForceIndex)
    hnsw = make_index("hnsw", 3, m=8, ef_search=40)
    assert isinstance(hnsw, HNSWIndex) and hnsw.m == 8 and hnsw.ef_search == 40
    with pytest.raises(ValueError):
        make_index("faiss", 3)


def test_hnsw_params_survive_save_load(tmp_path: Path) -> None:
    idx = HNSWIndex(3, m=8, ef_construction=50, ef_search=33, seed=7, equalise_norms=False)
    idx.save(tmp_path / "idx")
    loaded = HNSWIndex.load(tmp_path / "idx")
    assert (
        loaded.dim,
        loaded.m,
        loaded.ef_construction,
        loaded.ef_search,
        loaded.seed,
        loaded.equalise_norms,
    ) == (3, 8, 50, 33, 7, False)


def test_load_checks_kind(tmp_path: Path) -> None:
    BruteForceIndex(3).save(tmp_path / "idx")
    with pytest.raises(ValueError):
        HNSWIndex.load(tmp_path / "idx")


def test_sharded_routes_by_modulo() -> None:
    shards = [BruteForceIndex(DIM) for _ in range(3)]
    idx = ShardedIndex(shards)
    idx.add(np.arange(9), np.ones((9, DIM), dtype=np.float32))
    assert [len(s) for s in shards] == [3, 3, 3]
    assert set(shards[1].search(np.ones(DIM), 9)[0][0].tolist()) == {1, 4, 7, -1}


class TestMergeTopk:
    def test_orders_across_shards(self) -> None:
        a = (np.array([[1, 3]]), np.array([[0.9, 0.5]], dtype=np.float32))
        b = (np.array([[2, 4]]), np.array([[0.7, 0.6]], dtype=np.float32))
        ids, scores = merge_topk([a, b], 3)
        np.testing.assert_array_equal(ids, [[1, 2, 4]])
        np.testing.assert_allclose(scores, [[0.9, 0.7, 0.6]])

    def test_dedupes_keeping_best_score(self) -> None:
        a = (np.array([[5, 6]]), np.array([[0.4, 0.3]], dtype=np.float32))
        b = (np.array([[6, 5]]), np.array([[0.8, 0.1]], dtype=np.float32))
        ids, scores = merge_topk([a, b], 4)
        np.testing.assert_array_equal(ids, [[6, 5, -1, -1]])
        np.testing.assert_allclose(scores[0, :2], [0.8, 0.4])
        assert np.isneginf(scores[0, 2:]).all()

    def test_drops_padding_and_pads_to_k(self) -> None:
        a = (np.array([[7, -1, -1]]), np.array([[0.2, -np.inf, -np.inf]], dtype=np.float32))
        b = (np.array([[-1]]), np.array([[-np.inf]], dtype=np.float32))
        ids, scores = merge_topk([a, b], 3)
        np.testing.assert_array_equal(ids, [[7, -1, -1]])
        assert scores[0, 0] == pytest.approx(0.2) and np.isneginf(scores[0, 1:]).all()

    def test_rows_independent_and_truncated(self) -> None:
        a = (np.array([[1, 2], [3, 4]]), np.array([[0.5, 0.4], [0.1, 0.05]], dtype=np.float32))
        b = (np.array([[9, 1], [4, 8]]), np.array([[0.45, 0.2], [0.3, 0.2]], dtype=np.float32))
        ids, scores = merge_topk([a, b], 2)
        np.testing.assert_array_equal(ids, [[1, 9], [4, 8]])
        np.testing.assert_allclose(scores, [[0.5, 0.45], [0.3, 0.2]])
        assert ids.dtype == np.int64 and scores.dtype == np.float32
