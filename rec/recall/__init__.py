"""Recall sources: each turns a profile into scored candidates under its own name.

Every source has `name`, `recall(...)` (top candidates) and `score(...)` (its score for given
items, used as a ranker feature so that training and serving see the same numbers).
"""

from rec.recall.base import Candidates, interaction_matrix, top_n
from rec.recall.embedding import Embeddings
from rec.recall.itemcf import Cooccurrence, ItemCF
from rec.recall.popular import Trending
from rec.recall.usercf import UserCF

__all__ = [
    "Candidates",
    "Cooccurrence",
    "Embeddings",
    "ItemCF",
    "Trending",
    "UserCF",
    "interaction_matrix",
    "top_n",
]
