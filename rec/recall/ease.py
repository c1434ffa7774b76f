"""EASE (Steck, WWW 2019): the closed-form item-item linear model B = argmin ‖X - XB‖² + λ‖B‖²
with diag(B) = 0, i.e. B = I - P diagMat(1 / diag(P)) for P = (XᵀX + λI)⁻¹. A user's scores are
the sum of B's rows over the items they liked, recomputed from the live history per request.

B is dense items × items, so it is fitted only for catalogues up to `RecallConfig.ease_max_items`
(20k items: 1.6 GB as float32); above that the graph filter covers the same ground."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from rec.recall.base import RecallModel, RecallQuery, TrainingData


def ease_weights(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """B (items × items, float32, zero diagonal) of the binary interactions x (users × items).
    P comes from a Cholesky factorisation (XᵀX + λI is symmetric positive definite): half the
    work of a general inverse. torch's LAPACK does it: the OpenBLAS in numpy's and scipy's
    wheels crashes in potrf on matrices of 16k × 16k and more (measured here)."""
    xb = x.astype(np.float64).tocsr(copy=True)
    xb.data = (xb.data > 0).astype(np.float64)
    xb.eliminate_zeros()
    n = xb.shape[1]
    gram = torch.from_numpy(np.asarray((xb.T @ xb).toarray(), np.float64))
    gram.diagonal().add_(l2)
    chol, info = torch.linalg.cholesky_ex(gram)
    del gram
    if int(info) != 0:
        raise ValueError(f"EASE: XᵀX + λI is not positive definite (LAPACK info {int(info)})")
    p = torch.cholesky_inverse(chol).numpy()
    del chol
    p /= -np.diag(p).copy()[None, :]
    p[np.diag_indices(n)] = 0.0
    return p.astype(np.float32)


class EASE(RecallModel):
    name = "ease"
    orderable = True
    blended = True
    reason = "liked by people who like what you like"
    anchored_reason = "because you liked {anchor}"

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = np.ascontiguousarray(weights, np.float32)  # B: items × items

    @classmethod
    def fit(cls, x: sp.csr_matrix, l2: float = 500.0) -> EASE:
        return cls(ease_weights(x, l2))

    @classmethod
    def from_training(cls, data: TrainingData) -> EASE | None:
        if data.positive.shape[1] > data.config.ease_max_items:
            return None  # B would not fit: the graph filter covers the same ground
        return cls.fit(data.positive, data.config.ease_l2)

    def query_scores(self, q: RecallQuery, n_total: int) -> np.ndarray:
        return self.scores(q.liked, np.ones(len(q.liked), np.float32), n_total)

    @property
    def n_items(self) -> int:
        return self.weights.shape[0]

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        """Σ B[i] over the liked items i (EASE reads a binary history)."""
        out = np.zeros(n_total, np.float32)
        liked = np.unique(idx[(weights > 0) & (idx >= 0) & (idx < self.n_items)])
        if len(liked):
            out[: self.n_items] = self.weights[liked].sum(axis=0)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"ease_weights": self.weights}

    @classmethod
    def load(cls, arrays) -> EASE | None:
        return cls(arrays["ease_weights"]) if "ease_weights" in arrays else None
