"""Checkpoints of the live state at a log offset, so that a replica's start-up and a model swap
apply only the records after it instead of replaying the whole log.

checkpoints/<offset>-<version>/meta.json   offset, the model version the state is based on, ...
checkpoints/<offset>-<version>/*.npy       flat arrays (no pickle), one file each

Everything per user is a `rec.rows.Ragged` of item codes, weights and times; the item codes
index the checkpoint's `item_ids` (the catalogue's order when it was written). A state loads
its users lazily from memory-mapped arrays (`rec.rows.LazyRows`): the replicas of one machine
share those pages, and only users active since the checkpoint become Python objects.

A checkpoint serves the version it was based on from its offset on. It also serves a newer
version trained on the log up to an offset at or after the checkpoint's: loading re-indexes
its catalogue and item counts in the new item order, and its live co-occurrence (pairs the
old version had not trained on) is dropped, as the new version trained on them. Profiles do
not depend on any version, so a stage holding only profiles can start from any checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import deque
from pathlib import Path

import numpy as np

from rec.catalog import Catalog, ItemMeta
from rec.config import RecConfig
from rec.profile import ProfileStore, UserProfile
from rec.recall import Cooccurrence, Trending
from rec.rows import LazyRows, Ragged
from rec.state import Basis, ItemStats, LiveState, _Pairs

FORMAT = 1
NO_VERSION = "none"
log = logging.getLogger("rec.checkpoint")


def _name(offset: int, version: str | None) -> str:
    return f"{offset:012d}-{version or NO_VERSION}"


class _Names:
    """Strings (categories, tags, event types) to codes, in first-seen order."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.list: list[str] = []
        self.codes: dict[str, int] = {}
        for name in names or []:
            self.code(name)

    def code(self, name: str) -> int:
        code = self.codes.get(name)
        if code is None:
            code = self.codes[name] = len(self.list)
            self.list.append(name)
        return code


# ---- writing ----------------------------------------------------------------------------------


def save(state: LiveState, root: str | Path) -> Path:
    """Write `state` under root/<offset>-<version> (atomically, via a temporary directory)."""
    if state.profiles is not None and state.profiles.offset != state.offset:
        raise ValueError("the state's profiles are shared and at another offset than its counts")
    root = Path(root)
    final = root / _name(state.offset, state.model_version)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = _Names()
    arrays = _catalog_arrays(state.catalog, names)
    if state.profiles is not None:
        arrays.update(_profile_arrays(state.profiles, state.catalog, names))
    if state.stats is not None:
        arrays.update(_stats_arrays(state.stats, state.catalog))
    arrays["names"] = np.asarray(names.list, dtype=str)
    for key, array in arrays.items():
        np.save(tmp / f"{key}.npy", array, allow_pickle=False)
    meta = {
        "format": FORMAT,
        "offset": state.offset,
        "model_version": state.model_version,
        "model_offset": state.model_offset,
        "model_items": state.model_items,
        "profiles": state.profiles is not None,
        "stats": state.stats is not None,
        "users": len(state.profiles) if state.profiles is not None else None,
        "items": len(state.catalog),
    }
    if state.stats is not None:
        trend = state.stats.trend
        meta["trend"] = {"origin": trend.origin, "latest": trend.latest, "added": trend._added}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _catalog_arrays(cat: Catalog, names: _Names) -> dict[str, np.ndarray]:
    metas = [cat.meta[i] for i in cat.ids]
    tags = Ragged.of([[(names.code(t),) for t in m.tags] for m in metas], {"name": np.int32})
    return {
        "item_ids": np.asarray(cat.ids, dtype=str),
        "item_deleted": np.fromiter((i in cat.deleted for i in cat.ids), bool, len(cat)),
        "item_category": np.fromiter(
            (-1 if m.category is None else names.code(m.category) for m in metas), np.int32
        ),
        "item_title": np.asarray([m.title or "" for m in metas], dtype=str),
        "item_has_title": np.fromiter((m.title is not None for m in metas), bool, len(metas)),
        "item_first_ts": np.fromiter(
            (math.nan if m.first_ts is None else m.first_ts for m in metas), np.float64
        ),
        "item_tags_ptr": tags.ptr,
        "item_tags": tags.cols["name"],
    }


PROFILE_COLS = {
    "recent": {"item": np.int32, "w": np.float64, "ts": np.float64},
    "items": {"item": np.int32, "w": np.float64},
    "tags": {"name": np.int32, "w": np.float64, "ts": np.float64},
    "counts": {"name": np.int32, "n": np.int64},
}
PAIRS_COLS = {"touched": {"item": np.int32}, "partners": {"item": np.int32}}


def _profile_arrays(store: ProfileStore, cat: Catalog, names: _Names) -> dict[str, np.ndarray]:
    index = cat.index
    live = list(store.users.live.items())
    sections = {
        "recent": [[(index[i], w, ts) for i, w, ts in p.recent] for _, p in live],
        "items": [[(index[i], w) for i, w in p.items.items()] for _, p in live],
        "tags": [[(names.code(t), w, ts) for t, (w, ts) in p.tags.items()] for _, p in live],
        "counts": [[(names.code(t), n) for t, n in p.counts.items()] for _, p in live],
    }
    parts = {s: Ragged.of(rows, PROFILE_COLS[s]) for s, rows in sections.items()}
    extra = {"last_ts": np.fromiter((p.last_ts for _, p in live), np.float64, len(live))}
    return _users_arrays("p", store.users, [k for k, _ in live], parts, extra, cat, names)


def _stats_arrays(stats: ItemStats, cat: Catalog) -> dict[str, np.ndarray]:
    live = list(stats.users.live.items())
    parts = {
        "touched": Ragged.of(
            [[(i,) for i in sorted(p.touched)] for _, p in live], {"item": np.int32}
        ),
        "partners": Ragged.of([[(i,) for i in p.partners] for _, p in live], {"item": np.int32}),
    }
    out = _users_arrays("s", stats.users, [k for k, _ in live], parts, {}, cat, None)
    trend, cooc = stats.trend, stats.cooc
    rows = sorted(cooc.partners)
    pairs = Ragged.concat(
        [Ragged(np.zeros(1, np.int64), js=np.zeros(0, np.int64), counts=np.zeros(0, np.float32))]
        + [
            Ragged(
                np.asarray([0, len(cooc.partners[i])], np.int64),
                js=cooc._js[i][: len(cooc.partners[i])],
                counts=cooc._counts[i][: len(cooc.partners[i])],
            )
            for i in rows
        ]
    )
    pop = np.zeros(len(cat), np.float32)
    n = min(len(cat), len(stats.pop_counts))
    pop[:n] = stats.pop_counts[:n]
    return {
        **out,
        "pop_counts": pop,
        "trend_ids": np.asarray(list(trend.slots), dtype=str),
        "trend_weights": trend.weights[: len(trend.slots)],
        "new_items": np.asarray(list(stats.new_items), dtype=str),
        "cooc_item_users": cooc.item_users,
        "cooc_rows": np.asarray(rows, np.int64),
        "cooc_ptr": pairs.ptr,
        "cooc_js": pairs.cols["js"],
        "cooc_counts": pairs.cols["counts"],
    }


def _users_arrays(
    prefix: str,
    rows: LazyRows,
    live_keys: list[str],
    parts: dict[str, Ragged],
    extra: dict[str, np.ndarray],
    cat: Catalog,
    names: _Names | None,
) -> dict[str, np.ndarray]:
    """Users written since the base (their objects encoded in `parts`, `extra`) merged with
    the base's rows still unchanged, sorted by user id; item codes are this catalogue's
    indices (the new checkpoint's `item_ids`), name codes this checkpoint's `names`."""
    keys = np.asarray(live_keys, dtype=str)
    base: _UserBase | None = getattr(rows, "origin", None)
    if base is not None:
        keep = rows.base_rows()
        keys = np.concatenate([keys, np.asarray(base.keys[keep])])
        for section, ragged in parts.items():
            old = base.parts[section].take(keep)
            for col, values in old.cols.items():
                if col == "item":
                    old.cols[col] = base.to_idx[values].astype(np.int32)
                elif col == "name":
                    table = np.asarray([names.code(n) for n in base.names], np.int32)
                    old.cols[col] = table[values] if len(table) else values
            parts[section] = Ragged.concat([ragged, old])
        for col, values in extra.items():
            extra[col] = np.concatenate([values, np.asarray(base.extra[col][keep])])
    order = np.argsort(keys, kind="stable")
    out = {f"{prefix}_keys": keys[order]}
    for section, ragged in parts.items():
        ragged = ragged.take(order)
        out[f"{prefix}_{section}_ptr"] = ragged.ptr
        for col, values in ragged.cols.items():
            out[f"{prefix}_{section}_{col}"] = values
    for col, values in extra.items():
        out[f"{prefix}_{col}"] = values[order]
    return out


# ---- reading ----------------------------------------------------------------------------------


class _UserBase:
    """One checkpoint's users of one kind (profiles, or item-CF pairs), as its arrays."""

    def __init__(self, arrays, prefix: str, sections, extra, to_idx, item_ids, names) -> None:
        self.keys = arrays(f"{prefix}_keys")
        self.parts = {
            s: Ragged(arrays(f"{prefix}_{s}_ptr"), **{c: arrays(f"{prefix}_{s}_{c}") for c in cols})
            for s, cols in sections.items()
        }
        self.extra = {col: arrays(f"{prefix}_{col}") for col in extra}
        self.to_idx = to_idx  # checkpoint item code -> this state's catalogue index
        self.item_ids = item_ids  # checkpoint item code -> item id
        self.names = names

    def ids(self, codes: np.ndarray) -> list[str]:
        item_ids = self.item_ids
        return [item_ids[c] for c in codes.tolist()]


def usable(root: str | Path, basis: Basis | None, any_version: bool = False) -> list[Path]:
    """Checkpoints a state for `basis` can start from, best first: the newest of its own
    version, then the newest of others taken at or before its log offset (any_version: of
    any version, for a state of profiles only)."""
    root = Path(root)
    if not root.is_dir():
        return []
    version = basis.version if basis is not None else None
    own, other = [], []
    for path in root.iterdir():
        if path.name.startswith(".") or not (path / "meta.json").exists():
            continue
        offset, _, name = path.name.partition("-")
        v = None if name == NO_VERSION else name
        if v == version:
            own.append((int(offset), path))
        elif any_version or (basis is not None and int(offset) <= basis.log_offset):
            other.append((int(offset), path))
    return [p for _, p in sorted(own, reverse=True)] + [p for _, p in sorted(other, reverse=True)]


def load(
    path: str | Path,
    config: RecConfig,
    basis: Basis | None,
    profiles: bool = True,
    stats: bool = True,
) -> LiveState:
    """The state a checkpoint holds, the parts asked for, based on `basis`' version."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta["format"] != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta['format']}, not {FORMAT}")
    if (profiles and not meta["profiles"]) or (stats and not meta["stats"]):
        raise ValueError(f"{path}: the checkpoint lacks a part asked for")
    version = basis.version if basis is not None else None
    same = meta["model_version"] == version
    if stats and not same and (basis is None or meta["offset"] > basis.log_offset):
        raise ValueError(f"{path}: taken after {version} was trained; it cannot serve it")

    def arrays(name: str) -> np.ndarray:
        file = path / f"{name}.npy"
        try:  # a plain ndarray over the mapping: slicing a np.memmap costs a Python-level
            # __array_finalize__ per slice, and a request reads a user's rows as slices
            return np.asarray(np.load(file, mmap_mode="r", allow_pickle=False))
        except ValueError:  # an empty array cannot be mapped
            return np.load(file, allow_pickle=False)

    names = arrays("names").tolist()
    item_ids = arrays("item_ids").tolist()
    state = LiveState(config, profiles=profiles, stats=stats)
    state.catalog = _catalog(arrays, item_ids, names)
    state.offset = int(meta["offset"])
    if profiles:
        state.profiles.offset = state.offset
    state.checkpoint = path.name
    if same:
        state.model_version = version
        state.model_offset, state.model_items = meta["model_offset"], meta["model_items"]
    elif basis is not None:
        state.rebase(basis)
    index = state.catalog.index
    to_idx = np.fromiter((index[i] for i in item_ids), np.int64, len(item_ids))
    if profiles:
        base = _UserBase(arrays, "p", PROFILE_COLS, ["last_ts"], to_idx, item_ids, names)
        _lazy(state.profiles.users, base, _profile_builder(base, config.profile.max_recent))
    if stats:
        base = _UserBase(arrays, "s", PAIRS_COLS, [], to_idx, item_ids, names)
        _lazy(state.stats.users, base, _pairs_builder(base))
        _restore_counts(state.stats, arrays, meta, to_idx, len(state.catalog), same)
        if not same:  # only items the new version does not know are new
            known = set(basis.item_ids)
            fresh = [i for i in state.stats.new_items if i not in known]
            state.stats.new_items.clear()
            state.stats.new_items.extend(fresh)
    return state


def start_state(
    config: RecConfig, basis: Basis | None, profiles: bool = True, stats: bool = True
) -> LiveState:
    """Where a state for `basis` (the parts asked for) starts: the best usable checkpoint in
    `config.checkpoint_dir`, or, when none loads, an empty state at offset 0 based on it."""
    for path in usable(config.checkpoint_dir, basis, any_version=not stats):
        try:
            return load(path, config, basis, profiles, stats)
        except (OSError, ValueError, KeyError) as exc:  # collected meanwhile, or damaged
            log.warning("checkpoint %s not used: %s", path.name, exc)
    state = LiveState(config, profiles, stats)
    if basis is not None and stats:
        state.rebase(basis)
    return state


def _lazy(rows: LazyRows, base: _UserBase, build) -> None:
    rows.keys, rows.build = base.keys, build
    rows.origin = base  # what a later checkpoint merges the unchanged rows from


def _catalog(arrays, item_ids: list[str], names: list[str]) -> Catalog:
    tags = Ragged(arrays("item_tags_ptr"), name=arrays("item_tags"))
    category = arrays("item_category").tolist()
    titles, has_title = arrays("item_title").tolist(), arrays("item_has_title").tolist()
    first_ts = arrays("item_first_ts").tolist()
    tag_names = [names[c] for c in np.asarray(tags.cols["name"]).tolist()]
    ptr = np.asarray(tags.ptr).tolist()
    metas = {
        item_id: ItemMeta(
            category=None if category[n] < 0 else names[category[n]],
            tags=tuple(tag_names[ptr[n] : ptr[n + 1]]),
            title=titles[n] if has_title[n] else None,
            first_ts=None if math.isnan(first_ts[n]) else first_ts[n],
        )
        for n, item_id in enumerate(item_ids)
    }
    deleted = np.asarray(arrays("item_deleted"))
    return Catalog.restored(item_ids, metas, {item_ids[n] for n in np.flatnonzero(deleted)})


def _profile_builder(base: _UserBase, max_recent: int):
    recent, items, tags, counts = (base.parts[s] for s in ("recent", "items", "tags", "counts"))
    last_ts, names = base.extra["last_ts"], base.names

    def build(r: int) -> UserProfile:
        rr, ir, tr, cr = recent.row(r), items.row(r), tags.row(r), counts.row(r)
        p = UserProfile(
            str(base.keys[r]),
            deque(
                zip(base.ids(rr["item"]), rr["w"].tolist(), rr["ts"].tolist(), strict=True),
                maxlen=max_recent,
            ),
        )
        p.items = dict(zip(base.ids(ir["item"]), ir["w"].tolist(), strict=True))
        p.tags = {
            names[c]: (w, ts)
            for c, w, ts in zip(
                tr["name"].tolist(), tr["w"].tolist(), tr["ts"].tolist(), strict=True
            )
        }
        p.counts = {names[c]: n for c, n in zip(cr["name"].tolist(), cr["n"].tolist(), strict=True)}
        p.last_ts = float(last_ts[r])
        return p

    return build


def _pairs_builder(base: _UserBase):
    touched, partners, to_idx = base.parts["touched"], base.parts["partners"], base.to_idx

    def build(r: int) -> _Pairs:
        return _Pairs(
            set(to_idx[touched.row(r)["item"]].tolist()),
            to_idx[partners.row(r)["item"]].tolist(),
        )

    return build


def _restore_counts(stats: ItemStats, arrays, meta, to_idx, n_items: int, same: bool) -> None:
    pop = np.asarray(arrays("pop_counts"))
    stats.pop_counts = np.zeros(n_items, np.float32)
    stats.pop_counts[to_idx] = pop
    trend: Trending = stats.trend
    ids = arrays("trend_ids").tolist()
    trend.slots = {item_id: slot for slot, item_id in enumerate(ids)}
    trend.weights = np.zeros(max(64, 2 * len(ids)), np.float64)
    trend.weights[: len(ids)] = arrays("trend_weights")
    trend.origin, trend.latest = meta["trend"]["origin"], meta["trend"]["latest"]
    trend._added = int(meta["trend"]["added"])
    stats.new_items.extend(arrays("new_items").tolist())
    if same:  # pairs after the model's offset; a newer version has trained on them
        _restore_cooc(stats.cooc, arrays)


def _restore_cooc(cooc: Cooccurrence, arrays) -> None:
    cooc.item_users = np.array(arrays("cooc_item_users"))
    ptr = np.asarray(arrays("cooc_ptr")).tolist()
    js, counts = np.asarray(arrays("cooc_js")), np.asarray(arrays("cooc_counts"))
    for n, i in enumerate(np.asarray(arrays("cooc_rows")).tolist()):
        row = js[ptr[n] : ptr[n + 1]].astype(np.int64)
        cooc.partners[i] = dict(zip(row.tolist(), range(len(row)), strict=True))
        cooc._js[i] = row
        cooc._counts[i] = counts[ptr[n] : ptr[n + 1]].astype(np.float32)


def oldest_offset(root: str | Path) -> int | None:
    """The log offset of the oldest checkpoint kept: no state starts from an earlier one, so
    the log's retention policy may expire what lies before it (None: no checkpoint)."""
    root = Path(root)
    offsets = [
        int(path.name.partition("-")[0])
        for path in (root.iterdir() if root.is_dir() else [])
        if not path.name.startswith(".") and (path / "meta.json").exists()
    ]
    return min(offsets, default=None)


def collect(root: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest checkpoints (by offset) and any half-written one;
    returns the names deleted. A replica that has loaded one keeps its mapped pages."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    for path in root.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
        elif (path / "meta.json").exists():
            done.append(path.name)
    done.sort(reverse=True)
    gone = done[max(keep, 1) :]
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return gone
