"""Recall sources: each turns a profile into scored candidates under its own name.

History-based sources (item-CF, user-CF, graph filter, EASE, embeddings) share `ScoreSource`: `scores(...)` over
every item, `recall(...)` for its named top candidates; the ranker reads the same scores as
features, so training and serving see the same numbers. Trending is counted per event.
"""

from rec.recall.base import Candidates, ScoreSource, interaction_matrix, top_n, top_n_rows
from rec.recall.ease import EASE, ease_weights
from rec.recall.embedding import Embeddings, als_factors
from rec.recall.graph_filter import GraphFilter
from rec.recall.itemcf import Cooccurrence, ItemCF
from rec.recall.popular import Trending
from rec.recall.usercf import UserCF

__all__ = [
    "Candidates",
    "Cooccurrence",
    "EASE",
    "Embeddings",
    "GraphFilter",
    "ScoreSource",
    "ItemCF",
    "Trending",
    "UserCF",
    "als_factors",
    "ease_weights",
    "interaction_matrix",
    "top_n",
    "top_n_rows",
]
