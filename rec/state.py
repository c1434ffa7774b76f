"""Live state folded from the event log: the catalogue, user profiles and what recall counts per
event over every user (co-occurrence, popularity, trending, fresh items).

A stage keeps only the parts it serves from: the profile stage its profiles (and the catalogue's
metadata, which interest tags read), the recall stage the catalogue and the item counts, the
fused topology and offline evaluation all of them, in one object. Replaying the same records
gives the same state, part by part.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rec.arrays import grown
from rec.catalog import Catalog
from rec.config import RecConfig
from rec.events import (
    KIND_EVENT,
    KIND_ITEM,
    KIND_ITEM_DELETE,
    KIND_USER_DELETE,
    parse_payload,
)
from rec.profile import ProfileStore, event_weight
from rec.recall import Cooccurrence, Trending
from rec.rows import LazyRows

NEW_ITEMS_KEPT = 200


@dataclass(frozen=True)
class Basis:
    """What a model version fixes of the live state: its item order (the catalogue's first
    indices), their categories and the log offset it was trained up to (pairs before it are in
    its item-CF, so live co-occurrence counts only the records after it)."""

    version: str
    item_ids: list[str]
    categories: list[str | None]
    log_offset: int


class CatalogListener(Protocol):
    """Whoever holds per-item arrays beside the catalogue (the recall stage's vectors and
    index) hears of its changes here."""

    def items_added(self, start: int, stop: int) -> None: ...

    def item_deleted(self, idx: int) -> None: ...

    def item_restored(self, idx: int) -> None: ...


@dataclass
class _Pairs:
    """What co-occurrence counting needs of one user: every item touched (a pair counts on the
    user's first event on an item) and the latest distinct positive items (its partners)."""

    touched: set[int] = field(default_factory=set)
    partners: list[int] = field(default_factory=list)  # oldest first, at most `window`


class ItemStats:
    """Per-item counts over every user's events: live co-occurrence (pairs formed after the
    model's snapshot, new items included), positive-event popularity, a decayed trending count
    and the newest catalogue items."""

    def __init__(self, config: RecConfig) -> None:
        self.window = config.recall.recent_for_itemcf
        self.cooc = Cooccurrence(self.window)
        self.pop_counts = np.zeros(0, np.float32)  # positive events per catalogue index
        self.trend = Trending(config.recall.trending_half_life_s)
        self.new_items: deque[str] = deque(maxlen=NEW_ITEMS_KEPT)
        self.users: LazyRows[_Pairs] = LazyRows()

    def observe(
        self,
        user_id: str,
        idx: int,
        item_id: str,
        ts: float,
        weight: float,
        learn: bool,
        count: bool,
    ) -> None:
        """One behaviour event of `weight` on catalogue index `idx`. learn=False: nothing is
        counted, the user's history still grows. count=False: its pair is in the model already."""
        pairs = self.users.writable(user_id)
        learnt = learn and weight > 0
        if learnt and count and (pairs is None or idx not in pairs.touched):
            self.cooc.add(idx, pairs.partners if pairs else [], True)
        if pairs is None:
            pairs = self.users.put(user_id, _Pairs())
        pairs.touched.add(idx)
        if weight > 0:  # a list of ~20: an OrderedDict cost ~2 kB per user (60 MB on Gowalla)
            partners = pairs.partners
            if idx in partners:
                partners.remove(idx)
            partners.append(idx)
            if len(partners) > self.window:
                del partners[0]
        if learnt:
            self.pop_counts = grown(self.pop_counts, idx + 1)
            self.pop_counts[idx] += 1.0
            self.trend.add(item_id, ts)

    def forget(self, user_id: str) -> None:
        self.users.pop(user_id)


class LiveState:
    """The parts of the live state a stage serves from, and the log offset they are at."""

    def __init__(self, config: RecConfig, profiles: bool = True, stats: bool = True) -> None:
        self.config = config
        self.catalog = Catalog()
        self.profiles = ProfileStore(config.profile) if profiles else None
        self.stats = ItemStats(config) if stats else None
        self.offset = 0  # next log offset to apply
        self.model_offset = 0  # records before this offset are in the model's item-CF
        self.model_items = 0  # catalogue indices below this are the model's items
        self.model_version: str | None = None  # the version whose item order indexes the catalogue
        self.checkpoint: str | None = None  # the checkpoint this state started from, if any
        self._listener: weakref.ref | None = None

    @property
    def listener(self) -> CatalogListener | None:
        return self._listener() if self._listener is not None else None

    @listener.setter
    def listener(self, listener: CatalogListener | None) -> None:
        """Held weakly: the listener (the recall stage) holds this state, and a cycle between
        them would outlive a model swap in a replica that has frozen its objects (gc.freeze)."""
        self._listener = weakref.ref(listener) if listener is not None else None

    def rebase(self, basis: Basis) -> None:
        """Index the catalogue in a model's item order, its categories filling in items the
        log gave none. Item counts are indexed by the catalogue, so a state that holds any is
        rebased by `rec.checkpoint.load`, which re-indexes them."""
        self.catalog = self.catalog.rebase(basis.item_ids)
        for item_id, cat in zip(basis.item_ids, basis.categories, strict=True):
            if self.catalog.meta[item_id].category is None:
                self.catalog.set_category(item_id, cat)
        self.model_offset, self.model_items = basis.log_offset, len(basis.item_ids)
        self.model_version = basis.version

    def apply(self, records: list[dict], learn: bool = True, in_model: bool = False) -> None:
        """Fold log records (in offset order) in; already-applied ones are skipped.
        learn=False updates profiles and the catalogue only (no co-occurrence, popularity or
        trending): the 'profile updates only' variant of the prequential evaluation.
        in_model=True: the model was trained on these records, so their co-occurrence is in its
        item-CF already and is not counted again (what `model_offset` says for a log prefix,
        for records that are not one: training's held-out replay)."""
        for r in records:
            off = r.get("offset")
            if off is not None:
                if off < self.offset:
                    continue
                self.offset = off + 1
            profiles = self._profiles_for(off)
            kind = r["kind"]
            if kind == KIND_EVENT:
                self._apply_event(r, learn, in_model, profiles)
            elif kind == KIND_ITEM:
                self._apply_item(r)
            elif kind == KIND_ITEM_DELETE:
                idx = self.catalog.delete(r["item_id"])
                if idx is not None and (listener := self.listener) is not None:
                    listener.item_deleted(idx)
            elif kind == KIND_USER_DELETE:
                if profiles is not None:
                    profiles.forget(r["user_id"])
                if self.stats is not None:
                    self.stats.forget(r["user_id"])

    def share_profiles(self, other: LiveState) -> None:
        """Take `other`'s profile store (a replica's serving state, for the next version's
        warming one): records it has applied already are applied here to the other parts
        only. `other` must be at or past this state's offset, so that no record between them
        is missing from the store."""
        store = other.profiles
        if store is None or store.offset < self.offset:
            raise ValueError("the profiles to share are behind this state")
        self.profiles = store

    def _profiles_for(self, off: int | None) -> ProfileStore | None:
        """The profile store if the record at `off` is new to it (advancing its offset)."""
        store = self.profiles
        if store is None or off is None:
            return store
        if off < store.offset:
            return None  # applied through the state that shares the store
        store.offset = off + 1
        return store

    def _apply_event(
        self, r: dict, learn: bool, in_model: bool, profiles: ProfileStore | None
    ) -> None:
        item_id, user_id = r["item_id"], r["user_id"]
        idx = self._ensure(item_id, float(r["ts"]))
        if self.stats is not None:
            w = event_weight(r["type"], r.get("value"), self.config.profile)
            count = not in_model and r.get("offset", self.offset) >= self.model_offset
            self.stats.observe(user_id, idx, item_id, float(r["ts"]), w, learn, count)
        if profiles is not None:
            profiles.apply_event(r, self.catalog.meta.get(item_id))

    def _apply_item(self, r: dict) -> None:
        p = parse_payload(r)
        item_id = r["item_id"]
        is_new = item_id not in self.catalog.index
        was_deleted = item_id in self.catalog.deleted
        before = len(self.catalog)
        idx = self.catalog.upsert(
            item_id, p.get("category"), p.get("tags") or [], p.get("title"), r["ts"]
        )
        self._grown(before)
        if was_deleted and (listener := self.listener) is not None:
            listener.item_restored(idx)
        if self.stats is not None and (is_new or idx >= self.model_items):
            self.stats.new_items.append(item_id)

    def _ensure(self, item_id: str, ts: float) -> int:
        before = len(self.catalog)
        idx = self.catalog.ensure(item_id, ts)
        self._grown(before)
        return idx

    def _grown(self, before: int) -> None:
        if len(self.catalog) > before and (listener := self.listener) is not None:
            listener.items_added(before, len(self.catalog))
