"""Numpy state indexed by catalogue index (counts, metadata codes, co-occurrence rows): growing
it, and reading it for many items at once."""

from __future__ import annotations

import numpy as np


def padded(array: np.ndarray, shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """`array` in the top-left corner of a new array of `shape`, the rest `fill`."""
    out = np.full(shape, fill, array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out


def grown(array: np.ndarray, size: int, fill: float = 0) -> np.ndarray:
    """`array` if it has at least `size` rows, else a copy padded with `fill` to at least twice
    its rows (amortised O(1) appends)."""
    if size <= len(array):
        return array
    return padded(array, (max(size, 2 * len(array), 8), *array.shape[1:]), fill)


def gathered(values: np.ndarray, idx: np.ndarray, fill: float = 0, dtype=None) -> np.ndarray:
    """values[idx], `fill` where idx is -1 (not in the catalogue) or past the array's end (an
    item that arrived after the array last grew)."""
    ok = (idx >= 0) & (idx < len(values))
    out = np.full(len(idx), fill, values.dtype if dtype is None else dtype)
    out[ok] = values[idx[ok]]
    return out
