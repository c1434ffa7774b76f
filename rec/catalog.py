"""The item catalogue: string ids to dense indices, metadata, deletions.

Indices start with the current model's item order (so model arrays line up) and grow as new
items appear in the log; a model swap re-bases them on the new model's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
        if idx is None:
            idx = len(self.ids)
            self.ids.append(item_id)
            self.index[item_id] = idx
        meta = self.meta.get(item_id)
        if meta is None:
            self.meta[item_id] = ItemMeta(first_ts=ts)
        elif meta.first_ts is None and ts is not None:
            meta.first_ts = ts
        return idx

    def upsert(self, item_id: str, category: str | None, tags: list[str], title: str | None,
               ts: float) -> int:
        idx = self.ensure(item_id, ts)
        meta = self.meta[item_id]
        meta.category, meta.tags, meta.title = category, tuple(tags), title
        self.deleted.discard(item_id)
        return idx

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
        cat.deleted = set(self.deleted)
        return cat
