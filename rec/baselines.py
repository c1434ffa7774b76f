"""Classic recommenders behind one small offline protocol: fit, score, recommend, observe.

Every model scores users in batches of dense [users, items] float32 blocks, so full ranking over
tens of thousands of users and items never holds the whole users × items matrix. All models are
deterministic: no randomness, or a fixed seed.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from rec.metrics import PAD_ID
from rec.recall import als_factors, ease_weights
from rec.splits import Interactions

BATCH_USERS = 1024  # users scored per dense block in `recommend`
BATCH_ROWS = 1024  # rows per sparse similarity block in `cosine_neighbours`


class Model:
    """The offline protocol every evaluated model follows."""

    name: str = "model"

    def fit(self, train: Interactions) -> Model:
        raise NotImplementedError

    def scores(self, users: np.ndarray) -> np.ndarray:
        """Dense float32 [len(users), n_items] scores, a new array the caller may modify."""
        raise NotImplementedError

    def fit_info(self) -> dict:
        """What fit chose or measured, for the report (empty for models without choices)."""
        return {}

    def recommend(self, users: np.ndarray, k: int, exclude: sp.csr_matrix) -> np.ndarray:
        """Top-k item indices [len(users), k], best first. `exclude` is indexed by user (row u:
        items never to return to user u, e.g. their train items); slots left without a
        candidate hold PAD_ID."""
        users = np.asarray(users, dtype=np.int64)
        blocks = [np.empty((0, k), dtype=np.int64)]
        for start in range(0, len(users), BATCH_USERS):
            batch = users[start : start + BATCH_USERS]
            scores = self.scores(batch)
            mask = exclude[batch]
            rows = np.repeat(np.arange(len(batch)), np.diff(mask.indptr))
            scores[rows, mask.indices] = -np.inf
            blocks.append(top_k(scores, k))
        return np.concatenate(blocks)

    def observe(self, user: int, item: int, ts: float) -> None:
        """Prequential feedback on one replayed event; static models ignore it."""


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest finite scores, best first, padded with PAD_ID."""
    n_rows, n_cols = scores.shape
    out = np.full((n_rows, k), PAD_ID, dtype=np.int64)
    kk = min(k, n_cols)
    if kk == 0:
        return out
    # Partition the negated scores around a small kth: numpy's argpartition is many times
    # slower around a kth near the end of rows full of ties (zeros, equal counts).
    neg = np.negative(scores)
    part = np.argpartition(neg, kk - 1, axis=1)[:, :kk]
    values = np.take_along_axis(neg, part, axis=1)
    order = np.argsort(values, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top[np.take_along_axis(values, order, axis=1) == np.inf] = PAD_ID
    out[:, :kk] = top
    return out


def cosine_neighbours(m: sp.csr_matrix, k: int, shrinkage: float) -> sp.csr_matrix:
    """Square CSR: row r holds the k rows of `m` most similar to row r (itself excluded) with
    their shrunk cosine a·b / (|a| |b| + shrinkage); ties go to the lower index, non-positive
    similarities are dropped. Blocks of rows stay sparse: co-occurrence is mostly zero."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = m.astype(np.float32)
    n = m.shape[0]
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1), dtype=np.float32).ravel())
    mt = m.T.tocsr()
    rows, cols, sims = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    for start in range(0, n, BATCH_ROWS):
        block = (m[start : start + BATCH_ROWS] @ mt).tocoo()
        r, c = block.row.astype(np.int64) + start, block.col.astype(np.int64)
        sim = block.data / (norms[r] * norms[c] + np.float32(shrinkage))
        keep = (r != c) & (sim > 0)
        r, c, sim = r[keep], c[keep], sim[keep]
        order = np.lexsort((c, -sim, r))  # by row, then similarity descending, then column
        r, c, sim = r[order], c[order], sim[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r, side="left")
        rows.append(r[rank < k])
        cols.append(c[rank < k])
        sims.append(sim[rank < k])
    return sp.csr_matrix(
        (np.concatenate(sims), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
        dtype=np.float32,
    )


class Popularity(Model):
    """Every user gets the items with the most (positive) train users."""

    name = "pop"

    def fit(self, train: Interactions) -> Popularity:
        self.counts = np.asarray(train.matrix().sum(axis=0), dtype=np.float32).ravel()
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.counts, (len(users), 1))


class ItemKNN(Model):
    """Item-based CF: cosine item-item similarity, top-`neighbours` per item, scores = X @ S."""

    name = "itemknn"

    def __init__(self, neighbours: int = 100, shrinkage: float = 10.0) -> None:
        self.neighbours = neighbours
        self.shrinkage = shrinkage

    def fit(self, train: Interactions) -> ItemKNN:
        self.x = train.matrix()
        self.sim = cosine_neighbours(self.x.T.tocsr(), self.neighbours, self.shrinkage)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (self.x[users] @ self.sim).toarray()


class UserKNN(Model):
    """User-based CF: cosine user-user similarity, top-`neighbours` per user, scores = S_u @ X."""

    name = "userknn"

    def __init__(self, neighbours: int = 100, shrinkage: float = 10.0) -> None:
        self.neighbours = neighbours
        self.shrinkage = shrinkage

    def fit(self, train: Interactions) -> UserKNN:
        self.x = train.matrix()
        self.sim = cosine_neighbours(self.x, self.neighbours, self.shrinkage)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (self.sim[users] @ self.x).toarray()


class ALS(Model):
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky 2008) by `implicit`'s CPU
    conjugate-gradient ALS on the binary train matrix. Observed pairs get confidence `alpha`
    (40, the paper's value), unobserved ones 1."""

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 40.0,
        iterations: int = 15,
        threads: int = 2,
        seed: int = 0,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.threads = threads
        self.seed = seed

    def fit(self, train: Interactions) -> ALS:
        self.user_factors, self.item_factors = als_factors(
            train.matrix(),
            self.factors,
            self.regularization,
            alpha=self.alpha,
            iterations=self.iterations,
            seed=self.seed,
            threads=self.threads,
        )
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T


class EASE(Model):
    """Steck 2019 closed form: B = I - P diagMat(1 / diag(P)), P = (XᵀX + λI)⁻¹; scores = X @ B.

    B is dense items × items, so data sets above `max_items` items are refused."""

    name = "ease"
    max_items = 20_000  # a dense 20k × 20k float32 matrix is 1.6 GB

    def __init__(self, l2: float = 500.0) -> None:
        self.l2 = l2

    def fit(self, train: Interactions) -> EASE:
        n = train.n_items
        if n > self.max_items:
            raise MemoryError(
                f"EASE needs a dense {n} × {n} item matrix ({n * n * 4 / 1e9:.1f} GB as float32); "
                f"refusing above {self.max_items} items"
            )
        self.x = train.matrix()
        self.b = ease_weights(self.x, self.l2)  # the closed form rec's EASE source uses
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[users] @ self.b)


BASELINES: dict[str, type[Model]] = {
    "pop": Popularity,
    "itemknn": ItemKNN,
    "userknn": UserKNN,
    "als": ALS,
    "ease": EASE,
}
