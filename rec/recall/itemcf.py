"""Item-based collaborative filtering: top-K neighbour lists from the training snapshot plus
co-occurrence counted online, so pairs formed after training (and new items) count at once."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from rec.arrays import grown
from rec.recall.base import (
    RecallModel,
    RecallQuery,
    TrainingData,
    center_rows,
    load_csr,
    normalize_rows,
    save_csr,
    weighted_rows,
)


def item_similarity(
    x: sp.csr_matrix, kind: str, k: int, shrink: float, block: int = 2048
) -> sp.csr_matrix:
    """items × items similarity (cosine, or Pearson = cosine of item-centred columns), keeping
    each item's k best neighbours; computed in row blocks so memory stays O(block × items)."""
    xt = x.T.tocsr().astype(np.float32)  # items × users
    if kind == "pearson":
        xt = center_rows(xt)
    binary = xt.copy()
    binary.data = np.ones_like(binary.data)
    xn = normalize_rows(xt)
    n = xn.shape[0]
    rows, cols, vals = [], [], []
    xn_t = xn.T.tocsc()
    bt = binary.T.tocsc()
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = (xn[start:stop] @ xn_t).toarray()
        if shrink > 0:
            overlap = (binary[start:stop] @ bt).toarray()
            sim *= overlap / (overlap + shrink)
        sim[np.arange(stop - start), np.arange(start, stop)] = 0.0
        kk = min(k, n - 1)
        if kk <= 0:
            continue
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        v = np.take_along_axis(sim, part, axis=1)
        keep = v > 0
        r = np.repeat(np.arange(start, stop), kk).reshape(-1, kk)
        rows.append(r[keep])
        cols.append(part[keep])
        vals.append(v[keep])
    if not rows:
        return sp.csr_matrix((n, n), dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
    )


_NO_ITEMS = np.zeros(0, np.int64)
_NO_COUNTS = np.zeros(0, np.float32)


class Cooccurrence:
    """Online item co-occurrence from the live event stream, keyed by catalogue index (reset
    and recounted at every model swap, so indices always match the current catalogue).

    A user's first positive event on item j pairs it with the user's recent distinct items; the
    similarity is count / sqrt(n_i n_j) (cosine on binary user sets)."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.item_users = np.zeros(64, np.float32)
        # Row i: its partners j in arrival order with their pair counts, in arrays that only
        # grow (an entry never moves), and where each partner sits. Every request reads the rows
        # of its user's recent items and every event bumps ~20 rows, so an update is O(1) and a
        # read is a slice, not a rebuild of the row.
        self.partners: dict[int, dict[int, int]] = {}  # i -> {j: position in i's arrays}
        self._js: dict[int, np.ndarray] = {}
        self._counts: dict[int, np.ndarray] = {}

    def add(self, j: int, recent: list[int], first_time: bool) -> None:
        if not first_time:
            return
        self.item_users = grown(self.item_users, max(j, *recent) + 1 if recent else j + 1)
        self.item_users[j] += 1
        for i in recent[-self.window :]:
            if i != j:
                self._bump(j, i)
                self._bump(i, j)

    def _bump(self, i: int, j: int) -> None:
        where = self.partners.setdefault(i, {})
        pos = where.get(j)
        if pos is None:
            pos = where[j] = len(where)
            self._js[i] = grown(self._js.get(i, _NO_ITEMS), pos + 1)
            self._counts[i] = grown(self._counts.get(i, _NO_COUNTS), pos + 1)
            self._js[i][pos] = j
        self._counts[i][pos] += 1.0

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of item i and their similarities, as arrays."""
        _, js, sims = self.rows([i])
        return js, sims

    def rows(self, items: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of several items at once, concatenated: (position in `items`, neighbour,
        similarity) per entry, item by item in order. A request reads ~20 rows; one
        normalisation over all of them costs what one row's did."""
        sizes = [len(self.partners.get(i, ())) for i in items]
        if not sum(sizes):
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        held = [(i, n) for i, n in zip(items, sizes, strict=True) if n]
        js = np.concatenate([self._js[i][:n] for i, n in held])
        counts = np.concatenate([self._counts[i][:n] for i, n in held])
        which = np.repeat(np.arange(len(items)), sizes)
        idx = np.asarray(items, np.int64)
        own = np.ones(len(items), np.float32)  # an item past item_users has no users counted
        counted = idx < len(self.item_users)
        own[counted] = np.maximum(self.item_users[idx[counted]], np.float32(1.0))
        norm = np.maximum(self.item_users[js], np.float32(1.0)) * own[which]
        return which, js, counts / np.sqrt(norm)

    def add_scores(self, out: np.ndarray, seeds: list[tuple[int, float]]) -> None:
        """out[j] += w · sim(i, j) for every (i, w) in seeds and neighbour j < len(out): the
        sums `row` gives, seed by seed, in one scatter."""
        if not seeds:
            return
        which, js, sims = self.rows([i for i, _ in seeds])
        values = np.asarray([w for _, w in seeds], np.float32)[which] * sims
        ok = js < len(out)
        np.add.at(out, js[ok], values[ok])

    def similarity(self, i: int, j: int) -> float:
        pos = self.partners.get(i, {}).get(j)
        if pos is None:
            return 0.0
        c = float(self._counts[i][pos])
        return c / math.sqrt(
            max(float(self.item_users[i]), 1.0) * max(float(self.item_users[j]), 1.0)
        )


class ItemCF(RecallModel):
    name = "itemcf"
    reason = "similar to items you interacted with"
    anchored_reason = "because you interacted with {anchor}"

    def __init__(self, sim: sp.csr_matrix) -> None:
        self.sim = sim.tocsr()

    @classmethod
    def fit(
        cls, x: sp.csr_matrix, similarity: str = "cosine", k: int = 50, shrink: float = 10.0
    ) -> ItemCF:
        return cls(item_similarity(x, similarity, k, shrink))

    @classmethod
    def from_training(cls, data: TrainingData) -> ItemCF:
        rc = data.config
        return cls.fit(data.cf, rc.similarity, rc.itemcf_neighbors, rc.shrinkage)

    def query_scores(self, q: RecallQuery, n_total: int) -> np.ndarray:
        return self.scores(q.seeds, q.seed_weights, n_total)

    @property
    def n_items(self) -> int:
        return self.sim.shape[0]

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        """Σ_r w_r · sim[r, :] over the seed items known to the model, length n_total."""
        out = np.zeros(n_total, np.float32)
        known = idx < self.n_items
        if known.any():
            out[: self.n_items] = weighted_rows(self.sim, idx[known], weights[known])
        return out

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i's stored neighbours and similarities (in storage order), read from the CSR
        arrays directly: a request reads a few rows, and scipy's row indexing costs ~0.1 ms."""
        if not 0 <= i < self.n_items:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        start, stop = self.sim.indptr[i], self.sim.indptr[i + 1]
        return self.sim.indices[start:stop], self.sim.data[start:stop]

    def neighbors(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i's neighbours, most similar first."""
        js, sims = self.row(i)
        order = np.argsort(-sims)
        return js[order].astype(np.int64), sims[order]

    def arrays(self) -> dict[str, np.ndarray]:
        return save_csr("itemcf", self.sim)

    @classmethod
    def load(cls, arrays) -> ItemCF | None:
        return cls(load_csr("itemcf", arrays)) if "itemcf_shape" in arrays else None
