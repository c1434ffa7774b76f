"""Per-user state that starts from a checkpoint: the users the checkpoint holds stay in its
arrays (memory-mapped, so the replicas of one machine share the pages) and become Python
objects only when an event changes them; users new since the checkpoint are objects from the
start. Start-up then costs what the checkpoint's arrays cost to map, not a Python object per
user, and a replica's private memory grows with the users active since the checkpoint (for
profiles, which a replica keeps across model swaps, since the replica started)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class Ragged:
    """Rows of different lengths in flat arrays: row r's entries are cols[c][ptr[r]:ptr[r+1]]."""

    def __init__(self, ptr: np.ndarray, **cols: np.ndarray) -> None:
        self.ptr = ptr
        self.cols = cols

    @classmethod
    def of(cls, rows: list[list[tuple]], dtypes: dict[str, type]) -> Ragged:
        """From rows of tuples, one value per column in `dtypes`' order."""
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=ptr[1:])
        flat = [v for row in rows for v in row]
        cols = {}
        for n, (name, dtype) in enumerate(dtypes.items()):
            cols[name] = np.fromiter((v[n] for v in flat), dtype, len(flat))
        return cls(ptr, **cols)

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def row(self, r: int) -> dict[str, np.ndarray]:
        a, b = int(self.ptr[r]), int(self.ptr[r + 1])
        return {name: col[a:b] for name, col in self.cols.items()}

    def take(self, rows: np.ndarray) -> Ragged:
        """Rows `rows`, in that order, as a new Ragged (copies)."""
        starts, stops = self.ptr[rows], self.ptr[rows + 1]
        lengths = stops - starts
        ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=ptr[1:])
        # the flat position of every entry kept: its row's old start plus its place in the row
        pos = np.repeat(starts - ptr[:-1], lengths) + np.arange(ptr[-1], dtype=np.int64)
        return Ragged(ptr, **{name: np.asarray(col[pos]) for name, col in self.cols.items()})

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        ptr = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            ptr.append(p.ptr[1:] + base)
            base += int(p.ptr[-1])
        names = parts[0].cols
        return Ragged(
            np.concatenate(ptr), **{n: np.concatenate([p.cols[n] for p in parts]) for n in names}
        )


class LazyRows(Generic[T]):
    """A mapping from user id to T: the checkpoint's users (`keys`, sorted) are built from
    their row by `build` when read (a fresh object each time) and kept as objects once
    written (`materialised`); users forgotten since are dropped from both."""

    def __init__(
        self, keys: np.ndarray | None = None, build: Callable[[int], T] | None = None
    ) -> None:
        self.keys = keys if keys is not None else np.zeros(0, "U1")
        self.build = build
        self.live: dict[str, T] = {}
        self.dropped: set[int] = set()  # base rows materialised into `live` or forgotten
        self.origin: object | None = None  # where `keys` and the rows came from (a checkpoint's)

    def __len__(self) -> int:
        return len(self.live) + len(self.keys) - len(self.dropped)

    def __iter__(self) -> Iterator[str]:
        yield from self.live
        for r in self.base_rows().tolist():
            yield str(self.keys[r])

    def __contains__(self, key: str) -> bool:
        return key in self.live or self._row(key) is not None

    def _row(self, key: str) -> int | None:
        keys = self.keys
        if not len(keys):
            return None
        r = int(np.searchsorted(keys, key))
        if r < len(keys) and keys[r] == key and r not in self.dropped:
            return r
        return None

    def get(self, key: str) -> T | None:
        """The user's object for reading (changes to one built from the base are not kept)."""
        obj = self.live.get(key)
        if obj is None and (r := self._row(key)) is not None:
            obj = self.build(r)
        return obj

    def writable(self, key: str) -> T | None:
        """The user's object for writing, materialised from the base if need be."""
        obj = self.live.get(key)
        if obj is None and (r := self._row(key)) is not None:
            obj = self.live[key] = self.build(r)
            self.dropped.add(r)
        return obj

    def put(self, key: str, obj: T) -> T:
        self.live[key] = obj
        if (r := self._row(key)) is not None:
            self.dropped.add(r)
        return obj

    def pop(self, key: str) -> bool:
        had = self.live.pop(key, None) is not None
        if (r := self._row(key)) is not None:
            self.dropped.add(r)
            had = True
        return had

    def base_rows(self) -> np.ndarray:
        """The base rows still served from the base (neither materialised nor forgotten)."""
        keep = np.ones(len(self.keys), bool)
        if self.dropped:
            keep[np.fromiter(self.dropped, np.int64, len(self.dropped))] = False
        return np.flatnonzero(keep)

    def items(self) -> Iterator[tuple[str, T]]:
        """Every user with its object, built ones included (for checkpoints and tests)."""
        yield from self.live.items()
        for r in self.base_rows().tolist():
            yield str(self.keys[r]), self.build(r)
