"""Popularity for cold start: an exponentially decayed counter per item (trending), updated per
event and read at the newest event time, so old bursts fade without a sweep over all items."""

from __future__ import annotations

import math

import numpy as np

from rec.catalog import Catalog


class Trending:
    """Exponentially decayed event counts keyed by item id, readable at the newest event time."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self.values: dict[str, float] = {}
        self.origin: float | None = None
        self.latest = 0.0

    def add(self, item_id: str, ts: float) -> None:
        if self.origin is None:
            self.origin = ts
        exp = (ts - self.origin) / self.half_life_s
        if exp > 60:  # rebase before 2**exp loses precision
            factor = math.pow(2.0, -exp)
            self.values = {k: v * factor for k, v in self.values.items()}
            self.origin, exp = ts, 0.0
        self.values[item_id] = self.values.get(item_id, 0.0) + math.pow(2.0, exp)
        self.latest = max(self.latest, ts)

    def _scale(self) -> float:
        if self.origin is None:
            return 0.0
        return math.pow(2.0, -(self.latest - self.origin) / self.half_life_s)

    def get(self, item_id: str) -> float:
        return self.values.get(item_id, 0.0) * self._scale()

    def vector(self, catalog: Catalog) -> np.ndarray:
        out = np.zeros(len(catalog), np.float32)
        scale = self._scale()
        for item_id, v in self.values.items():
            idx = catalog.index.get(item_id)
            if idx is not None:
                out[idx] = v * scale
        return out
