"""The last stage: scored candidates into the answer. Order by score, drop what the user has
seen or excluded, cap items per category, keep exploration slots for fresh items and explain
each item by the source that recalled it. It reads only the candidate set and the profile view,
so the ingress runs it without the catalogue or any model."""

from __future__ import annotations

import uuid

import numpy as np

from rec.config import AggregateConfig
from rec.filters import NO_FILTERS, Filters
from rec.profile import ProfileView
from rec.recall.registry import MODELS
from rec.recall.stage import CandidateSet


def finalize(
    config: AggregateConfig,
    view: ProfileView,
    cands: CandidateSet,
    scores: np.ndarray,
    k: int,
    exclude: frozenset[str] = frozenset(),
    version: str | None = None,
    request_id: str | None = None,
    filters: Filters = NO_FILTERS,
) -> dict:
    """The answer: at most k items, best first, the exploration slots last."""
    blocked = filters.blocked(view.seen) | exclude
    order = [
        r
        for r in np.argsort(-np.asarray(scores), kind="stable").tolist()
        if cands.item_ids[r] not in blocked
        and (not filters.narrows or filters.allows(cands.categories[r]))
    ]
    n_explore = min(int(round(k * config.explore_fraction)), k) if view.known else 0
    per_cat: dict[str | None, int] = {}
    cap = config.max_per_category
    if cap is not None and filters.categories:  # narrowed to n categories: k/n of each fits
        cap = max(cap, -(-k // len(filters.categories)))

    def fits(row: int) -> bool:  # the diversity rule, counted over the whole list
        cat = cands.categories[row]
        if cap is None or cat is None:
            return True
        if per_cat.get(cat, 0) >= cap:
            return False
        per_cat[cat] = per_cat.get(cat, 0) + 1
        return True

    explore: list[int] = []
    for row in (r for r in order if "new" in cands.sources[r]):
        if len(explore) >= n_explore:
            break
        if fits(row):
            explore.append(row)
    rows: list[int] = []
    for row in order:
        if len(rows) >= k - len(explore):
            break
        if row not in explore and fits(row):
            rows.append(row)
    items = [
        {
            "item_id": cands.item_ids[row],
            "score": round(float(scores[row]), 6),
            "sources": list(cands.sources[row]),
            "reason": reason(cands.sources[row], cands.categories[row], cands.anchor(row)),
        }
        for row in rows + explore
    ]
    return {
        "user_id": view.user_id,
        "items": items,
        "model_version": version,
        "request_id": request_id or uuid.uuid4().hex,
    }


def reason(sources: tuple[str, ...], category: str | None, anchor: str | None) -> str:
    """Why an item is shown, from the first of its sources (in registry order) that says:
    fresh items first, then the trained models (naming the history item behind the candidate
    when there is one), the embedding match, trending last."""
    if "new" in sources:
        return f"new in {category}" if category else "new arrival"
    for name in sources:
        model = MODELS.get(name)
        if model is not None:
            if anchor is not None and model.anchored_reason:
                return model.anchored_reason.format(anchor=anchor)
            return model.reason
    if "ann" in sources:
        return f"matches your taste for {category}" if category else "matches your taste"
    return "trending now"
