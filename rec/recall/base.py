"""Shared pieces of the recall sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
import scipy.sparse as sp

from rec.config import RecallConfig


@dataclass(frozen=True)
class Candidates:
    """Scored candidates of one source: item indices and scores, best first."""

    source: str
    idx: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.idx)


class ScoreSource:
    """A recall source scoring every item from a user's history (item indices + weights).

    `scores` is the one verb each source implements; `recall` turns it into named candidates,
    and the ranker reads `scores` for any candidate, whichever source proposed it."""

    name: str = "source"

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        """A score per catalogue index (length n_total); indices the model lacks are ignored."""
        raise NotImplementedError

    def recall(
        self,
        idx: np.ndarray,
        weights: np.ndarray,
        n_total: int,
        n: int,
        exclude: np.ndarray | None = None,
    ) -> Candidates:
        ids, vals = top_n(self.scores(idx, weights, n_total), n, exclude)
        return Candidates(self.name, ids, vals)


@dataclass(frozen=True)
class TrainingData:
    """What every recall model is fitted from: the users × items matrices of one log snapshot."""

    positive: sp.csr_matrix  # binary: the user's summed weight on the item is positive
    cf: sp.csr_matrix  # the neighbourhood models' input (signed weights for Pearson)
    config: RecallConfig
    seed: int = 0
    threads: int = 0  # 0: every core


class RequestScores:
    """One request's scores of one recall model: its own best candidates, and the score of any
    item (the ranker's feature for candidates other sources proposed)."""

    def top(self, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def at(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DenseScores(RequestScores):
    """A score per catalogue index, computed whole (models whose scores are sparse or whose
    catalogue is bounded; the recall stage ranks all such rows of a request at once)."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def top(self, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return top_n(self.vector, n, exclude)

    def at(self, idx: np.ndarray) -> np.ndarray:
        return self.vector[idx]


@dataclass(frozen=True)
class RecallQuery:
    """One request's history, in the forms the recall models read (catalogue indices): the
    most recent positive items weighted by recency (`seeds`), every recent item with its summed
    weight (`history`) and the items the user likes on balance (`liked`)."""

    seeds: np.ndarray
    seed_weights: np.ndarray
    history: np.ndarray
    history_weights: np.ndarray
    liked: np.ndarray


class RecallModel(ScoreSource):
    """A trained recall source served from the user's live history: fitted from a snapshot,
    saved in the model version's arrays, scoring every catalogue item per request. Registered
    by name in `rec.recall.registry.MODELS`; the ranker reads its score of every candidate as
    the features `s_<name>` and `r_<name>`."""

    orderable: ClassVar[bool] = False  # its scores alone may be served as the final order
    blended: ClassVar[bool] = False  # part of the "blend" order
    reason: ClassVar[str] = "recommended for you"  # why an item it recalled is shown
    # the reason when the user's history item most similar to the candidate is known
    anchored_reason: ClassVar[str | None] = None

    @classmethod
    def from_training(cls, data: TrainingData) -> Self | None:
        """The model of a snapshot, or None where it does not apply (e.g. too many items)."""
        raise NotImplementedError

    def query_scores(self, q: RecallQuery, n_total: int) -> np.ndarray:
        """This request's score of every catalogue index (length n_total)."""
        raise NotImplementedError

    def request(self, q: RecallQuery, n_total: int) -> RequestScores:
        """This request's scores as serving reads them (by default `query_scores`, whole)."""
        return DenseScores(self.query_scores(q, n_total))

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def load(cls, arrays) -> Self | None:
        """The model saved in a version's arrays, None when that version has none."""
        raise NotImplementedError


def top_n(
    scores: np.ndarray, n: int, exclude: np.ndarray | None = None, min_score: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the n largest scores above `min_score`, best first."""
    return top_n_rows(np.asarray(scores)[None, :], n, exclude, min_score)[0]


def top_n_rows(
    scores: np.ndarray, n: int, exclude: np.ndarray | None = None, min_score: float = 0.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`top_n` of every row of a [rows, items] matrix (a request ranks several sources' scores
    over the same catalogue). Only a row's entries above `min_score` are partitioned: most
    sources score a few hundred items of a large catalogue."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    keep = s > min_score
    if exclude is not None and len(exclude):
        keep[:, exclude[exclude < s.shape[1]]] = False
    out = []
    for r in range(len(s)):
        idx = np.flatnonzero(keep[r]) if n > 0 else np.empty(0, np.int64)
        vals = s[r, idx]
        if len(idx) > n:
            part = np.argpartition(-vals, n - 1)[:n]
            idx, vals = idx[part], vals[part]
        order = np.argsort(-vals, kind="stable")
        out.append((idx[order].astype(np.int64), vals[order]))
    return out


def gathered_rows(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The column indices and values of the given CSR rows, concatenated in order."""
    take, _ = _row_entries(m, rows)
    return m.indices[take], np.asarray(m.data[take], np.float32)


def _row_entries(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in m.data of the given rows' entries (concatenated), and each row's count."""
    starts = m.indptr[rows]
    counts = m.indptr[rows + 1] - starts
    first = np.cumsum(counts) - counts  # where each row's entries begin in `take`
    return np.arange(counts.sum()) + np.repeat(starts - first, counts), counts


def weighted_rows(m: sp.csr_matrix, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_r weights[r] · m[rows[r], :] as a dense float32 vector: the numbers `m[rows].T @ weights`
    gives (float32, added row by row in order), read from the CSR arrays directly, since scipy's
    row indexing and product cost tens of µs a call and a request makes several."""
    take, counts = _row_entries(m, rows)
    # np.float32 spelled out: a matrix unpickled in another process carries an equal but
    # distinct dtype object, and np.add.at takes a ~20x slower path for it
    values = np.asarray(m.data[take], np.float32) * np.repeat(
        np.asarray(weights, np.float32), counts
    )
    out = np.zeros(m.shape[1], np.float32)
    np.add.at(out, m.indices[take], values)
    return out


def interaction_matrix(
    users: np.ndarray, items: np.ndarray, values: np.ndarray, n_users: int, n_items: int
) -> sp.csr_matrix:
    """users × items CSR, duplicate (user, item) pairs summed."""
    m = sp.coo_matrix(
        (values.astype(np.float32), (users.astype(np.int64), items.astype(np.int64))),
        shape=(n_users, n_items),
    ).tocsr()
    m.sum_duplicates()
    return m


def center_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    """Subtract each row's mean over its stored entries (Pearson's centring over co-rated
    entries); rows without variance are left as they are so implicit data keeps its signal."""
    m = m.tocsr(copy=True).astype(np.float32)
    counts = np.diff(m.indptr)
    row_of = np.repeat(np.arange(m.shape[0]), counts)
    sums = np.bincount(row_of, weights=m.data, minlength=m.shape[0])
    means = np.divide(sums, counts, out=np.zeros(m.shape[0]), where=counts > 0)
    centred = m.data - means[row_of]
    has_var = np.zeros(m.shape[0], bool)
    np.logical_or.at(has_var, row_of, np.abs(centred) > 1e-9)
    m.data = np.where(has_var[row_of], centred, m.data).astype(np.float32)
    return m


def normalize_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.diags(inv.astype(np.float32)) @ m


def save_csr(prefix: str, m: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_data": m.data.astype(np.float32),
        f"{prefix}_indices": m.indices.astype(np.int32),
        f"{prefix}_indptr": m.indptr.astype(np.int64),
        f"{prefix}_shape": np.asarray(m.shape, np.int64),
    }


def load_csr(prefix: str, arrays) -> sp.csr_matrix:
    shape = tuple(int(x) for x in arrays[f"{prefix}_shape"])
    return sp.csr_matrix(
        (arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]),
        shape=shape,
    )
