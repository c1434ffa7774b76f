"""A model version: everything training produces, saved as a directory of safe formats.

models/<version>/meta.json     version, log offset it was trained up to, metrics, config
models/<version>/arrays.npz    item ids, embeddings, every recall model's arrays (no pickle)
models/<version>/ranker/       safetensors weights + JSON
models/<version>/index/        the HNSW (or brute-force) shards over the item vectors
models/CURRENT                 name of the live version (written atomically)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rec.config import RecallConfig
from rec.index import Index, ShardedIndex, load_index, make_index
from rec.ranker import Ranker
from rec.recall import Embeddings, GraphFilter, ItemCF
from rec.recall.base import RecallModel
from rec.recall.registry import MODELS
from rec.state import Basis


@dataclass
class ModelBundle:
    version: str
    item_ids: list[str]
    user_ids: list[str]
    embeddings: Embeddings
    # the fitted `rec.recall.registry.MODELS`, in its order (a model that does not apply to this
    # catalogue, such as EASE for a large one, is absent)
    sources: dict[str, RecallModel]
    item_categories: list[str | None]
    ranker: Ranker | None = None
    ordering: str = "ranker"  # how the final list is ordered: one of pipeline.ORDERINGS (fit picks)
    equalise_norms: bool = True  # HNSWIndex's norm equalisation (fit measures which recalls more)
    log_offset: int = 0
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def basis(self) -> Basis:
        return Basis(self.version, self.item_ids, self.item_categories, self.log_offset)

    @property
    def itemcf(self) -> ItemCF:
        """Item-CF, which also explains candidates and answers /similar."""
        return self.sources["itemcf"]

    @property
    def graph(self) -> GraphFilter:
        """The graph filter as fitted (training validates it, then replaces it with its
        served form, `GraphFilter.served`)."""
        return self.sources["gf"]

    def build_index(self, config: RecallConfig, shards: int = 1) -> Index:
        """An index over the item vectors, `shards` ways (item index i goes to shard i % shards)."""
        parts = []
        ids = np.arange(self.n_items, dtype=np.int64)
        kind = config.index_kind(self.n_items)
        for s in range(max(shards, 1)):
            mine = ids[ids % max(shards, 1) == s]
            params = {}
            if kind == "hnsw":
                params = dict(
                    max_elements=len(mine) + config.index_headroom + 1,
                    m=config.hnsw_m,
                    ef_construction=config.hnsw_ef_construction,
                    ef_search=config.hnsw_ef_search,
                    num_threads=1,
                    equalise_norms=self.equalise_norms,
                )
            index = make_index(kind, self.embeddings.dim, **params)
            if len(mine):
                index.add(mine, self.embeddings.item[mine])
            parts.append(index)
        return ShardedIndex(parts)

    def save(self, root: str | Path, index: Index | None = None) -> Path:
        """Write this version under root/<version> (atomically, via a temporary directory)."""
        root = Path(root)
        final = root / self.version
        tmp = root / f".{self.version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays = {
            "item_ids": np.asarray(self.item_ids, dtype=str),
            "user_ids": np.asarray(self.user_ids, dtype=str),
            "item_categories": np.asarray([c or "" for c in self.item_categories], dtype=str),
            **self.embeddings.arrays(),
        }
        for source in self.sources.values():
            arrays.update(source.arrays())
        np.savez(tmp / "arrays.npz", **arrays)
        if self.ranker is not None:
            self.ranker.save(tmp / "ranker")
        if index is not None:
            index.save(tmp / "index")
        meta = {
            "version": self.version,
            "log_offset": self.log_offset,
            "metrics": self.metrics,
            "created": self.created,
            "ordering": self.ordering,
            "equalise_norms": self.equalise_norms,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> ModelBundle:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        with np.load(path / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        ranker = Ranker.load(path / "ranker", device=device) if (path / "ranker").exists() else None
        return cls(
            version=meta["version"],
            item_ids=arrays["item_ids"].tolist(),
            user_ids=arrays["user_ids"].tolist(),
            embeddings=Embeddings.load(arrays),
            sources={
                name: source
                for name, model in MODELS.items()
                if (source := model.load(arrays)) is not None
            },
            item_categories=[c or None for c in arrays["item_categories"].tolist()],
            ranker=ranker,
            ordering=meta.get("ordering", "ranker"),
            equalise_norms=bool(meta.get("equalise_norms", True)),
            log_offset=int(meta["log_offset"]),
            metrics=meta.get("metrics", {}),
            created=float(meta.get("created", 0.0)),
        )


def load_basis(version_dir: str | Path) -> Basis:
    """A saved version's `Basis`, without loading its models."""
    path = Path(version_dir)
    meta = json.loads((path / "meta.json").read_text())
    with np.load(path / "arrays.npz", allow_pickle=False) as z:
        ids, cats = z["item_ids"].tolist(), z["item_categories"].tolist()
    return Basis(meta["version"], ids, [c or None for c in cats], int(meta["log_offset"]))


def load_saved_index(version_dir: str | Path) -> Index | None:
    path = Path(version_dir) / "index"
    return load_index(path) if path.exists() else None


def new_version_name(now: float | None = None) -> str:
    t = time.time() if now is None else now
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime(t)) + f"-{int((t % 1) * 1e6):06d}"


def publish(root: str | Path, version: str) -> None:
    """Point CURRENT at `version` atomically."""
    root = Path(root)
    tmp = root / ".CURRENT.tmp"
    tmp.write_text(version)
    os.replace(tmp, root / "CURRENT")


def current_version(root: str | Path) -> str | None:
    path = Path(root) / "CURRENT"
    return path.read_text().strip() if path.exists() else None


def collect_versions(root: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest saved versions under root (by creation time; CURRENT's
    is never deleted) and any half-written save; returns the deleted version names. Replicas
    hold a loaded version in memory, so deleting its directory does not disturb them. Callers
    must not run it while a save is under way (the trainer calls it after publishing)."""
    root = Path(root)
    if not root.is_dir():
        return []
    current = current_version(root)
    saved = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(".") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and (path / "meta.json").exists():
            created = json.loads((path / "meta.json").read_text()).get("created", 0.0)
            saved.append((float(created), path.name))
    saved.sort(reverse=True)
    gone = [name for _, name in saved[max(keep, 1) :] if name != current]
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return gone
