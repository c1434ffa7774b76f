"""The served pipeline as an evaluation model: `rec` is trained by `rec.train.train` and answers
through `rec.pipeline.Recommender.recommend`, the code every replica runs.

Prequential variants differ only in what happens to an event after it is scored:
rec-static ignores it (frozen at the cut), rec-profile updates the user's profile only,
rec-incremental also updates co-occurrence, trending and the catalogue (everything a replica
does per event), and rec-retrain additionally retrains from the log every `retrain_every` events.
`rec` itself is served as a deployment serves by default: every event applied as it arrives
(the same as rec-incremental; the ablations follow events the same way).
The ablations (rec-ranker, rec-recall, rec-exact) change one thing of the full model.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp

from rec.baselines import Model
from rec.config import RecConfig
from rec.events import event_record
from rec.pipeline import Recommender
from rec.splits import Interactions
from rec.train import snapshot_table, train

VARIANTS = ("full", "static", "profile", "incremental", "retrain")


# Ablations of the full model: "ranker" always orders by the ranker, "recall" by the recall
# order training chose on the held-out validation (the ranker left out), "exact" searches the
# embeddings exactly instead of through HNSW.
ABLATIONS = ("ranker", "recall", "exact")
# The last training of this process: the variants and ablations of one run (same data, same
# config) are the same trained model served differently, so it is trained once; a variant that
# reuses it reports only its serving set-up as fit time.
_LAST_TRAINED: dict = {}


class RecModel(Model):
    def __init__(
        self, variant: str = "full", config: RecConfig | None = None, retrain_every: int = 20_000
    ) -> None:
        if variant not in VARIANTS + ABLATIONS:
            raise ValueError(f"variant must be one of {VARIANTS + ABLATIONS}")
        self.variant = variant
        self.name = "rec" if variant == "full" else f"rec-{variant}"
        self.config = (config or RecConfig()).model_copy(deep=True)
        self.retrain_every = retrain_every
        self.records: list[dict] = []
        self.since_retrain = 0

    def fit(self, data: Interactions) -> RecModel:
        self.data = data
        self.item_index = {item: n for n, item in enumerate(data.item_ids)}
        if not data.ordered:  # file order is not time: hold out a random share, not the "last"
            self.config.train.holdout = "random"
        self.records = [{**r, "offset": n} for n, r in enumerate(data.to_records())]
        self._train()
        return self

    def _train(self) -> None:
        key = (id(self.data), len(self.records), self.config.model_dump_json())
        if _LAST_TRAINED.get("key") != key:  # variants of one run share one training
            _LAST_TRAINED.update(
                key=key,
                bundle=train(
                    snapshot_table(self.records), self.config, version=f"eval-{len(self.records)}"
                ),
            )
        self.bundle = copy.copy(_LAST_TRAINED["bundle"])
        if self.variant == "ranker" and self.bundle.ranker is not None:
            self.bundle.ordering = "ranker"
        elif self.variant == "recall" and "recall_ordering" in self.bundle.metrics:
            self.bundle.ordering = self.bundle.metrics["recall_ordering"]
        index = None
        if self.variant == "exact":  # the same trained model, served through exact search
            index = self.bundle.build_index(
                self.config.recall.model_copy(update={"index": "brute"})
            )
        self.rec = Recommender(self.config, self.bundle, index)
        self.rec.apply(self.records)
        self.since_retrain = 0

    def fit_info(self) -> dict:
        """The served ordering and the training measurements behind it (validation NDCG@20 of
        each ordering and of the graph filter's settings, ranker metrics, train seconds)."""
        return {"ordering": self.bundle.ordering, **self.bundle.metrics}

    def recommend(
        self, users: np.ndarray, k: int, exclude: sp.csr_matrix | None = None
    ) -> np.ndarray:
        """Top-k item indices per user through the serving pipeline (seen items are filtered by
        the profile; `exclude` rows are honoured too)."""
        index = self.item_index
        out = np.full((len(users), k), -1, np.int64)
        for row, u in enumerate(np.asarray(users).tolist()):
            extra = frozenset()
            if exclude is not None:
                extra = frozenset(self.data.item_ids[i] for i in exclude[u].indices)
            answer = self.rec.recommend(self.data.user_ids[u], k, exclude=extra)
            picked = [index[i["item_id"]] for i in answer["items"] if i["item_id"] in index]
            out[row, : len(picked)] = picked[:k]
        return out

    def observe(self, user: int, item: int, ts: float) -> None:
        if self.variant == "static":
            return
        record = event_record(
            user_id=self.data.user_ids[user], item_id=self.data.item_ids[item], type="click", ts=ts
        )
        record["offset"] = len(self.records)
        self.records.append(record)
        self.rec.apply([record], learn=self.variant != "profile")
        self.since_retrain += 1
        if self.variant == "retrain" and self.since_retrain >= self.retrain_every:
            self._train()
