"""The trained recall models by name. A new model is its own module (a `RecallModel`) and one
entry here; training fits every entry, a model version saves and loads them, and serving scores
each one per request, with its scores as ranker features, in this order."""

from __future__ import annotations

from rec.recall.base import RecallModel
from rec.recall.ease import EASE
from rec.recall.graph_filter import GraphFilter
from rec.recall.itemcf import ItemCF
from rec.recall.usercf import UserCF

MODELS: dict[str, type[RecallModel]] = {m.name: m for m in (ItemCF, UserCF, GraphFilter, EASE)}
