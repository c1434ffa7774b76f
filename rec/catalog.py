"""The item catalogue: string ids to dense indices, metadata, deletions.

Indices start with the current model's item order (so model arrays line up) and grow as new
items appear in the log; a model swap re-bases them on the new model's order.

The metadata the ranker reads per candidate (category, tags, first-seen time) is also kept in
arrays by index, so a request gathers it for all its candidates at once; `ensure`, `upsert`,
`set_category` and `rebase` are the only writers of metadata and keep both in step.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from rec.arrays import gathered, grown, padded

NO_CODE = -1  # the category code of an item without a category


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
    # Names this catalogue's index space: indices never change within one catalogue (they only
    # grow), and a rebase makes a new catalogue with a new token.
    token: int = field(default_factory=lambda: secrets.randbits(62), repr=False, compare=False)
    # Per index: category code, tag codes (a row padded with NO_CODE, as wide as the most
    # tags an item has) and first-seen time (NaN: unknown). One vocabulary codes categories and
    # tags alike (a profile's interest tags hold both).
    _codes: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _names: list[str] = field(default_factory=list, repr=False, compare=False)  # by code
    _category: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False
    )
    _tags: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 0), np.int64), repr=False, compare=False
    )
    _first_ts: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.float64), repr=False, compare=False
    )
    _category_names: frozenset[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_ids(cls, ids: list[str]) -> Catalog:
        cat = cls()
        for item_id in ids:
            cat.ensure(item_id)
        return cat

    @classmethod
    def restored(cls, ids: list[str], meta: dict[str, ItemMeta], deleted: set[str]) -> Catalog:
        """A catalogue as saved: ids in index order, their metadata and the deleted ones."""
        cat = cls(ids=list(ids), index={i: n for n, i in enumerate(ids)}, meta=meta)
        cat.deleted = set(deleted)
        for idx in range(len(ids)):
            cat._store(idx)
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

    def upsert(
        self, item_id: str, category: str | None, tags: list[str], title: str | None, ts: float
    ) -> int:
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
        return gathered(self._first_ts, idx, np.nan)

    def category_codes(self, idx: np.ndarray) -> np.ndarray:
        """Each item's category code (NO_CODE: no category, or not in the catalogue)."""
        return gathered(self._category, idx, NO_CODE, np.int64)

    def categories(self, idx: np.ndarray) -> list[str | None]:
        """Each item's category name (None: no category, or not in the catalogue)."""
        names = self._names
        return [None if c == NO_CODE else names[c] for c in self.category_codes(idx).tolist()]

    def category_names(self) -> frozenset[str]:
        """The categories items of this catalogue carry (deleted ones included)."""
        if self._category_names is None:
            used = np.unique(self._category[self._category != NO_CODE]).tolist()
            self._category_names = frozenset(self._names[c] for c in used)
        return self._category_names

    def code(self, name: str | None) -> int:
        """The code of a category or tag name (NO_CODE for None or a name no item carries)."""
        return NO_CODE if name is None else self._codes.get(name, NO_CODE)

    def category_weights(self, idx: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        """`weights[category]` of each item (0 without a category or weight), float64."""
        return self._weights_of(self.category_codes(idx), weights)

    def tag_weights(self, idx: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        """Σ `weights[t]` over each item's tags (0 without tags), float64."""
        codes = np.full((len(idx), self._tags.shape[1]), NO_CODE, np.int64)
        known = idx >= 0
        codes[known] = self._tags[idx[known]]
        return self._weights_of(codes.ravel(), weights).reshape(codes.shape).sum(axis=1)

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
        codes = []
        for name in names:
            code = self._codes.get(name)
            if code is None:
                code = self._codes[name] = len(self._names)
                self._names.append(name)
            codes.append(code)
        return np.asarray(codes, np.int64)

    def _store(self, idx: int) -> None:
        """Copy item idx's metadata into the per-index arrays (growing them for a new index)."""
        meta = self.meta[self.ids[idx]]
        self._category_names = None
        self._category = grown(self._category, idx + 1, NO_CODE)
        self._first_ts = grown(self._first_ts, idx + 1, np.nan)
        self._tags = grown(self._tags, idx + 1, NO_CODE)
        if len(meta.tags) > self._tags.shape[1]:
            self._tags = padded(self._tags, (len(self._tags), len(meta.tags)), NO_CODE)
        self._category[idx] = (
            NO_CODE if meta.category is None else self._tags_of([meta.category])[0]
        )
        self._tags[idx] = NO_CODE
        self._tags[idx, : len(meta.tags)] = self._tags_of(meta.tags)
        self._first_ts[idx] = np.nan if meta.first_ts is None else meta.first_ts
