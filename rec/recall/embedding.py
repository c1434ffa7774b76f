"""Learned embeddings by a closed-form factorisation (truncated SVD of the degree-normalised
interaction matrix, as in PureSVD / GF-CF's low-pass filter).

With X̃ = X D^-1/2 = U S Vᵀ, a user with items x gets scores x̃ V Vᵀ D^1/2: the user vector is
Σ_j q_j over the user's items (fold-in, one add per event) with q_j = d_j^-1/2 v_j, and item
vectors p_i = d_i^1/2 v_i go into the ANN index (inner product)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from rec.recall.base import ScoreSource


class Embeddings(ScoreSource):
    name = "ann"

    def __init__(self, query: np.ndarray, item: np.ndarray) -> None:
        self.query = np.ascontiguousarray(query, np.float32)  # fold-in rows q_j
        self.item = np.ascontiguousarray(item, np.float32)  # index rows p_i

    @classmethod
    def fit(cls, x: sp.csr_matrix, dim: int, seed: int = 0) -> Embeddings:
        xb = x.copy().astype(np.float32)
        xb.data = (xb.data > 0).astype(np.float32)
        xb.eliminate_zeros()
        deg = np.asarray(xb.sum(axis=0)).ravel()
        inv_sqrt = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
        xn = (xb @ sp.diags(inv_sqrt)).astype(np.float64)
        k = max(1, min(dim, min(xn.shape) - 1))
        rng = np.random.default_rng(seed)
        v0 = rng.standard_normal(min(xn.shape))
        _, s, vt = svds(xn, k=k, v0=v0, random_state=seed)
        order = np.argsort(-s)
        v = vt[order].T  # items × k
        if k < dim:
            v = np.pad(v, ((0, 0), (0, dim - k)))
        return cls(v * inv_sqrt[:, None], v * np.sqrt(deg)[:, None])

    @property
    def n_items(self) -> int:
        return self.item.shape[0]

    @property
    def dim(self) -> int:
        return self.item.shape[1]

    def query_vector(self, i: int) -> np.ndarray | None:
        return self.query[i] if 0 <= i < self.n_items else None

    def fold_in(self, idx: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """The user vector of a history: Σ c(w_j) q_j (c = 1 for liked, -0.5 for disliked)."""
        known = (idx >= 0) & (idx < self.n_items) & (weights != 0)
        if not known.any():
            return None
        c = np.where(weights[known] > 0, 1.0, -0.5).astype(np.float32)
        return c @ self.query[idx[known]]

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        """Exact u · p_i over every item (the ANN index answers the same top items faster)."""
        out = np.zeros(n_total, np.float32)
        user = self.fold_in(idx, weights)
        if user is not None:
            out[: self.n_items] = self.item @ user
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"emb_query": self.query, "emb_item": self.item}

    @classmethod
    def from_arrays(cls, arrays) -> Embeddings:
        return cls(arrays["emb_query"], arrays["emb_item"])
