"""User-based collaborative filtering against the training snapshot's users: the live profile
is the query, so a user's newest items change their neighbours at once."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

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


class UserCF(RecallModel):
    name = "usercf"
    reason = "popular with users like you"

    def __init__(self, users: sp.csr_matrix, similarity: str, k: int) -> None:
        self.users = users.tocsr()  # users × items, rows normalised (and centred for Pearson)
        self.by_item = self.users.T.tocsr()  # items × users
        self.similarity = similarity
        self.k = k

    @classmethod
    def fit(cls, x: sp.csr_matrix, similarity: str = "cosine", k: int = 50) -> UserCF:
        m = center_rows(x) if similarity == "pearson" else x.astype(np.float32)
        return cls(normalize_rows(m).tocsr(), similarity, k)

    @classmethod
    def from_training(cls, data: TrainingData) -> UserCF:
        return cls.fit(data.cf, data.config.similarity, data.config.usercf_neighbors)

    def query_scores(self, q: RecallQuery, n_total: int) -> np.ndarray:
        return self.scores(q.history, q.history_weights, n_total)

    @property
    def n_items(self) -> int:
        return self.users.shape[1]

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        """Neighbour-weighted item scores for a user who touched items `idx` with `weights`."""
        out = np.zeros(n_total, np.float32)
        known = idx < self.n_items
        if not known.any():
            return out
        idx, w = idx[known], weights[known].astype(np.float32)
        if self.similarity == "pearson" and np.ptp(w) > 1e-9:
            w = w - w.mean()
        norm = float(np.linalg.norm(w))
        if norm == 0:
            return out
        sims = weighted_rows(self.by_item, idx, w / norm)
        k = min(self.k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[sims[top] > 0]
        if len(top) == 0:
            return out
        out[: self.n_items] = weighted_rows(self.users, top, sims[top])
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            **save_csr("usercf", self.users),
            "usercf_k": np.asarray(self.k),
            "usercf_similarity": np.asarray(self.similarity),
        }

    @classmethod
    def load(cls, arrays) -> UserCF | None:
        if "usercf_shape" not in arrays:
            return None
        return cls(
            load_csr("usercf", arrays), str(arrays["usercf_similarity"]), int(arrays["usercf_k"])
        )
