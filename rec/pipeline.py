"""The serving pipeline composed in one object: live state (`rec.state`) → profile view →
recall (`rec.recall.stage`) → features and scores (`rec.features`) → finalize (`rec.finalize`).

The fused topology, offline evaluation and training's replay run it whole; a stage of the split
topology builds only its part (`profiles=False` for recall, `recall=False` for profiles), so
each holds its state once. `Recalled` is what the recall stage hands on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rec.config import RecConfig
from rec.features import FeatureBuilder, RankInputs, rank_probabilities, recall_order
from rec.filters import NO_FILTERS, Filters
from rec.finalize import finalize
from rec.index import Index
from rec.model import ModelBundle
from rec.profile import ProfileView
from rec.recall.stage import CandidateSet, Recall
from rec.state import LiveState


@dataclass(frozen=True)
class Recalled:
    """The recall stage's answer to one request: its candidates and either the ranker's inputs
    (the ranker is served) or the final scores (a recall order is), made by model `version`."""

    cands: CandidateSet
    version: str | None
    inputs: RankInputs | None = None
    scores: np.ndarray | None = None
    ordering: str = "ranker"  # what orders the list (Recommender.ordering)


class Recommender:
    def __init__(
        self,
        config: RecConfig,
        model: ModelBundle | None = None,
        index: Index | None = None,
        *,
        profiles: bool = True,
        recall: bool = True,
        state: LiveState | None = None,
    ) -> None:
        """state: where the live state starts (a checkpoint's, `rec.checkpoint.load`, with the
        same parts); None: empty, at log offset 0."""
        self.config = config
        self.state = state if state is not None else LiveState(config, profiles, recall)
        self.recaller = Recall(config, self.state, model, index) if recall else None
        self.builder = FeatureBuilder(self.recaller) if recall else None

    # ---- live state -------------------------------------------------------------------------

    @property
    def model(self) -> ModelBundle | None:
        return self.recaller.model if self.recaller else None

    @property
    def version(self) -> str | None:
        return self.model.version if self.model else None

    @property
    def index(self) -> Index | None:
        return self.recaller.index if self.recaller else None

    @property
    def catalog(self):
        return self.state.catalog

    @property
    def profiles(self):
        return self.state.profiles

    @property
    def offset(self) -> int:
        return self.state.offset

    def apply(self, records: list[dict], learn: bool = True, in_model: bool = False) -> None:
        self.state.apply(records, learn, in_model)

    # ---- the stages --------------------------------------------------------------------------

    def view(self, user_id: str) -> ProfileView:
        return self.state.profiles.view(user_id)

    def recall(
        self,
        view: ProfileView,
        ann: tuple[np.ndarray, np.ndarray] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> CandidateSet:
        return self.recaller.recall(view, ann, filters)

    @property
    def ordering(self) -> str:
        """How this version orders the final list: the ranker, or a recall order (training
        chooses; 'live' before any model, 'blend' for a model without a ranker)."""
        model = self.model
        if model is None:
            return "live"
        if model.ordering == "ranker" and model.ranker is None:
            return "blend"
        return model.ordering

    def recalled(
        self,
        view: ProfileView,
        context: dict | None = None,
        ann: tuple[np.ndarray, np.ndarray] | None = None,
        rank: bool = False,
        filters: Filters = NO_FILTERS,
    ) -> Recalled:
        """Recall, with what ranking needs: the recall order's scores, or the ranker's inputs
        (rank=True: the ranker's scores, in this process and this version)."""
        cands = self.recall(view, ann, filters)
        ordering = self.ordering
        if ordering != "ranker":
            scores = self._recall_order(cands, ordering)
            return Recalled(cands, self.version, scores=scores, ordering=ordering)
        inputs = self.rank_inputs(view, cands, context)
        if rank:
            scores = rank_probabilities(self.model.ranker, [inputs])[0]
            return Recalled(cands, self.version, scores=scores)
        return Recalled(cands, self.version, inputs=inputs)

    def features(
        self, view: ProfileView, cands: CandidateSet, context: dict | None = None
    ) -> np.ndarray:
        return self.builder.dense(view, cands, context)

    def rank_inputs(
        self, view: ProfileView, cands: CandidateSet, context: dict | None
    ) -> RankInputs:
        return self.builder.rank_inputs(view, cands, context)

    def rank(
        self, view: ProfileView, cands: CandidateSet, context: dict | None = None
    ) -> np.ndarray:
        """Calibrated relevance probability per candidate (a recall-score order before the
        first ranker exists)."""
        return self.rank_many([(view, cands, context)])[0]

    def rank_many(
        self, requests: list[tuple[ProfileView, CandidateSet, dict | None]]
    ) -> list[np.ndarray]:
        """Score several requests' candidates, the ranker's in one model call."""
        ordering = self.ordering
        if ordering != "ranker":
            return [self._recall_order(cands, ordering) for _, cands, _ in requests]
        return rank_probabilities(self.model.ranker, [self.rank_inputs(*req) for req in requests])

    def _recall_order(self, cands: CandidateSet, ordering: str) -> np.ndarray:
        return recall_order(self.builder.recall_features(cands), ordering)

    def finalize(
        self,
        view: ProfileView,
        cands: CandidateSet,
        scores: np.ndarray,
        k: int,
        exclude: frozenset[str] = frozenset(),
        request_id: str | None = None,
        filters: Filters = NO_FILTERS,
    ) -> dict:
        return finalize(
            self.config.aggregate,
            view,
            cands,
            scores,
            k,
            exclude,
            self.version,
            request_id,
            filters,
        )

    # ---- one process, whole pipeline -------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        k: int | None = None,
        *,
        exclude: frozenset[str] = frozenset(),
        context: dict | None = None,
        request_id: str | None = None,
        filters: Filters = NO_FILTERS,
    ) -> dict:
        k = k or self.config.aggregate.default_k
        view = self.view(user_id)
        out = self.recalled(view, context, rank=True, filters=filters)
        return self.finalize(view, out.cands, out.scores, k, exclude, request_id, filters)

    def similar(self, item_id: str, k: int = 10) -> list[dict] | None:
        return self.recaller.similar(item_id, k)

    def item_info(self, item_id: str) -> dict | None:
        return self.recaller.item_info(item_id)
