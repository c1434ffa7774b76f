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


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """np.isin(values, sorted_set) for a sorted, duplicate-free `sorted_set`: a binary search
    per value, without np.isin's sorting of both arrays (a request's few hundred candidates
    against its user's history)."""
    values = np.asarray(values)
    if not len(sorted_set) or not values.size:
        return np.zeros(values.shape, bool)
    pos = np.searchsorted(sorted_set, values)
    return sorted_set[np.minimum(pos, len(sorted_set) - 1)] == values
