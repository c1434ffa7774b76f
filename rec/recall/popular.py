"""Popularity for cold start: an exponentially decayed counter per item (trending), updated per
event and read at the newest event time, so old bursts fade without a sweep over all items."""

from __future__ import annotations

import math

import numpy as np

from rec.catalog import Catalog


class Trending:
    """Exponentially decayed event counts keyed by item id, readable at the newest event time.

    Counts live in one array (a slot per item id), so reading the whole catalogue's vector is
    one gather, not a Python loop over every item."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self.slots: dict[str, int] = {}
        self.weights = np.zeros(64, np.float64)  # per slot, scaled to 2**((t - origin) / h)
        self.origin: float | None = None
        self.latest = 0.0
        self._catalog: Catalog | None = None  # the catalogue `_rows` maps slots into
        self._catalog_len = -1
        self._rows = np.zeros(0, np.int64)  # slot -> catalogue index (-1: not in it)
        self._added = 0  # events counted so far: the cached vector is current while it stays
        self._vector: tuple[int, int, np.ndarray] | None = None  # (_added, len(catalog), vector)

    def add(self, item_id: str, ts: float) -> None:
        if self.origin is None:
            self.origin = ts
        exp = (ts - self.origin) / self.half_life_s
        if exp > 60:  # rebase before 2**exp loses precision
            self.weights *= math.pow(2.0, -exp)
            self.origin, exp = ts, 0.0
        slot = self.slots.get(item_id)
        if slot is None:
            slot = self.slots[item_id] = len(self.slots)
            if slot >= len(self.weights):
                self.weights = np.concatenate([self.weights, np.zeros_like(self.weights)])
        self.weights[slot] += math.pow(2.0, exp)
        self.latest = max(self.latest, ts)
        self._added += 1

    def _scale(self) -> float:
        if self.origin is None:
            return 0.0
        return math.pow(2.0, -(self.latest - self.origin) / self.half_life_s)

    def get(self, item_id: str) -> float:
        slot = self.slots.get(item_id)
        return 0.0 if slot is None else float(self.weights[slot]) * self._scale()

    def vector(self, catalog: Catalog) -> np.ndarray:
        """Every catalogue item's trending value (0 for items without events), read-only. A
        request reads it twice (the trending list, the ranker's feature): until the next event
        or catalogue change the same array is returned."""
        cached = self._vector
        if (
            cached is not None
            and cached[0] == self._added
            and cached[1] == len(catalog)
            and catalog is self._catalog
        ):
            return cached[2]
        n = len(self.slots)
        if catalog is not self._catalog or len(catalog) != self._catalog_len:
            self._catalog, self._catalog_len = catalog, len(catalog)
            self._rows = np.fromiter((catalog.index.get(i, -1) for i in self.slots), np.int64, n)
        elif len(self._rows) < n:  # new items since the last read
            new = list(self.slots)[len(self._rows) :]
            self._rows = np.concatenate(
                [self._rows, np.fromiter((catalog.index.get(i, -1) for i in new), np.int64)]
            )
        out = np.zeros(len(catalog), np.float32)
        ok = self._rows >= 0
        out[self._rows[ok]] = self.weights[:n][ok] * self._scale()
        out.flags.writeable = False
        self._vector = (self._added, len(catalog), out)
        return out
