"""The item catalogue: string ids to dense indices, metadata, deletions.

Indices start with the current model's item order (so model arrays line up) and grow as new
items appear in the log; a model swap re-bases them on the new model's order.

The metadata the ranker reads per candidate (category, tags, first-seen time) is also kept in
arrays by index, so a request gathers it for all its candidates at once; `ensure`, `upsert`,
`set_category` and `rebase` are the only writers of metadata and keep both in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

NO_CODE = -1  # the category code of an item without a category
NO_TAGS = np.zeros(0, np.int64)  # the tag codes of an item without tags (shared, read-only)
NO_TAGS.flags.writeable = False


@dataclass
class ItemMeta:
    category: str | None = None
    tags: tuple[str, ...] = ()
    title: str | None = None
    first_ts: float | None = None


@dataclass
class Catalog:
    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    meta: dict[str, ItemMeta] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    # Per index: category code, tag codes and first-seen time (NaN: unknown). One vocabulary
    # codes categories and tags alike (a profile's interest tags hold both).
    _codes: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _category: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False,
                                  compare=False)
    _tags: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)
    _first_ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64), repr=False,
                                  compare=False)

    @classmethod
    def from_ids(cls, ids: list[str]) -> Catalog:
        cat = cls()
        for item_id in ids:
            cat.ensure(item_id)
        return cat

    def __len__(self) -> int:
        return len(self.ids)

    def ensure(self, item_id: str, ts: float | None = None) -> int:
        """The item's index, adding it when new."""
        idx = self.index.get(item_id)
        changed = idx is None
        if idx is None:
            idx = len(self.ids)
            self.ids.append(item_id)
            self.index[item_id] = idx
        meta = self.meta.get(item_id)
        if meta is None:
            self.meta[item_id] = ItemMeta(first_ts=ts)
            changed = True
        elif meta.first_ts is None and ts is not None:
            meta.first_ts = ts
            changed = True
        if changed:
            self._store(idx)
        return idx

    def upsert(self, item_id: str, category: str | None, tags: list[str], title: str | None,
               ts: float) -> int:
        idx = self.ensure(item_id, ts)
        meta = self.meta[item_id]
        meta.category, meta.tags, meta.title = category, tuple(tags), title
        self._store(idx)
        self.deleted.discard(item_id)
        return idx

    def set_category(self, item_id: str, category: str | None) -> None:
        """Change an item's category (e.g. the model's, for an item posted without one)."""
        self.meta[item_id].category = category
        self._store(self.index[item_id])

    def delete(self, item_id: str) -> int | None:
        self.deleted.add(item_id)
        return self.index.get(item_id)

    def category(self, item_id: str) -> str | None:
        meta = self.meta.get(item_id)
        return meta.category if meta else None

    def rebase(self, model_ids: list[str]) -> Catalog:
        """A catalogue indexed in `model_ids` order, keeping metadata and deletions."""
        cat = Catalog.from_ids(model_ids)
        for item_id in self.ids:
            cat.ensure(item_id)
        cat.meta = {**{i: ItemMeta() for i in cat.ids}, **self.meta}
        for idx in range(len(cat)):
            cat._store(idx)
        cat.deleted = set(self.deleted)
        return cat

    # ---- metadata of many items at once (catalogue indices; -1 for an item not in it) ---------

    def first_seen(self, idx: np.ndarray) -> np.ndarray:
        """Each item's first-seen time (NaN when unknown), float64."""
        out = np.full(len(idx), np.nan)
        known = idx >= 0
        out[known] = self._first_ts[idx[known]]
        return out

    def category_codes(self, idx: np.ndarray) -> np.ndarray:
        """Each item's category code (NO_CODE: no category, or not in the catalogue)."""
        out = np.full(len(idx), NO_CODE, np.int64)
        known = idx >= 0
        out[known] = self._category[idx[known]]
        return out

    def code(self, name: str | None) -> int:
        """The code of a category or tag name (NO_CODE for None or a name no item carries)."""
        return NO_CODE if name is None else self._codes.get(name, NO_CODE)

    def category_weights(self, idx: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        """`weights[category]` of each item (0 without a category or weight), float64."""
        return self._weights_of(self.category_codes(idx), weights)

    def tag_weights(self, idx: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        """Σ `weights[t]` over each item's tags (0 without tags), float64."""
        tags = [self._tags[i] if i >= 0 else NO_TAGS for i in idx.tolist()]
        counts = np.fromiter(map(len, tags), np.int64, len(tags))
        if not counts.sum():
            return np.zeros(len(idx))
        rows = np.repeat(np.arange(len(idx)), counts)
        values = self._weights_of(np.concatenate(tags), weights)
        return np.bincount(rows, values, minlength=len(idx))  # in tag order, as sum() would

    def _weights_of(self, codes: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        """`weights[name]` of each code, 0 for NO_CODE and for names without a weight."""
        known = sorted((self._codes[name], w) for name, w in weights.items() if name in self._codes)
        out = np.zeros(len(codes))
        if known:
            keys = np.asarray([c for c, _ in known], np.int64)
            values = np.asarray([w for _, w in known], np.float64)
            pos = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
            hit = keys[pos] == codes
            out[hit] = values[pos[hit]]
        return out

    def _tags_of(self, names) -> np.ndarray:
        return np.asarray([self._codes.setdefault(t, len(self._codes)) for t in names], np.int64)

    def _store(self, idx: int) -> None:
        """Copy item idx's metadata into the per-index arrays (growing them for a new index)."""
        if idx >= len(self._category):
            size = max(idx + 1, 2 * len(self._category), 64)
            self._category = np.concatenate(
                [self._category, np.full(size - len(self._category), NO_CODE, np.int64)])
            self._first_ts = np.concatenate(
                [self._first_ts, np.full(size - len(self._first_ts), np.nan)])
        while len(self._tags) <= idx:
            self._tags.append(NO_TAGS)
        meta = self.meta[self.ids[idx]]
        self._category[idx] = NO_CODE if meta.category is None else self._tags_of([meta.category])[0]
        self._tags[idx] = self._tags_of(meta.tags)
        self._first_ts[idx] = np.nan if meta.first_ts is None else meta.first_ts
