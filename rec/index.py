"""Vector indexes for embedding recall: one `Index` protocol, exact and HNSW implementations.

Scores are inner products (higher is better), vectors are float32 and ids are the caller's
non-negative int64 item indices. Every index supports upsert, deletion and an exclusion list at
query time, so the serving path can apply catalogue changes and hide already-seen items without a
rebuild. Indexes persist to a directory without pickle: `.npz` arrays (loadable with
`allow_pickle=False`), hnswlib's own binary format and a small JSON file naming the class and its
parameters, which `load_index` reads to pick the class.

Indexes are not thread-safe: callers serialise mutation and search on one instance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import hnswlib
import numpy as np

from rec.arrays import member

PAD_ID = -1
META_FILE = "index.json"
_QUERY_BLOCK_CELLS = 1 << 24  # brute force scores at most this many (query, item) pairs at once


@runtime_checkable
class Index(Protocol):
    """What recall needs from a vector index; see the module docstring for conventions."""

    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Upsert: a new id is inserted, an existing one gets its vector replaced and is un-deleted."""
        ...

    def mark_deleted(self, ids: np.ndarray) -> None:
        """Hide ids from every later search; unknown or already-deleted ids are ignored."""
        ...

    def search(
        self, queries: np.ndarray, k: int, filter_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query row as (ids int64 [q, k], scores float32 [q, k]), best first.

        Rows are padded with id -1 / score -inf when fewer than k live items qualify. `filter_ids`
        are excluded from every row's results.
        """
        ...

    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        ...

    def save(self, path: str | Path) -> None:
        """Write the index into directory `path` (created if missing)."""
        ...

    @classmethod
    def load(cls, path: str | Path) -> Index:
        """Read an index written by `save`."""
        ...


# --------------------------------------------------------------------------------------------
# Shared helpers


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ValueError("ids must be non-negative")
    return ids


def _check_add(ids: np.ndarray, vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate an upsert batch and keep only the last occurrence of a repeated id."""
    ids = _check_ids(ids)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors.reshape(1, -1)
    if vectors.shape != (ids.size, dim):
        raise ValueError(f"vectors must have shape ({ids.size}, {dim}), got {vectors.shape}")
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    last = np.sort(ids.size - 1 - first_in_reversed)
    return ids[last], vectors[last]


def _check_queries(queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries.reshape(1, -1)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (q, {dim}) or ({dim},), got {queries.shape}")
    return queries


def _filter_set(filter_ids: np.ndarray | None) -> np.ndarray:
    if filter_ids is None:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.asarray(filter_ids, dtype=np.int64).reshape(-1))


def _empty_result(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), PAD_ID, dtype=np.int64), np.full((q, k), -np.inf, dtype=np.float32)


def _select_topk(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first top-k of each row, treating id -1 as padding; short rows are padded to k.

    Stable sorting keeps the incoming order among equal scores, so already-ranked input stays put.
    """
    scores = np.where(ids == PAD_ID, -np.inf, scores).astype(np.float32, copy=False)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids[np.isneginf(top_scores)] = PAD_ID
    out_ids, out_scores = _empty_result(ids.shape[0], k)
    out_ids[:, : order.shape[1]] = top_ids
    out_scores[:, : order.shape[1]] = top_scores
    return out_ids, out_scores


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _read_meta(path: Path, kind: str) -> dict[str, Any]:
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} index, not {kind!r}")
    return meta


# --------------------------------------------------------------------------------------------
# Exact index


class BruteForceIndex:
    """Exact inner-product search with numpy: the reference for recall and the small-catalogue choice.

    Vectors live in a growable array; deleting only clears a row's live flag, and a later upsert of
    the same id reuses the row.
    """

    kind = "brute"

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self._ids = np.empty(0, dtype=np.int64)
        self._vectors = np.empty((0, dim), dtype=np.float32)
        self._alive = np.empty(0, dtype=bool)
        self._n = 0  # rows in use
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self._alive[: self._n].sum())

    def _reserve(self, rows: int) -> None:
        capacity = self._ids.size
        if rows <= capacity:
            return
        capacity = max(rows, 2 * capacity, 64)
        for name in ("_ids", "_vectors", "_alive"):
            old = getattr(self, name)
            new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _check_add(ids, vectors, self.dim)
        rows = np.empty(ids.size, dtype=np.int64)
        next_row = self._n
        for j, item in enumerate(ids.tolist()):
            row = self._row_of.get(item)
            if row is None:
                row = self._row_of[item] = next_row
                next_row += 1
            rows[j] = row
        self._reserve(next_row)
        self._n = next_row
        self._ids[rows] = ids
        self._vectors[rows] = vectors
        self._alive[rows] = True

    def mark_deleted(self, ids: np.ndarray) -> None:
        rows = [self._row_of[i] for i in _check_ids(ids).tolist() if i in self._row_of]
        self._alive[rows] = False

    def search(
        self, queries: np.ndarray, k: int, filter_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, k, self.dim)
        out_ids, out_scores = _empty_result(queries.shape[0], k)
        if self._n == 0 or k == 0:
            return out_ids, out_scores
        excluded = ~self._alive[: self._n]
        for item in _filter_set(filter_ids).tolist():
            row = self._row_of.get(item)
            if row is not None:
                excluded[row] = True
        kk = min(k, self._n)
        block = max(1, _QUERY_BLOCK_CELLS // self._n)
        for start in range(0, queries.shape[0], block):
            scores = queries[start : start + block] @ self._vectors[: self._n].T
            scores[:, excluded] = -np.inf
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            block_ids, block_scores = _select_topk(
                self._ids[part], np.take_along_axis(scores, part, axis=1), k
            )
            out_ids[start : start + block] = block_ids
            out_scores[start : start + block] = block_scores
        return out_ids, out_scores

    def save(self, path: str | Path) -> None:
        path = Path(path)
        _write_meta(path, {"kind": self.kind, "dim": self.dim})
        np.savez(
            path / "arrays.npz",
            ids=self._ids[: self._n],
            vectors=self._vectors[: self._n],
            alive=self._alive[: self._n],
        )

    @classmethod
    def load(cls, path: str | Path) -> BruteForceIndex:
        path = Path(path)
        meta = _read_meta(path, cls.kind)
        index = cls(int(meta["dim"]))
        with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
            index.add(arrays["ids"], arrays["vectors"])
            index.mark_deleted(arrays["ids"][~arrays["alive"]])
        return index


# --------------------------------------------------------------------------------------------
# Approximate index


class HNSWIndex:
    """Approximate inner-product search with hnswlib (space "ip"), for large catalogues.

    Item vectors of a recommender have very uneven norms (popular items are long), and a graph
    search for the largest inner product then misses many neighbours. Each vector p is stored
    with one extra coordinate √(c² − ‖p‖²) (c: 1.2 × the largest norm of the first batch) and
    queries get 0 there: inner products are unchanged, every stored vector has norm c, so the
    search is a cosine search, which HNSW does well. A later vector longer than c is stored with
    0 there (exact score, a little less findable).

    That equalisation is not always a gain: when most vectors are much shorter than the longest
    (ALS gives items bought once a near-zero vector), they collapse onto the extra axis and the
    graph cannot navigate among them (recall@100 0.19 on Diginetica, 0.98 with raw inner
    products; on Gowalla the reverse, 0.96 against 0.56). `equalise_norms=False` stores 0 in
    the extra coordinate (a plain inner-product graph); `choose_equalise_norms` measures both
    on the vectors and queries at hand, and training stores its choice with the model.

    Capacity doubles automatically when an upsert needs more slots. Upserting an existing label
    updates its vector in place and un-deletes it (hnswlib's own behaviour for a repeated label).
    The library's deleted flags are saved with the graph; the set of deleted labels, which hnswlib
    does not expose, is tracked here and saved alongside.
    """

    kind = "hnsw"

    def __init__(
        self,
        dim: int,
        max_elements: int = 1024,
        m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 128,
        num_threads: int = 1,
        seed: int = 0,
        equalise_norms: bool = True,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.num_threads = num_threads
        self.seed = seed
        self.equalise_norms = equalise_norms
        self.norm_cap = 0.0  # c above; set by the first add
        self._index = hnswlib.Index(space="ip", dim=dim + 1)
        self._index.init_index(
            max_elements=max(1, max_elements),
            M=m,
            ef_construction=ef_construction,
            random_seed=seed,
        )
        self._index.set_num_threads(num_threads)
        self._labels: set[int] = set()
        self._deleted: set[int] = set()

    def __len__(self) -> int:
        return len(self._labels) - len(self._deleted)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _check_add(ids, vectors, self.dim)
        if ids.size == 0:
            return
        id_list = ids.tolist()
        new = [i for i in id_list if i not in self._labels]
        needed = self._index.element_count + len(new)
        capacity = self._index.get_max_elements()
        if needed > capacity:
            self._index.resize_index(max(needed, 2 * capacity))
        self._index.add_items(self._augment(vectors), ids, num_threads=self.num_threads)
        self._labels.update(new)
        self._deleted.difference_update(id_list)

    def _augment(self, vectors: np.ndarray) -> np.ndarray:
        if not self.equalise_norms:
            return np.hstack([vectors, np.zeros((len(vectors), 1), np.float32)])
        sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
        if self.norm_cap == 0.0:
            self.norm_cap = 1.2 * float(np.sqrt(sq.max())) or 1.0
        extra = np.sqrt(np.maximum(self.norm_cap**2 - sq, 0.0)).astype(np.float32)
        return np.hstack([vectors, extra[:, None]])

    def mark_deleted(self, ids: np.ndarray) -> None:
        for item in _check_ids(ids).tolist():
            if item in self._labels and item not in self._deleted:
                self._index.mark_deleted(item)
                self._deleted.add(item)

    def search(
        self, queries: np.ndarray, k: int, filter_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch k + |filter| neighbours, drop the filtered ones and keep the best k.

        hnswlib fails a whole batch when any row finds fewer neighbours than asked; that can only
        happen when part of the graph is unreachable, and the batch is then retried asking for
        half as many, so a degraded graph shortens results instead of failing the request.
        Scores come back as 1 - distance, i.e. the inner product up to float32 rounding.
        """
        queries = _check_queries(queries, k, self.dim)
        live = len(self)
        if queries.shape[0] == 0 or k == 0 or live == 0:
            return _empty_result(queries.shape[0], k)
        excluded = _filter_set(filter_ids)
        fetch = min(k + excluded.size, live)
        self._index.set_ef(max(self.ef_search, fetch))
        while True:
            try:
                labels, distances = self._index.knn_query(
                    np.hstack([queries, np.zeros((len(queries), 1), np.float32)]),
                    k=fetch,
                    num_threads=self.num_threads,
                )
                break
            except RuntimeError:
                if fetch == 1:
                    raise
                fetch //= 2
        ids = labels.astype(np.int64)
        ids[member(ids, excluded)] = PAD_ID
        return _select_topk(ids, 1.0 - distances, k)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        _write_meta(
            path,
            {
                "kind": self.kind,
                "dim": self.dim,
                "m": self.m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
                "num_threads": self.num_threads,
                "seed": self.seed,
                "equalise_norms": self.equalise_norms,
                "norm_cap": self.norm_cap,
            },
        )
        self._index.save_index(str(path / "hnsw.bin"))
        np.savez(path / "state.npz", deleted=np.fromiter(self._deleted, dtype=np.int64))

    @classmethod
    def load(cls, path: str | Path) -> HNSWIndex:
        path = Path(path)
        meta = _read_meta(path, cls.kind)
        params = {
            key: int(value)
            for key, value in meta.items()
            if key not in ("kind", "norm_cap", "equalise_norms")
        }
        index = cls(max_elements=1, equalise_norms=bool(meta.get("equalise_norms", True)), **params)
        index.norm_cap = float(meta["norm_cap"])
        index._index = hnswlib.Index(space="ip", dim=index.dim + 1)
        index._index.load_index(str(path / "hnsw.bin"))
        index._index.set_num_threads(index.num_threads)
        index._labels = set(index._index.get_ids_list())
        with np.load(path / "state.npz", allow_pickle=False) as state:
            index._deleted = set(state["deleted"].tolist())
        return index


# --------------------------------------------------------------------------------------------
# Sharding and construction


def merge_topk(
    results: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (ids [q, k_i], scores [q, k_i]) results into the global top-k per row.

    Padding (id -1) is dropped, an id returned by several shards is kept once with its best score,
    and rows are padded back to k with -1 / -inf.
    """
    if not results:
        raise ValueError("merge_topk needs at least one result")
    ids = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in results], axis=1)
    scores = np.concatenate([np.asarray(r[1], dtype=np.float32) for r in results], axis=1)
    scores = np.where(ids == PAD_ID, -np.inf, scores)
    # Best score first, then a stable sort by id: within each run of one id the first is the best.
    by_score = np.argsort(-scores, axis=1, kind="stable")
    ids = np.take_along_axis(ids, by_score, axis=1)
    scores = np.take_along_axis(scores, by_score, axis=1)
    by_id = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, by_id, axis=1)
    repeat = np.zeros_like(ids, dtype=bool)
    np.put_along_axis(repeat, by_id[:, 1:], sorted_ids[:, 1:] == sorted_ids[:, :-1], axis=1)
    ids[repeat] = PAD_ID
    return _select_topk(ids, scores, k)


class ShardedIndex:
    """An index split over n shards by `id % n`; search fans out and merges with `merge_topk`.

    In process it simply loops over the shards; the serving layer can hold the same shards in
    separate workers and reuse `merge_topk` to combine their answers.
    """

    kind = "sharded"

    def __init__(self, shards: list[Index]) -> None:
        if not shards:
            raise ValueError("ShardedIndex needs at least one shard")
        dims = {shard.dim for shard in shards}
        if len(dims) != 1:
            raise ValueError(f"shards disagree on dim: {sorted(dims)}")
        self.dim = dims.pop()
        self.shards = list(shards)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def _route(self, ids: np.ndarray) -> list[np.ndarray]:
        """Positions in `ids` that belong to each shard."""
        owner = ids % len(self.shards)
        return [np.flatnonzero(owner == s) for s in range(len(self.shards))]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _check_add(ids, vectors, self.dim)
        for shard, positions in zip(self.shards, self._route(ids), strict=True):
            if positions.size:
                shard.add(ids[positions], vectors[positions])

    def mark_deleted(self, ids: np.ndarray) -> None:
        ids = _check_ids(ids)
        for shard, positions in zip(self.shards, self._route(ids), strict=True):
            if positions.size:
                shard.mark_deleted(ids[positions])

    def search(
        self, queries: np.ndarray, k: int, filter_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, k, self.dim)
        if len(self.shards) == 1:  # already a top-k of distinct ids, padded: nothing to merge
            return self.shards[0].search(queries, k, filter_ids)
        return merge_topk([shard.search(queries, k, filter_ids) for shard in self.shards], k)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        _write_meta(path, {"kind": self.kind, "shards": len(self.shards)})
        for s, shard in enumerate(self.shards):
            shard.save(path / f"shard_{s:03d}")

    @classmethod
    def load(cls, path: str | Path) -> ShardedIndex:
        path = Path(path)
        meta = _read_meta(path, cls.kind)
        return cls([load_index(path / f"shard_{s:03d}") for s in range(int(meta["shards"]))])


_CLASSES: dict[str, type[BruteForceIndex] | type[HNSWIndex] | type[ShardedIndex]] = {
    BruteForceIndex.kind: BruteForceIndex,
    HNSWIndex.kind: HNSWIndex,
    ShardedIndex.kind: ShardedIndex,
}


def choose_equalise_norms(
    items: np.ndarray,
    queries: np.ndarray,
    k: int = 100,
    sample: int = 20_000,
    seed: int = 0,
    **params: Any,
) -> tuple[bool, dict[str, float]]:
    """Whether `HNSWIndex` should equalise norms for these item vectors: recall@k against exact
    search of both graphs, built on up to `sample` items (seeded) with `params` (HNSWIndex's),
    for `queries` drawn like serving's. Ties keep equalisation. Returns (choice, recalls)."""
    items = np.ascontiguousarray(items, np.float32)
    queries = np.ascontiguousarray(queries, np.float32)
    rng = np.random.default_rng(seed)
    ids = np.arange(len(items), dtype=np.int64)
    if len(ids) > sample:
        ids = np.sort(rng.choice(ids, sample, replace=False))
    k = min(k, len(ids))
    if k == 0 or len(queries) == 0:
        return True, {}
    exact = np.argpartition(-(queries @ items[ids].T), k - 1, axis=1)[:, :k]
    truth = [set(ids[row].tolist()) for row in exact]
    recalls = {}
    for equalise in (True, False):
        index = HNSWIndex(
            items.shape[1], max_elements=len(ids), seed=seed, equalise_norms=equalise, **params
        )
        index.add(ids, items[ids])
        found, _ = index.search(queries, k)
        recalls["equalised" if equalise else "raw"] = round(
            float(
                np.mean([len(t & set(f.tolist())) / k for t, f in zip(truth, found, strict=True)])
            ),
            4,
        )
    return recalls["equalised"] >= recalls["raw"], recalls


def make_index(kind: str, dim: int, **params: Any) -> Index:
    """A new empty index: kind "brute" (no params) or "hnsw" (params of `HNSWIndex`)."""
    if kind == BruteForceIndex.kind:
        return BruteForceIndex(dim, **params)
    if kind == HNSWIndex.kind:
        return HNSWIndex(dim, **params)
    raise ValueError(f"unknown index kind {kind!r}; expected 'brute' or 'hnsw'")


def load_index(path: str | Path) -> Index:
    """Load any index written by `save`, choosing the class from its JSON metadata."""
    kind = json.loads((Path(path) / META_FILE).read_text()).get("kind")
    if kind not in _CLASSES:
        raise ValueError(f"{path} holds an unknown index kind {kind!r}")
    return _CLASSES[kind].load(path)
