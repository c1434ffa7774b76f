"""Ranking: candidates and a profile view turned into the ranker's feature arrays, and the
orderings that score them (the torch ranker, or one of the recall orders training may pick).

Training builds its examples with the same `FeatureBuilder` the recall stage serves with, so
the ranker learns on the numbers it is served."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from rec.arrays import gathered
from rec.catalog import NO_CODE
from rec.profile import ProfileView
from rec.ranker import Ranker
from rec.recall.registry import MODELS
from rec.recall.stage import SCORED, CandidateSet, Recall

DENSE_FEATURES = (
    *(f"s_{name}" for name in SCORED),
    *(f"r_{name}" for name in SCORED),  # the same scores relative to the request's best
    "last_sim",  # similarity to the user's latest positive item (item-CF + live co-occurrence)
    "log_pop",
    "log_trend",
    "log_age_days",
    "cat_affinity",
    "tag_affinity",
    "last_cat_match",
    "log_user_events",
    "hour_sin",
    "hour_cos",
)
FEATURE_COLUMN = {name: j for j, name in enumerate(DENSE_FEATURES)}
# The "blend" ordering sums the whole-catalogue models' scores. Item-CF's and user-CF's sparse
# neighbourhood scores (zero for most candidates, a few outliers setting the scale) are what EASE
# and the graph filter generalise; adding them cost 9% NDCG@10 on Diginetica.
BLENDED = (*(name for name, m in MODELS.items() if m.blended), "ann")
# ways to order the final list; training picks one
ORDERINGS = ("ranker", *(name for name, m in MODELS.items() if m.orderable), "ann", "blend")


@dataclass(frozen=True)
class RankInputs:
    """What the ranker reads of one request's candidates: per candidate the model's item index
    (n_items: unknown), item vector and dense features, and the user's one vector."""

    item_idx: np.ndarray  # [n]
    user_vec: np.ndarray  # [d]
    item_vec: np.ndarray  # [n, d]
    dense: np.ndarray  # [n, len(DENSE_FEATURES)]

    def __len__(self) -> int:
        return len(self.item_idx)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The given candidates as `Ranker.predict`'s per-row arrays (training examples)."""
        return (
            self.item_idx[rows],
            np.broadcast_to(self.user_vec, (len(rows), len(self.user_vec))),
            self.item_vec[rows],
            self.dense[rows],
        )


class FeatureBuilder:
    """Features of one recall stage's candidates, read from its catalogue, item counts and
    vectors."""

    def __init__(self, recall: Recall) -> None:
        self.recall = recall

    def recall_features(self, cands: CandidateSet, idx: np.ndarray | None = None) -> np.ndarray:
        """The features a recall order reads: each source's score, raw and relative to the
        request's best candidate, and popularity (the rest of the row is zero). `idx`: the
        candidates' catalogue indices, when the caller has them."""
        n = len(cands)
        f = np.zeros((n, len(DENSE_FEATURES)), np.float32)
        if n == 0:
            return f
        f[:, : len(SCORED)] = cands.scores
        top = np.abs(cands.scores).max(axis=0)
        f[:, len(SCORED) : 2 * len(SCORED)] = cands.scores / np.where(top > 0, top, 1.0)
        if idx is None:
            idx = self.recall.candidate_positions(cands)
        stats = self.recall.state.stats
        f[:, FEATURE_COLUMN["log_pop"]] = np.log1p(gathered(stats.pop_counts, idx, 0, np.float32))
        return f

    def dense(
        self, view: ProfileView, cands: CandidateSet, context: dict | None = None
    ) -> np.ndarray:
        """Dense ranker features of each candidate (names in DENSE_FEATURES)."""
        return self._dense(view, cands, self.recall.candidate_positions(cands), context)

    def _dense(
        self, view: ProfileView, cands: CandidateSet, idx: np.ndarray, context: dict | None
    ) -> np.ndarray:
        f = self.recall_features(cands, idx)
        if len(cands) == 0:
            return f
        col = FEATURE_COLUMN
        catalog, trend = self.recall.state.catalog, self.recall.state.stats.trend
        if cands.last_sim is not None:
            f[:, col["last_sim"]] = cands.last_sim
        now = trend.latest or view.last_ts or time.time()
        cat_total = sum(v for v in view.tags.values() if v > 0) or 1.0
        last_cat = catalog.code(catalog.category(view.recent[-1][0]) if view.recent else None)
        f[:, col["log_trend"]] = np.log1p(gathered(trend.vector(catalog), idx, 0, np.float32))
        f[:, col["cat_affinity"]] = catalog.category_weights(idx, view.tags) / cat_total
        codes = catalog.category_codes(idx)
        f[:, col["last_cat_match"]] = (codes == last_cat) & (codes != NO_CODE)
        f[:, col["tag_affinity"]] = catalog.tag_weights(idx, view.tags) / cat_total
        first_ts = catalog.first_seen(idx)
        age = np.log1p(np.maximum(now - first_ts, 0.0) / 86400.0)
        f[:, col["log_age_days"]] = np.where(np.isnan(first_ts), 0.0, age)
        f[:, col["log_user_events"]] = math.log1p(view.n_events)
        hour = _hour(context, now)
        f[:, col["hour_sin"]] = math.sin(2 * math.pi * hour / 24)
        f[:, col["hour_cos"]] = math.cos(2 * math.pi * hour / 24)
        return f

    def rank_inputs(
        self, view: ProfileView, cands: CandidateSet, context: dict | None
    ) -> RankInputs:
        recall = self.recall
        idx = recall.candidate_positions(cands)
        dense = self._dense(view, cands, idx, context)
        vecs = recall.item_vecs
        dim = vecs.shape[1]
        known = (idx >= 0) & (idx < len(vecs))
        item_vec = np.zeros((len(idx), dim), np.float32)
        item_vec[known] = vecs[idx[known]]
        user = cands.user_vec if cands.user_vec is not None else np.zeros(dim, np.float32)
        n_model = recall.model.n_items if recall.model else 0
        return RankInputs(
            np.where(known & (idx < n_model), idx, n_model),
            user.astype(np.float32),
            item_vec,
            dense,
        )


def rank_probabilities(ranker: Ranker, inputs: list[RankInputs]) -> list[np.ndarray]:
    """The ranker's probability of every candidate of each request, in one model call."""
    sizes = [len(x.item_idx) for x in inputs]
    if sum(sizes) == 0:
        return [np.zeros(0, np.float32) for _ in inputs]
    probs = ranker.predict_requests(
        np.stack([x.user_vec for x in inputs]),
        sizes,
        *(
            np.concatenate(column)
            for column in zip(*((x.item_idx, x.item_vec, x.dense) for x in inputs), strict=True)
        ),
    )
    return np.split(probs, np.cumsum(sizes)[:-1])


def recall_order(dense: np.ndarray, ordering: str) -> np.ndarray:
    """Scores in (0, 1) from recall scores alone: one source's ('gf', 'ease', 'ann'), or a sum of
    scores, each scaled to its maximum within the request: of the BLENDED models ('blend'), or,
    before any model exists, of every source, live co-occurrence included ('live')."""
    col = FEATURE_COLUMN
    if ordering in SCORED:
        s = dense[:, col[f"s_{ordering}"]]
    else:
        names = SCORED if ordering == "live" else BLENDED
        parts = [dense[:, col[f"s_{name}"]] for name in names]
        s = sum(p / (np.abs(p).max() or 1.0) for p in parts) + 0.01 * dense[:, col["log_pop"]]
    s = s - (s.max() if len(s) else 0.0)
    return (1.0 / (1.0 + np.exp(-s))).astype(np.float32)


def _hour(context: dict | None, now: float) -> float:
    if context and isinstance(context.get("hour"), int | float):
        return float(context["hour"]) % 24
    return (now % 86400) / 3600.0
