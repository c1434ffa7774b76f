"""Recall sources: one contract every `ScoreSource` meets on block-structured data, then the
behaviour specific to each source and to the shared helpers."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from rec.arrays import grown
from rec.catalog import Catalog
from rec.config import RecallConfig
from rec.recall import (
    EASE,
    Candidates,
    Cooccurrence,
    Embeddings,
    GraphFilter,
    ItemCF,
    ScoreSource,
    Trending,
    UserCF,
    ease_weights,
    interaction_matrix,
    top_n,
    top_n_rows,
)
from rec.recall.base import RecallModel, RecallQuery, TrainingData, center_rows, weighted_rows
from rec.recall.graph_filter import FactoredGraphFilter, FactoredScores, largest_component
from rec.recall.itemcf import item_similarity
from rec.recall.registry import MODELS

BLOCK = 10  # users 0-9 like items 0-9, users 10-19 like items 10-19
N_USERS = N_ITEMS = 2 * BLOCK
LIKES_PER_USER = 6
N_TOTAL = N_ITEMS + 5  # the catalogue holds 5 items the model has never seen


def checkerboard(seed: int = 0) -> sp.csr_matrix:
    """Block-diagonal binary likes; every item is liked by at least one user of its block."""
    rng = np.random.default_rng(seed)
    while True:
        likes = np.zeros((N_USERS, N_ITEMS), np.float32)
        for u in range(N_USERS):
            block = u // BLOCK
            likes[u, block * BLOCK + rng.choice(BLOCK, LIKES_PER_USER, replace=False)] = 1.0
        if likes.sum(axis=0).min() > 0:
            break
    users, items = np.nonzero(likes)
    return interaction_matrix(users, items, np.ones(len(users)), N_USERS, N_ITEMS)


X = checkerboard()

SOURCES: dict[str, Callable[[], ScoreSource]] = {
    "itemcf-cosine": lambda: ItemCF.fit(X, "cosine", k=50, shrink=10.0),
    "itemcf-pearson": lambda: ItemCF.fit(X, "pearson", k=50, shrink=10.0),
    "usercf-cosine": lambda: UserCF.fit(X, "cosine", k=50),
    "usercf-pearson": lambda: UserCF.fit(X, "pearson", k=50),
    "embeddings": lambda: Embeddings.fit(X, dim=2, seed=0),
    "graph-filter": lambda: GraphFilter.fit(X, dim=2, alpha=0.3, seed=0),
    "graph-filter-sharpened": lambda: _sharpened(GraphFilter.fit(X, dim=2, alpha=0.3, seed=0)),
    "graph-filter-factored": lambda: _factored(GraphFilter.fit(X, dim=2, alpha=0.3, seed=0)),
    "ease": lambda: EASE.fit(X, l2=10.0),
}
NAMES = {
    "itemcf-cosine": "itemcf",
    "itemcf-pearson": "itemcf",
    "usercf-cosine": "usercf",
    "usercf-pearson": "usercf",
    "embeddings": "ann",
    "graph-filter": "gf",
    "graph-filter-sharpened": "gf",
    "graph-filter-factored": "gf",
    "ease": "ease",
}


def history(user: int) -> tuple[np.ndarray, np.ndarray]:
    idx = X[user].indices.astype(np.int64)
    return idx, np.ones(len(idx), np.float32)


def _sharpened(graph: GraphFilter) -> GraphFilter:
    graph.tune(2.5, 0.1)
    return graph


def _factored(graph: GraphFilter) -> FactoredGraphFilter:
    return graph.served(2.5, 0.1, RecallConfig(gf_dense_max_items=0, gf_neighbors=4))


@pytest.fixture(params=list(SOURCES), scope="module")
def source(request) -> tuple[str, ScoreSource]:
    return request.param, SOURCES[request.param]()


class TestScoreSourceContract:
    def test_name(self, source) -> None:
        key, src = source
        assert src.name == NAMES[key]

    def test_scores_cover_the_whole_catalogue(self, source) -> None:
        _, src = source
        s = src.scores(*history(0), N_TOTAL)
        assert s.shape == (N_TOTAL,) and s.dtype == np.float32
        assert np.all(s[N_ITEMS:] == 0.0)
        assert np.isfinite(s).all()

    @pytest.mark.parametrize("user", [0, 3, 12, 19])
    def test_unseen_items_of_the_users_block_beat_the_other_block(self, source, user) -> None:
        _, src = source
        idx, w = history(user)
        s = src.scores(idx, w, N_TOTAL)
        block = user // BLOCK
        own = np.arange(block * BLOCK, (block + 1) * BLOCK)
        unseen = np.setdiff1d(own, idx)
        other = np.arange((1 - block) * BLOCK, (2 - block) * BLOCK)
        assert len(unseen) == BLOCK - LIKES_PER_USER
        assert s[unseen].min() > 0
        assert s[unseen].min() > s[other].max()
        np.testing.assert_allclose(s[other], 0.0, atol=1e-5)

    def test_empty_history_scores_nothing(self, source) -> None:
        _, src = source
        s = src.scores(np.empty(0, np.int64), np.empty(0, np.float32), N_TOTAL)
        np.testing.assert_array_equal(s, np.zeros(N_TOTAL, np.float32))

    def test_indices_unknown_to_the_model_are_ignored(self, source) -> None:
        _, src = source
        idx, w = history(4)
        plus = np.concatenate([idx, [N_ITEMS, N_ITEMS + 3]])
        np.testing.assert_array_equal(
            src.scores(plus, np.ones(len(plus), np.float32), N_TOTAL), src.scores(idx, w, N_TOTAL)
        )
        only_unknown = src.scores(np.asarray([N_ITEMS + 1]), np.ones(1, np.float32), N_TOTAL)
        np.testing.assert_array_equal(only_unknown, np.zeros(N_TOTAL, np.float32))

    @pytest.mark.parametrize("n", [1, 3, 8, 100])
    def test_recall_returns_named_sorted_candidates(self, source, n) -> None:
        _, src = source
        idx, w = history(11)
        exclude = np.concatenate([idx, [10]])
        cands = src.recall(idx, w, N_TOTAL, n, exclude=exclude)
        assert isinstance(cands, Candidates)
        assert cands.source == src.name
        assert 0 < len(cands) <= n
        assert len(cands.idx) == len(cands.scores)
        assert np.all(np.diff(cands.scores) <= 0)
        assert not set(cands.idx.tolist()) & set(exclude.tolist())
        assert np.all(cands.scores > 0)
        s = src.scores(idx, w, N_TOTAL)
        np.testing.assert_allclose(cands.scores, s[cands.idx])
        if n >= BLOCK:  # everything positive and not excluded is returned
            expected = set(np.flatnonzero(s > 0).tolist()) - set(exclude.tolist())
            assert set(cands.idx.tolist()) == expected

    def test_recall_without_history_is_empty(self, source) -> None:
        _, src = source
        cands = src.recall(np.empty(0, np.int64), np.empty(0, np.float32), N_TOTAL, 10)
        assert len(cands) == 0 and cands.source == src.name

    def test_request_scores_agree_with_the_whole_catalogue_scores(self, source) -> None:
        """What serving reads (`request`: its top candidates, any item's score) is the same
        numbers as `scores`; the top is sorted, positive and leaves excluded items out."""
        _, src = source
        if not isinstance(src, RecallModel):
            return  # the embeddings are searched through an index, not scored per request
        idx, w = history(13)
        q = RecallQuery(idx, w, idx, w, idx)
        whole = src.query_scores(q, N_TOTAL)
        got = src.request(q, N_TOTAL)
        everything = np.arange(-1, N_TOTAL)
        want = np.concatenate([[0.0], whole]) if isinstance(got, FactoredScores) else None
        if want is not None:  # an index outside the model (-1, new items) scores 0
            np.testing.assert_allclose(got.at(everything), want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(got.at(everything[1:]), whole, rtol=1e-5, atol=1e-6)
        exclude = np.concatenate([idx, [12]])
        ids, vals = got.top(5, exclude)
        assert 0 < len(ids) <= 5 and not set(ids.tolist()) & set(exclude.tolist())
        assert np.all(np.diff(vals) <= 0) and np.all(vals > 0)
        np.testing.assert_allclose(vals, whole[ids], rtol=1e-5, atol=1e-6)

    def test_arrays_round_trip_without_pickle(self, source, tmp_path: Path) -> None:
        _, src = source
        path = tmp_path / "arrays.npz"
        np.savez(path, **src.arrays())
        with np.load(path, allow_pickle=False) as z:
            loaded = type(src).load({k: z[k] for k in z.files})
        for user in (0, 15):
            np.testing.assert_array_equal(
                loaded.scores(*history(user), N_TOTAL), src.scores(*history(user), N_TOTAL)
            )


class TestRecallModelContract:
    """Every model of the registry: fitted from a snapshot, scored from a request's query,
    saved and loaded on its own."""

    CONFIG = RecallConfig(gf_dim=2, ease_l2=10.0)

    @pytest.fixture(params=list(MODELS), scope="class")
    def fitted(self, request) -> RecallModel:
        data = TrainingData(X, X, self.CONFIG, seed=0)
        return MODELS[request.param].from_training(data)

    def test_the_registry_is_covered_by_the_score_contract(self) -> None:
        assert set(MODELS) <= set(NAMES.values())
        assert all(name == model.name for name, model in MODELS.items())

    @pytest.mark.parametrize("user", [0, 12])
    def test_query_scores_rank_the_users_block_first(self, fitted, user) -> None:
        idx, w = history(user)
        q = RecallQuery(idx[:3], np.ones(3, np.float32), idx, w, idx)
        s = fitted.query_scores(q, N_TOTAL)
        assert s.shape == (N_TOTAL,) and np.all(s[N_ITEMS:] == 0.0)
        block = user // BLOCK
        unseen = np.setdiff1d(np.arange(block * BLOCK, (block + 1) * BLOCK), idx)
        other = np.arange((1 - block) * BLOCK, (2 - block) * BLOCK)
        assert s[unseen].min() > s[other].max()

    def test_saved_and_loaded_alone(self, fitted, tmp_path: Path) -> None:
        path = tmp_path / "arrays.npz"
        np.savez(path, **fitted.arrays())
        with np.load(path, allow_pickle=False) as z:
            loaded = type(fitted).load({k: z[k] for k in z.files})
        idx, w = history(3)
        q = RecallQuery(idx, w, idx, w, idx)
        np.testing.assert_array_equal(
            loaded.query_scores(q, N_TOTAL), fitted.query_scores(q, N_TOTAL)
        )
        others = {
            k: v for m in MODELS.values() if m is not type(fitted) for k, v in _arrays(m).items()
        }
        assert type(fitted).load(others) is None  # a version without this model

    def test_a_model_that_does_not_apply_is_left_out(self) -> None:
        small = self.CONFIG.model_copy(update={"ease_max_items": N_ITEMS - 1})
        assert EASE.from_training(TrainingData(X, X, small)) is None


def _arrays(model: type[RecallModel]) -> dict[str, np.ndarray]:
    return model.from_training(TrainingData(X, X, TestRecallModelContract.CONFIG)).arrays()


# ---------------------------------------------------------------------------------------------
# item-CF


def ratings(rows: list[tuple[int, int, float]], n_users: int, n_items: int) -> sp.csr_matrix:
    u, i, v = (np.asarray(c) for c in zip(*rows, strict=True))
    return interaction_matrix(u, i, v.astype(np.float32), n_users, n_items)


def test_pearson_separates_opposite_ratings_that_cosine_calls_similar() -> None:
    # Users 0-3 rate item 0 high-to-low and item 1 low-to-high; item 2 agrees with item 0.
    x = ratings(
        [
            (0, 0, 5),
            (1, 0, 4),
            (2, 0, 2),
            (3, 0, 1),
            (0, 1, 1),
            (1, 1, 2),
            (2, 1, 4),
            (3, 1, 5),
            (0, 2, 4),
            (1, 2, 5),
            (2, 2, 1),
            (3, 2, 2),
        ],
        4,
        3,
    )
    cosine = item_similarity(x, "cosine", k=5, shrink=0.0).toarray()
    pearson = item_similarity(x, "pearson", k=5, shrink=0.0).toarray()
    assert cosine[0, 1] == pytest.approx((5 + 8 + 8 + 5) / (5**2 + 4**2 + 2**2 + 1), rel=1e-6)
    assert pearson[0, 1] <= 0 and pearson[1, 0] <= 0  # negative, so pruned
    assert pearson[0, 2] == pytest.approx(0.8, rel=1e-5)  # centred [2,1,-1,-2]·[1,2,-2,-1]/10
    assert cosine[0, 2] > 0


def test_item_similarity_by_hand() -> None:
    """Cosine over users with shrinkage overlap / (overlap + shrink)."""
    x = ratings([(0, 0, 1), (1, 0, 1), (2, 0, 1), (0, 1, 1), (1, 1, 1), (2, 2, 1)], 3, 3)
    raw = item_similarity(x, "cosine", k=5, shrink=0.0).toarray()
    np.testing.assert_allclose(
        raw,
        [
            [0, 2 / math.sqrt(6), 1 / math.sqrt(3)],
            [2 / math.sqrt(6), 0, 0],
            [1 / math.sqrt(3), 0, 0],
        ],
        rtol=1e-6,
    )
    shrunk = item_similarity(x, "cosine", k=5, shrink=2.0).toarray()
    np.testing.assert_allclose(shrunk[0, 1], raw[0, 1] * 2 / (2 + 2), rtol=1e-6)
    np.testing.assert_allclose(shrunk[0, 2], raw[0, 2] * 1 / (1 + 2), rtol=1e-6)
    # The smaller overlap loses more.
    assert shrunk[0, 2] / raw[0, 2] < shrunk[0, 1] / raw[0, 1]


@pytest.mark.parametrize("k", [1, 3, 50])
@pytest.mark.parametrize("block", [3, 2048])
def test_item_similarity_keeps_k_neighbours_and_a_zero_diagonal(k: int, block: int) -> None:
    sim = item_similarity(X, "cosine", k=k, shrink=1.0, block=block)
    assert sim.shape == (N_ITEMS, N_ITEMS)
    assert np.diff(sim.indptr).max() <= k
    np.testing.assert_array_equal(sim.diagonal(), 0.0)
    assert (sim.data > 0).all()
    full = item_similarity(X, "cosine", k=N_ITEMS, shrink=1.0).toarray()
    dense = sim.toarray()
    for i in range(N_ITEMS):  # the kept neighbours are the k best
        kept = dense[i][dense[i] > 0]
        assert len(kept) == min(k, int((full[i] > 0).sum()))
        np.testing.assert_allclose(
            np.sort(kept)[::-1], np.sort(full[i])[::-1][: len(kept)], rtol=1e-6
        )


def test_item_similarity_is_symmetric_when_unpruned() -> None:
    sim = item_similarity(X, "cosine", k=N_ITEMS, shrink=10.0).toarray()
    np.testing.assert_allclose(sim, sim.T, rtol=1e-6)


def test_itemcf_scores_are_weighted_sums_of_rows() -> None:
    cf = ItemCF.fit(X, "cosine", k=50, shrink=10.0)
    idx, w = np.asarray([0, 2, 5]), np.asarray([1.0, 0.5, -1.0], np.float32)
    expected = (w[:, None] * cf.sim.toarray()[idx]).sum(axis=0)
    np.testing.assert_allclose(cf.scores(idx, w, N_ITEMS), expected, rtol=1e-6, atol=1e-7)


def test_itemcf_row_is_the_stored_row() -> None:
    cf = ItemCF.fit(X, "cosine", k=4, shrink=0.0)
    js, sims = cf.row(3)
    np.testing.assert_array_equal(sims, cf.sim.toarray()[3, js])
    assert sorted(js.tolist()) == sorted(np.flatnonzero(cf.sim.toarray()[3]).tolist())
    assert len(cf.row(N_ITEMS)[0]) == 0 and len(cf.row(-1)[0]) == 0


def test_itemcf_neighbors_best_first() -> None:
    cf = ItemCF.fit(X, "cosine", k=4, shrink=0.0)
    nb, sims = cf.neighbors(3)
    assert len(nb) == 4 and np.all(np.diff(sims) <= 0)
    np.testing.assert_allclose(sims, cf.sim.toarray()[3, nb])
    assert set(nb.tolist()) <= set(range(BLOCK))
    assert len(cf.neighbors(N_ITEMS + 1)[0]) == 0


# ---------------------------------------------------------------------------------------------
# user-CF


def test_usercf_consults_only_k_neighbours() -> None:
    # The query's nearest user (0) also liked item 1, a farther one (1) liked item 2.
    x = ratings([(0, 0, 1), (0, 3, 1), (0, 1, 1), (1, 0, 1), (1, 4, 1), (1, 5, 1), (1, 2, 1)], 2, 6)
    idx, w = np.asarray([0, 3]), np.ones(2, np.float32)
    one = UserCF.fit(x, "cosine", k=1).scores(idx, w, 6)
    many = UserCF.fit(x, "cosine", k=2).scores(idx, w, 6)
    assert one[1] > 0 and one[2] == 0
    assert many[1] > 0 and many[2] > 0


def test_usercf_pearson_ignores_anti_correlated_users() -> None:
    # User 1 rates items 0 and 1 the opposite way to the query, and liked item 2.
    x = ratings([(0, 0, 5), (0, 1, 1), (0, 3, 4), (1, 0, 1), (1, 1, 5), (1, 2, 5)], 2, 4)
    idx, w = np.asarray([0, 1]), np.asarray([2.0, -2.0], np.float32)
    pearson = UserCF.fit(x, "pearson", k=5).scores(idx, w, 4)
    assert pearson[2] == 0 and pearson[3] > 0


# ---------------------------------------------------------------------------------------------
# embeddings


def test_fold_in_of_one_item_is_its_query_row() -> None:
    emb = Embeddings.fit(X, dim=2, seed=0)
    np.testing.assert_array_equal(emb.fold_in(np.asarray([7]), np.asarray([3.0])), emb.query[7])
    np.testing.assert_allclose(
        emb.fold_in(np.asarray([7]), np.asarray([-1.0])), -0.5 * emb.query[7]
    )
    np.testing.assert_allclose(
        emb.fold_in(np.asarray([1, 7, 9]), np.asarray([1.0, 0.0, -2.0])),
        emb.query[1] - 0.5 * emb.query[9],
        rtol=1e-6,
    )
    assert emb.fold_in(np.asarray([N_ITEMS]), np.asarray([1.0])) is None
    np.testing.assert_array_equal(emb.query_vector(3), emb.query[3])
    assert emb.query_vector(N_ITEMS) is None and emb.query_vector(-1) is None


def test_embedding_inner_products_reproduce_the_blocks() -> None:
    emb = Embeddings.fit(X, dim=2, seed=0)
    assert emb.item.shape == emb.query.shape == (N_ITEMS, 2)
    gram = emb.item @ emb.item.T
    same = np.kron(np.eye(2), np.ones((BLOCK, BLOCK))).astype(bool)
    assert gram[same].min() > 0
    np.testing.assert_allclose(gram[~same], 0.0, atol=1e-6)
    cross = emb.item @ emb.query.T
    assert cross[same].min() > 0
    np.testing.assert_allclose(cross[~same], 0.0, atol=1e-6)


def test_embeddings_are_deterministic_and_fold_in_by_the_ridge_solve() -> None:
    a, b = Embeddings.fit(X, dim=3, seed=1), Embeddings.fit(X, dim=3, seed=1)
    np.testing.assert_array_equal(a.item, b.item)
    wide = Embeddings.fit(X, dim=40, reg=0.5, seed=0)  # wider than the item count
    assert wide.dim == 40
    y = wide.item.astype(np.float64)
    np.testing.assert_allclose(
        wide.query, y @ np.linalg.inv(y.T @ y + 0.5 * np.eye(40)), rtol=1e-4, atol=1e-6
    )


def test_embeddings_score_is_item_dot_user() -> None:
    emb = Embeddings.fit(X, dim=4, seed=0)
    idx, w = history(2)
    s = emb.scores(idx, w, N_TOTAL)
    np.testing.assert_allclose(
        s[:N_ITEMS], emb.item @ emb.query[idx].sum(axis=0), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# online co-occurrence


def test_graph_filter_matches_the_dense_formula() -> None:
    """GF-CF + BSPM by hand: b = r R̃ᵀR̃ + α r D^-½ Ū Ūᵀ D^½, s = b Σₖ (-T P)ᵏ/k! (k ≤ 4),
    then the degree re-weighing; the batched path gives the same rows as one request."""
    graph = GraphFilter.fit(X, dim=3, alpha=0.3, seed=0)
    graph.tune(1.5, 0.2)
    x = X.toarray()
    du, di = x.sum(axis=1), x.sum(axis=0)
    r_norm = x / np.sqrt(du)[:, None] / np.sqrt(di)[None, :]
    p = r_norm.T @ r_norm
    u = graph.basis.astype(np.float64)
    r = x[3]
    b = r @ p + 0.3 * (r / np.sqrt(di)) @ u @ u.T * np.sqrt(di)
    t = 1.5 * p
    s = b @ (np.eye(N_ITEMS) - t + t @ t / 2 - t @ t @ t / 6 + t @ t @ t @ t / 24)
    s *= (di + 1.0) ** 0.2
    idx = np.flatnonzero(r)
    got = graph.scores(idx, np.ones(len(idx), np.float32), N_TOTAL)
    np.testing.assert_allclose(got[:N_ITEMS], s, rtol=1e-4, atol=1e-5)
    assert not got[N_ITEMS:].any()
    batch = graph.combine(graph.sharpening_terms(graph.blurred(X[[3, 7]].tocsr())), 1.5, 0.2)
    np.testing.assert_allclose(batch[:, 0], got[:N_ITEMS], rtol=1e-5, atol=1e-6)


def test_graph_filter_tabulated_scores_as_the_per_request_filter(monkeypatch) -> None:
    """`tune(dense=True)` tabulates the filter row by item: a history's scores are the sum of its
    rows, the same as filtering it (every user of X and the first two items of each: a short
    history sums its rows, a long one, 6 of 20 items, multiplies the table; with and without
    sharpening; tabulated in blocks smaller than the catalogue); the table is saved with the
    model and retuning drops or rebuilds it."""
    monkeypatch.setattr("rec.recall.graph_filter.DENSE_BLOCK", 3)
    graph = GraphFilter.fit(X, dim=3, alpha=0.3, seed=0)
    histories = [np.flatnonzero(r)[:n] for r in X.toarray() > 0 for n in (2, N_ITEMS)]
    for sharpen, pop in ((0.0, 0.0), (1.5, 0.2)):
        graph.tune(sharpen, pop)
        assert graph.dense is None
        exact = [graph.scores(h, np.ones(len(h), np.float32), N_TOTAL) for h in histories]
        graph.tune(sharpen, pop, dense=True)
        assert graph.dense.shape == (N_ITEMS, N_ITEMS)
        for idx, want in zip(histories, exact, strict=True):
            weights = np.ones(len(idx), np.float32)
            got = graph.scores(np.concatenate([idx, idx[:1]]), np.append(weights, 1.0), N_TOTAL)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # a repeat counts once
    loaded = GraphFilter.load(graph.arrays())
    np.testing.assert_array_equal(loaded.dense, graph.dense)
    assert (loaded.sharpen, loaded.pop) == (1.5, 0.2)
    loaded.tune(0.0, 0.0)
    assert loaded.dense is None and "gf_dense" not in loaded.arrays()


def test_graph_filter_ideal_filter_is_fitted_on_the_largest_component() -> None:
    """Every component gives R̃ a singular value of 1; the basis comes from the largest one
    (block 0 here, block 1 cut to 5 users), is zero elsewhere, and is R̃'s top right singular
    vectors there."""
    x = X[:15].tocsr()
    users, items = largest_component(x)
    assert users.tolist() == list(range(BLOCK)) and items.tolist() == list(range(BLOCK))
    graph = GraphFilter.fit(x, dim=3, alpha=0.3, seed=0)
    assert not graph.basis[BLOCK:].any()
    block = x[:BLOCK, :BLOCK].toarray()
    r_norm = block / np.sqrt(block.sum(axis=1))[:, None] / np.sqrt(block.sum(axis=0))[None, :]
    top = np.linalg.svd(r_norm)[2][:3].T
    np.testing.assert_allclose(np.abs(top.T @ graph.basis[:BLOCK]), np.eye(3), atol=1e-5)


def test_graph_filter_blurred_one_is_blurred_of_one_row_exactly() -> None:
    graph = GraphFilter.fit(X, dim=3, alpha=0.3, seed=0)
    for user in range(N_USERS):
        row = X[[user]].tocsr()
        np.testing.assert_array_equal(graph.blurred_one(row.indices), graph.blurred(row))


def _bipartite(seed: int, users: int = 300, items: int = 120) -> sp.csr_matrix:
    x = sp.random(users, items, density=0.08, random_state=seed, format="csr", dtype=np.float32)
    x.data[:] = 1.0
    return x


@pytest.mark.parametrize("pop", [0.0, 0.2])
def test_factored_graph_filter_is_the_filter_without_sharpening(pop) -> None:
    """Unsharpened (T = 0) the factored form is the filter itself: every neighbour kept and the
    rank-2k part at full rank, each unseen item scores as the exact filter does."""
    x = _bipartite(1)
    graph = GraphFilter.fit(x, dim=20, alpha=0.3, seed=0)
    graph.tune(0.0, pop)
    factored = FactoredGraphFilter.of(graph, neighbors=x.shape[1], rank=40, candidates=10**6)
    assert factored.beta == 1.0
    for user in range(40):
        h = x[user].indices
        ones = np.ones(len(h), np.float32)
        exact, got = graph.scores(h, ones, 130), factored.scores(h, ones, 130)
        unseen = np.setdiff1d(np.arange(x.shape[1]), h)  # an item's own entry is left out
        np.testing.assert_allclose(got[unseen], exact[unseen], rtol=1e-4, atol=1e-6)


def test_factored_graph_filter_ranks_as_the_sharpened_filter() -> None:
    """Sharpened, the rest spectrum is served through β (between p's value at the basis's
    smallest eigenvalue and 1): the top 10 agree with the exact filter's for 9 items in 10
    (measured 0.97 on this graph, against 0.93 with β = 1)."""
    x = _bipartite(2)
    graph = GraphFilter.fit(x, dim=20, alpha=0.3, seed=0)
    graph.tune(1.5, 0.1)
    factored = FactoredGraphFilter.of(graph, neighbors=x.shape[1], rank=40, candidates=10**6)
    assert 0.5 < factored.beta < 1.0
    overlap = []
    for user in range(60):
        h = x[user].indices
        exact = graph.scores(h, np.ones(len(h), np.float32), x.shape[1])
        exact[h] = -np.inf
        q = RecallQuery(h, np.ones(len(h), np.float32), h, np.ones(len(h), np.float32), h)
        ids, _ = factored.request(q, x.shape[1]).top(10, h)
        overlap.append(len(set(ids.tolist()) & set(np.argsort(-exact)[:10].tolist())) / 10)
    assert np.mean(overlap) >= 0.9


def test_factored_graph_filter_keeps_each_items_top_neighbours_and_loads() -> None:
    """The sparse part holds each item's `neighbors` largest entries of P (column-scaled by
    β w_j), never the item itself; a request's candidates are its history's neighbours; a
    saved factored filter loads as one through the registry's `GraphFilter.load`."""
    x = _bipartite(3)
    graph = GraphFilter.fit(x, dim=10, alpha=0.3, seed=0)
    config = RecallConfig(gf_dense_max_items=0, gf_neighbors=7, gf_rank=12, gf_candidates=5)
    factored = graph.served(1.0, 0.1, config)
    assert isinstance(factored, FactoredGraphFilter)
    assert factored.query.shape == factored.item.shape == (x.shape[1], 12)
    p = (graph.by_item @ graph.by_user).toarray()
    np.fill_diagonal(p, 0.0)
    w = factored.beta * (graph.item_degree + 1.0) ** 0.1
    nb = factored.neighbors
    for i in range(x.shape[1]):
        row = nb.indices[nb.indptr[i] : nb.indptr[i + 1]]
        assert len(row) == min(7, np.count_nonzero(p[i])) and i not in row
        scaled = p[i] * w
        assert scaled[row].min() >= np.sort(scaled)[-7] - 1e-6
        np.testing.assert_allclose(nb[i, row].toarray().ravel(), scaled[row], rtol=1e-5)
    h = x[0].indices
    got = factored.request(RecallQuery(h, np.ones(len(h)), h, np.ones(len(h)), h), 200)
    assert set(got.top(5, h)[0].tolist()) <= set(nb[h].indices.tolist())
    for short in (h[:1], h):  # neighbour entries summed sorted (few) or over the catalogue
        scored = factored.request(RecallQuery(short, [1.0], short, [1.0], short), 200)
        want = factored.scores(short, np.ones(len(short), np.float32), 200)
        np.testing.assert_allclose(scored.at(np.arange(200)), want, rtol=1e-5, atol=1e-6)
    loaded = GraphFilter.load(factored.arrays())
    assert isinstance(loaded, FactoredGraphFilter) and loaded.candidates == 5
    ones = np.ones(len(h), np.float32)
    np.testing.assert_array_equal(loaded.scores(h, ones, 200), factored.scores(h, ones, 200))
    small = graph.served(1.0, 0.1, config.model_copy(update={"gf_dense_max_items": 120}))
    assert small is graph and graph.dense is not None  # a small catalogue is tabulated


def _row(c: Cooccurrence, i: int) -> dict[int, float]:
    return dict(zip(*(a.tolist() for a in c.row(i)), strict=True))


def test_cooccurrence_counts_first_time_events_only() -> None:
    c = Cooccurrence(window=20)
    c.add(0, [], True)
    c.add(1, [0], True)
    c.add(1, [0], False)  # a repeat on the same item pairs nothing
    assert _row(c, 0) == {1: 1.0} and _row(c, 1) == {0: 1.0}  # one pair, one user each
    assert c.item_users[0] == 1 and c.item_users[1] == 1


def test_cooccurrence_pairs_within_the_window() -> None:
    c = Cooccurrence(window=3)
    for n in range(6):
        c.add(n, [], True)
    c.add(9, [0, 1, 2, 3, 4, 5], True)
    assert set(_row(c, 9)) == {3, 4, 5}
    assert 9 not in _row(c, 2)


def test_cooccurrence_rows_read_after_every_change() -> None:
    """Rows are kept as arrays between reads; every event that touches a row (either end of a
    pair, or a user count) shows in the next read."""
    c = Cooccurrence()
    c.add(0, [], True)
    c.add(1, [0], True)
    js, sims = c.row(0)
    assert js.tolist() == [1] and sims == pytest.approx([1.0])
    c.add(2, [0], True)  # a new neighbour of 0, added from 2's side
    c.add(1, [2], True)  # 1 gains a user (and a pair with 2)
    js, sims = c.row(0)
    expect = {1: 1 / np.sqrt(2 * 1), 2: 1 / np.sqrt(1 * 1)}
    assert dict(zip(js.tolist(), sims.tolist(), strict=True)) == pytest.approx(expect)
    js, sims = c.row(1)
    assert dict(zip(js.tolist(), sims.tolist(), strict=True)) == pytest.approx(
        {0: 1 / np.sqrt(2), 2: 1 / np.sqrt(2)}
    )


def test_cooccurrence_rows_grow_in_place() -> None:
    """A row outgrows its arrays and keeps every count; what was read before stays as read."""
    c = Cooccurrence(window=100)
    c.add(0, [], True)
    c.add(1, [0], True)
    before, _ = c.row(0)
    for j in range(2, 40):
        c.add(j, [0], True)
    c.add(1, [0], True)  # the pair (0, 1) again
    assert before.tolist() == [1]
    row = _row(c, 0)
    assert set(row) == set(range(1, 40)) and row[1] == pytest.approx(2 / np.sqrt(2 * 1))
    assert c.similarity(0, 1) == pytest.approx(row[1]) and c.similarity(0, 99) == 0.0


def test_cooccurrence_ignores_self_pairs() -> None:
    c = Cooccurrence()
    c.add(4, [4, 2], True)
    assert _row(c, 4) == {2: 1.0}


def test_cooccurrence_similarity_by_hand() -> None:
    """count / sqrt(n_i n_j) with n the number of users who reached each item."""
    c = Cooccurrence()
    # user A: 0, 1, 2; user B: 0, 2; user C: 2.
    c.add(0, [], True)
    c.add(1, [0], True)
    c.add(2, [0, 1], True)
    c.add(0, [], True)
    c.add(2, [0], True)
    c.add(2, [], True)
    n = {0: 2, 1: 1, 2: 3}
    counts = {(0, 1): 1, (0, 2): 2, (1, 2): 1}
    for (i, j), count in counts.items():
        expected = count / math.sqrt(n[i] * n[j])
        assert c.similarity(i, j) == pytest.approx(expected, rel=1e-6)
        assert c.similarity(j, i) == pytest.approx(expected, rel=1e-6)
    js, sims = c.row(2)
    assert dict(zip(js.tolist(), sims.tolist(), strict=True)) == pytest.approx(
        {0: 2 / math.sqrt(6), 1: 1 / math.sqrt(3)}, rel=1e-6
    )
    assert c.similarity(1, 5) == 0.0
    js, sims = c.row(7)
    assert len(js) == len(sims) == 0


def test_cooccurrence_grows_for_large_indices() -> None:
    c = Cooccurrence()
    c.add(500, [], True)
    c.add(3, [500], True)
    assert len(c.item_users) >= 501
    assert c.similarity(3, 500) == pytest.approx(1.0)


def test_cooccurrence_partner_with_a_large_index_never_added_itself() -> None:
    """A partner from the user's history may have a large index it was never added under."""
    c = Cooccurrence()
    c.add(0, [100], True)  # item 100 came from the user's history, never added on its own
    js, sims = c.row(0)
    assert js.tolist() == [100] and sims.tolist() == [1.0]
    assert c.similarity(100, 0) == 1.0 and c.row(100)[0].tolist() == [0]


# ---------------------------------------------------------------------------------------------
# EASE


def test_ease_weights_match_the_closed_form() -> None:
    """B = I - P diagMat(1/diag(P)), P = (XᵀX + λI)⁻¹ (Steck 2019), against a dense inverse."""
    rng = np.random.default_rng(3)
    x = sp.csr_matrix((rng.random((40, 15)) < 0.3).astype(np.float32))
    for l2 in (1.0, 50.0):
        p = np.linalg.inv(x.T.toarray() @ x.toarray() + l2 * np.eye(15))
        expected = np.eye(15) - p / np.diag(p)[None, :]
        np.testing.assert_allclose(ease_weights(x, l2), expected, atol=1e-5)
        assert np.all(np.diag(ease_weights(x, l2)) == 0.0)


def test_ease_reads_a_binary_history_and_round_trips() -> None:
    model = EASE.fit(X, l2=10.0)
    idx, _ = history(2)
    np.testing.assert_allclose(
        model.scores(idx, np.full(len(idx), 3.0, np.float32), N_TOTAL),
        model.weights[idx].sum(axis=0).tolist() + [0.0] * 5,
        rtol=1e-6,
    )
    again = EASE.load(model.arrays())
    np.testing.assert_array_equal(
        again.scores(*history(2), N_TOTAL), model.scores(*history(2), N_TOTAL)
    )


def test_ease_refuses_a_singular_system() -> None:
    with pytest.raises(ValueError, match="positive definite"):
        ease_weights(X, l2=-1e9)


# ---------------------------------------------------------------------------------------------
# trending

H = 3600.0


def test_trending_halves_per_half_life() -> None:
    t = Trending(H)
    assert t.get("a") == 0.0
    t.add("a", 1000.0)
    assert t.get("a") == 1.0
    t.add("b", 1000.0 + H)
    assert t.get("a") == pytest.approx(0.5, rel=1e-12)
    assert t.get("b") == pytest.approx(1.0, rel=1e-12)
    t.add("a", 1000.0 + 3 * H)
    assert t.get("a") == pytest.approx(1 + 0.5**3, rel=1e-12)
    assert t.get("b") == pytest.approx(0.25, rel=1e-12)
    assert t.latest == 1000.0 + 3 * H


def test_trending_out_of_order_event_counts_less() -> None:
    t = Trending(H)
    t.add("a", 10 * H)
    t.add("b", 9 * H)  # arrives late: already one half-life old at the newest time
    assert t.get("b") == pytest.approx(0.5, rel=1e-12)
    assert t.latest == 10 * H


def test_trending_rebase_keeps_relative_values() -> None:
    t = Trending(H)
    t.add("a", 0.0)
    t.add("b", 30 * H)
    t.add("a", 50 * H)
    t.add("c", 61 * H)  # > 60 half-lives after the origin: values are rebased
    assert t.origin == 61 * H
    assert t.get("a") == pytest.approx(2.0**-61 + 2.0**-11, rel=1e-9)
    assert t.get("b") == pytest.approx(2.0**-31, rel=1e-9)
    assert t.get("c") == pytest.approx(1.0, rel=1e-12)
    for n in range(1, 5):  # keeps working across several rebases
        t.add("c", (61 + 70 * n) * H)
    assert t.get("c") == pytest.approx(1 + 2.0**-70 + 2.0**-140, rel=1e-9)
    assert t.weights.max() < 2.0**61


def test_trending_vector_is_cached_until_an_event_or_a_catalogue_change() -> None:
    t = Trending(H)
    t.add("a", 0.0)
    cat = Catalog.from_ids(["a", "b"])
    v = t.vector(cat)
    assert t.vector(cat) is v and not v.flags.writeable  # shared, so nobody may change it
    np.testing.assert_allclose(v, [t.get("a"), 0.0], rtol=1e-6)
    t.add("b", H)  # an event: a new vector with both items, read at the new time
    w = t.vector(cat)
    assert w is not v
    np.testing.assert_allclose(w, [t.get("a"), t.get("b")], rtol=1e-6)
    cat.ensure("c")  # a catalogue change: the new item gets its (zero) entry
    np.testing.assert_allclose(t.vector(cat), [t.get("a"), t.get("b"), 0.0], rtol=1e-6)
    other = Catalog.from_ids(["b"])  # another catalogue
    np.testing.assert_allclose(t.vector(other), [t.get("b")], rtol=1e-6)


def test_trending_vector_aligns_with_the_catalogue() -> None:
    t = Trending(H)
    t.add("b", 0.0)
    t.add("b", 0.0)
    t.add("zz", 0.0)  # not in the catalogue: ignored
    t.add("a", H)
    cat = Catalog.from_ids(["x", "a", "b"])
    v = t.vector(cat)
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, [0.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(Trending(H).vector(cat), np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------
# helpers


def test_top_n_orders_and_filters() -> None:
    s = np.asarray([0.5, 0.0, -1.0, 0.7, 2.0, 0.1])
    idx, vals = top_n(s, 10)
    assert idx.tolist() == [4, 3, 0, 5]  # only scores above min_score=0
    np.testing.assert_allclose(vals, [2.0, 0.7, 0.5, 0.1])
    assert idx.dtype == np.int64 and vals.dtype == np.float32
    assert top_n(s, 2)[0].tolist() == [4, 3]
    assert top_n(s, 3, exclude=np.asarray([4, 99]))[0].tolist() == [3, 0, 5]
    assert top_n(s, 6, min_score=-5.0)[0].tolist() == [4, 3, 0, 5, 1, 2]
    assert len(top_n(s, 0)[0]) == 0 and len(top_n(np.empty(0), 3)[0]) == 0
    assert top_n(s, 3, exclude=np.empty(0, np.int64))[0].tolist() == [4, 3, 0]


def test_top_n_rows_is_top_n_of_each_row() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 40)).astype(np.float32)
    scores[1] = 0.0  # nothing above min_score
    scores[2, :10] = scores[2, 10]  # ties
    exclude = np.asarray([0, 7, 39, 99])
    for n in (0, 3, 40, 50):
        rows = top_n_rows(scores, n, exclude)
        assert len(rows) == 5
        for r, (idx, vals) in enumerate(rows):
            if r == 2:  # ties: the same choice as one row alone
                want = top_n(scores[r], n, exclude)[0].tolist()
            else:  # best first, above 0, not excluded
                want = [
                    j
                    for j in np.argsort(-scores[r], kind="stable").tolist()
                    if scores[r, j] > 0 and j not in exclude
                ][:n]
            assert idx.tolist() == want
            np.testing.assert_array_equal(vals, scores[r, want])
    assert top_n_rows(scores, 3)[1][0].size == 0


def test_top_n_does_not_modify_its_input() -> None:
    s = np.asarray([1.0, 2.0, 3.0], np.float32)
    top_n(s, 2, exclude=np.asarray([2]))
    np.testing.assert_array_equal(s, [1.0, 2.0, 3.0])


def test_interaction_matrix_sums_duplicates() -> None:
    m = interaction_matrix(
        np.asarray([0, 0, 1, 0]), np.asarray([1, 1, 2, 0]), np.asarray([1.0, 2.5, -1.0, 4.0]), 3, 4
    )
    assert m.shape == (3, 4) and m.dtype == np.float32 and m.nnz == 3
    np.testing.assert_array_equal(m.toarray(), [[4, 3.5, 0, 0], [0, 0, -1, 0], [0, 0, 0, 0]])


def test_weighted_rows_is_the_scipy_product_exactly() -> None:
    rng = np.random.default_rng(0)
    m = sp.random(30, 40, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    for rows in ([0, 5, 5, 29], [7], [], list(range(30))):
        rows = np.asarray(rows, np.int64)
        w = rng.standard_normal(len(rows)).astype(np.float32)
        got = weighted_rows(m, rows, w)
        assert got.dtype == np.float32 and got.shape == (40,)
        np.testing.assert_array_equal(got, np.asarray(m[rows].T @ w).ravel())


def test_center_rows_over_stored_entries() -> None:
    m = sp.csr_matrix(
        np.asarray(
            [
                [5.0, 0.0, 1.0, 3.0],  # mean over stored 3 -> [2, -2, 0]
                [2.0, 2.0, 0.0, 0.0],  # no variance: kept as is
                [0.0, 0.0, 0.0, 0.0],
            ],
            np.float32,
        )
    )
    c = center_rows(m)
    np.testing.assert_allclose(c.toarray(), [[2, 0, -2, 0], [2, 2, 0, 0], [0, 0, 0, 0]])
    assert c.nnz == m.nnz  # a centred 0 stays a stored entry
    np.testing.assert_array_equal(m.toarray()[0], [5, 0, 1, 3])  # input untouched


def test_cooccurrence_rows_of_many_items_are_each_row() -> None:
    c = Cooccurrence()
    c.add(0, [], True)
    c.add(1, [0], True)
    c.add(2, [0, 1], True)
    which, js, sims = c.rows([2, 100, 0])  # 100: no partners, beyond item_users
    assert which.tolist() == [0, 0, 2, 2]
    for pos, item in ((0, 2), (2, 0)):
        got = dict(zip(js[which == pos].tolist(), sims[which == pos].tolist(), strict=True))
        assert got == pytest.approx(_row(c, item))
    assert [len(a) for a in c.rows([5, 6])] == [0, 0, 0]


def test_grown_pads_with_zeros_and_keeps_what_is_big_enough() -> None:
    a = np.asarray([1.0, 2.0], np.float32)
    assert grown(a, 2) is a
    b = grown(a, 3)
    assert b.dtype == np.float32 and len(b) >= 4 and b[:3].tolist() == [1.0, 2.0, 0.0]
    assert len(grown(np.zeros(0, np.int64), 100)) == 100
