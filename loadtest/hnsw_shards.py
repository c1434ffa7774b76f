"""HNSW shards benchmark: N items x D dims over shard actors, served as recall serves them.

    python -m loadtest.hnsw_shards                   # 1,000,000 x 64 over 2 shards (minutes)
    python -m loadtest.hnsw_shards --items 20000     # smoke run, under a minute

What it does, with the project's own code:
1. Data: a seeded Gaussian mixture shaped like the project's SVD embeddings (cluster centres and
   within-cluster spread with a decaying spectrum), unit-normalised (`--norms unit`, default) or
   with popularity-scaled norms as `rec.recall.embedding` produces them (`--norms degree`:
   item rows p = s v, fold-in rows q = v / s). Query users are built as recall builds them:
   the fold-in sum of their seen items' q rows, over 1-3 clusters ("interests"); the seen
   items are the query's exclusion list.
2. Build: each shard `i` holds items with `id % shards == i`, in an `HNSWIndex` with the same
   parameters as `ModelBundle.build_index` (RecallConfig defaults unless overridden, headroom
   slots, one hnswlib thread), built in parallel Ray tasks (one per shard, 0.5 CPU each, one
   thread each) and saved in the model-version layout (`<version>/index/shard_NNN`).
3. Serve: `deployments.shards.shard_actors` + `RemoteIndex` load the shards, exactly as
   `make_live` does with `serving.ann_shards`. Queries go through
   `deployments.stages.recall_with_index`, the Recall stage's embedding-search call
   (`RemoteIndex.asearch(user_vector(view), per_source, ann_filter(view))`: fan-out to every shard,
   `merge_topk`), from an asyncio driver. The rest of RecallStage (item-CF, user-CF, graph
   filter, trending over a trained 1M-item model and its event log) is stubbed out: wiring a
   full trained model at 1M items is impractical here, and those sources do not touch the
   index. Latency therefore is the ANN part of recall: one actor call per shard plus the merge.
4. Measure: build time per shard and wall (and the build's CPU seconds, which do not depend on
   what else runs on the machine), shard actor RSS (psutil, before and after loading)
   and the saved index size (`hnsw.bin`, the graph plus vectors), query latency p50/p99 with one
   request in flight and with `--concurrency` in flight, recall@k against exact numpy search
   (with the same exclusion list) on `--gt-queries` users, and a sweep of ef_search (set in the
   live shard actors; no rebuild).
5. Churn while serving: a query loop keeps running while `--churn` new items are added and
   `--churn` existing items (the hottest ones: those in the exact top-k of the test users) are
   deleted through `RemoteIndex.add` / `mark_deleted`, in batches paced over
   `--churn-seconds`. Checks: after each add batch, a query aimed at one new item finds it; no
   query submitted after an item's deletion ever returns it (during and after the churn); after
   the churn, recall@k against exact search over the new live set, added items found by queries
   aimed at them, deleted items never returned even by queries aimed at them.

Writes loadtest/results/hnsw_shards.json (or --out) and prints a table; exits 1 if a deleted item
ever came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rec.filters import NO_FILTERS

for _key, _value in (
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_AUTH_MODE", "disabled"),
    ("HNSWLIB_NO_NATIVE", "1"),
):
    os.environ.setdefault(_key, _value)

HERE = Path(__file__).resolve().parent
VERSION = "bench-v1"
GT_BLOCK_CELLS = 1 << 25  # exact search scores at most this many (query, item) pairs at once


# ---------------------------------------------------------------------------------------------
# Data


class Mixture:
    """Seeded Gaussian mixture of item directions with a decaying spectrum, plus item norms.

    Centres ~ N(0, diag(j^-decay)) normalised; an item is centre + spread * noise with the same
    spectral shape, normalised to a unit direction v. Norms s are 1 (`unit`) or log-normal with
    median 1 and sigma `norm_sigma` (`degree`, like sqrt(item degree) in the SVD embeddings).
    """

    def __init__(
        self,
        dim: int,
        clusters: int,
        spread: float,
        decay: float,
        norms: str,
        norm_sigma: float,
        seed: int,
    ) -> None:
        self.dim, self.clusters, self.norms, self.norm_sigma = dim, clusters, norms, norm_sigma
        self.rng = np.random.default_rng(seed)
        spectrum = (np.arange(dim) + 1.0) ** -decay
        centres = self.rng.standard_normal((clusters, dim)) * spectrum
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.noise_scale = spread * spectrum / np.sqrt((spectrum**2).sum())

    def items(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit directions float32 [n, dim], norms float32 [n], cluster of each item [n])."""
        cluster = self.rng.integers(0, self.clusters, n)
        dirs = np.empty((n, self.dim), np.float32)
        for start in range(0, n, 100_000):
            c = cluster[start : start + 100_000]
            x = self.centres[c] + self.rng.standard_normal((len(c), self.dim)) * self.noise_scale
            dirs[start : start + len(c)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        if self.norms == "unit":
            norms = np.ones(n, np.float32)
        else:
            norms = np.exp(self.norm_sigma * self.rng.standard_normal(n)).astype(np.float32)
        return dirs, norms, cluster


def make_users(
    mix: Mixture, dirs: np.ndarray, norms: np.ndarray, cluster: np.ndarray, n_users: int, seen: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Users of 1-3 interests: `seen` items drawn from that many clusters; the query vector is
    their fold-in sum of q = v / s (v when norms are unit). Returns (queries, seen ids, interests)."""
    by_cluster = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[by_cluster], np.arange(mix.clusters + 1))
    queries = np.empty((n_users, mix.dim), np.float32)
    filters, interests = [], np.empty(n_users, np.int64)
    for u in range(n_users):
        k = int(mix.rng.integers(1, 4))
        picked = []
        for c, m in zip(
            mix.rng.choice(mix.clusters, k, replace=False),
            np.array_split(np.arange(seen), k),
            strict=True,
        ):
            members = by_cluster[bounds[c] : bounds[c + 1]]
            if len(members) and len(m):
                picked.append(members[mix.rng.integers(0, len(members), len(m))])
        ids = np.unique(np.concatenate(picked)) if picked else np.empty(0, np.int64)
        queries[u] = (dirs[ids] / norms[ids, None]).sum(axis=0)
        filters.append(ids.astype(np.int64))
        interests[u] = k
    return queries, filters, interests


def exact_topk(
    items: np.ndarray, alive: np.ndarray, queries: np.ndarray, filters: list[np.ndarray], k: int
) -> np.ndarray:
    """Exact inner-product top-k ids per query over live rows, each query's filter excluded."""
    bias = np.where(alive, 0.0, -np.inf).astype(np.float32)
    block = max(1, GT_BLOCK_CELLS // len(items))
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ items.T
        scores += bias
        for r, f in enumerate(filters[start : start + block]):
            scores[r, f] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at(found: list[np.ndarray], exact: np.ndarray) -> np.ndarray:
    return np.array(
        [
            len(np.intersect1d(f[f >= 0], e)) / exact.shape[1]
            for f, e in zip(found, exact, strict=True)
        ]
    )


def pct(ms: list[float] | np.ndarray) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


# ---------------------------------------------------------------------------------------------
# Functions run inside the shard actors (Ray's `__ray_call__`: fn(actor_instance, *args))


def _actor_stats(self, version: str) -> dict:
    import psutil

    index = self.versions.get(version)
    return {
        "pid": os.getpid(),
        "rss_bytes": psutil.Process().memory_info().rss,
        "live_items": len(index) if index is not None else 0,
    }


def _set_ef(self, version: str, ef: int) -> None:
    self.versions[version].ef_search = ef


# ---------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from rec.config import RecallConfig

    rc = RecallConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=rc.embedding_dim)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--queries", type=int, default=1000, help="latency queries (users)")
    p.add_argument(
        "--gt-queries",
        type=int,
        default=500,
        help="of those, how many get exact ground truth for recall",
    )
    p.add_argument("--k", type=int, default=rc.per_source, help="top-k (RecallConfig.per_source)")
    p.add_argument("--seen", type=int, default=20, help="seen items per user (the exclusion list)")
    p.add_argument("--m", type=int, default=rc.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=rc.hnsw_ef_construction)
    p.add_argument("--ef-search", type=int, default=rc.hnsw_ef_search)
    p.add_argument(
        "--ef-sweep", default="256,512", help="extra ef_search values to try (comma list)"
    )
    p.add_argument(
        "--headroom",
        type=int,
        default=rc.index_headroom,
        help="free slots per shard (RecallConfig.index_headroom)",
    )
    p.add_argument("--clusters", type=int, default=None, help="mixture components (items/1000)")
    p.add_argument("--spread", type=float, default=0.7, help="within-cluster noise norm")
    p.add_argument("--decay", type=float, default=0.5, help="spectrum exponent j^-decay")
    p.add_argument("--norms", choices=("unit", "degree"), default="unit")
    p.add_argument(
        "--norm-sigma", type=float, default=1.0, help="log-normal sigma (--norms degree)"
    )
    p.add_argument("--concurrency", type=int, default=8, help="in-flight queries, throughput pass")
    p.add_argument("--churn", type=int, default=None, help="items added and deleted (items/100)")
    p.add_argument("--churn-batch", type=int, default=None, help="items per batch (churn/100)")
    p.add_argument("--churn-seconds", type=float, default=None, help="pace (20 s; 3 s below 200k)")
    p.add_argument(
        "--shard-cpus",
        type=float,
        default=None,
        help="num_cpus per shard actor (serving.replica_cpus / 2, as make_live)",
    )
    p.add_argument("--build-cpus", type=float, default=0.5, help="num_cpus per build task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where shard indexes are saved (a temp dir)")
    p.add_argument("--keep-index", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "hnsw_shards.json"))
    a = p.parse_args(argv)
    a.clusters = a.clusters or max(10, a.items // 1000)
    a.churn = a.items // 100 if a.churn is None else a.churn
    a.churn_batch = a.churn_batch or max(1, a.churn // 100)
    a.churn_seconds = a.churn_seconds or (20.0 if a.items >= 200_000 else 3.0)
    a.gt_queries = min(a.gt_queries, a.queries)
    if a.shards < 1 or a.items < a.shards or a.k < 1:
        p.error("need items >= shards >= 1 and k >= 1")
    return a


def _stages_path():
    """The Recall stage's ANN call, or None when deployments.stages cannot be imported (the
    benchmark then calls RemoteIndex.asearch with the same arguments)."""
    try:
        from deployments.stages import recall_with_index
    except Exception as exc:  # noqa: BLE001 - report and fall back, the measurement is the same call
        print(
            f"note: deployments.stages not importable ({exc!r}); calling RemoteIndex.asearch",
            file=sys.stderr,
        )
        return None
    return recall_with_index


class _RecallStub:
    """The slice of Recommender that `recall_with_index` uses: the index, the user vector, the
    seen-items filter and `recalled(view, ..., ann=...)`, which here returns the ANN result
    unchanged."""

    def __init__(self, index, config) -> None:
        self.index = index
        self.config = config
        self.recaller = self

    def user_vector(self, view) -> np.ndarray:
        return view.vec

    def ann_filter(self, view, filters=None) -> np.ndarray:
        return view.filter_ids

    def recalled(self, view, context=None, ann=None, rank=False, filters=None):
        return ann


def build_shards(ray, vectors: np.ndarray, a: argparse.Namespace, version_dir: Path) -> dict:
    """Build every shard in parallel Ray tasks (one hnswlib thread each) and save them."""

    @ray.remote(num_cpus=a.build_cpus)
    def build_shard(vectors: np.ndarray, shard: int, path: str) -> dict:
        from rec.index import HNSWIndex

        ids = np.arange(len(vectors), dtype=np.int64)
        mine = ids[ids % a.shards == shard]
        t0, cpu0 = time.perf_counter(), time.thread_time()
        # The parameters of ModelBundle.build_index: room for the headroom, one thread.
        index = HNSWIndex(
            a.dim,
            max_elements=len(mine) + a.headroom + 1,
            m=a.m,
            ef_construction=a.ef_construction,
            ef_search=a.ef_search,
            num_threads=1,
        )
        index.add(mine, vectors[mine])
        build_s, build_cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
        t0 = time.perf_counter()
        index.save(path)
        return {
            "shard": shard,
            "items": int(len(mine)),
            "build_s": round(build_s, 2),
            "save_s": round(time.perf_counter() - t0, 2),
            "build_cpu_s": round(build_cpu_s, 2),
            "index_file_bytes": (Path(path) / "hnsw.bin").stat().st_size,
        }

    t0 = time.perf_counter()
    ref = ray.put(vectors)
    parts = ray.get(
        [
            build_shard.remote(ref, s, str(version_dir / "index" / f"shard_{s:03d}"))
            for s in range(a.shards)
        ]
    )
    del ref
    (version_dir / "index" / "index.json").write_text(
        json.dumps({"kind": "sharded", "shards": a.shards})
    )
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "parallel_tasks": a.shards,
        "cpus_per_task": a.build_cpus,
        "hnswlib_threads_per_task": 1,
        "shards": parts,
    }


async def run(a: argparse.Namespace) -> dict:
    import ray

    from deployments.shards import RemoteIndex, shard_actors
    from rec.config import RecConfig

    result: dict = {
        "args": vars(a).copy(),
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
    }
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    result["phases_s"] = phases

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 2)
        return now

    # ---- data ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    mix = Mixture(a.dim, a.clusters, a.spread, a.decay, a.norms, a.norm_sigma, a.seed)
    dirs, norms, cluster = mix.items(a.items)
    items = dirs * norms[:, None]
    queries, filters, interests = make_users(mix, dirs, norms, cluster, a.queries, a.seen)
    gt_q, gt_f = queries[: a.gt_queries], filters[: a.gt_queries]
    alive = np.ones(a.items, bool)
    t1 = time.perf_counter()
    exact = exact_topk(items, alive, gt_q, gt_f, a.k)
    result["data"] = {
        "generate_s": round(t1 - t0, 2),
        "exact_search_s": round(time.perf_counter() - t1, 2),
        "exact_search_ms_per_query": round((time.perf_counter() - t1) / len(gt_q) * 1e3, 2),
        "users_by_interests": {int(k): int((interests == k).sum()) for k in (1, 2, 3)},
    }
    print(
        f"data: {a.items:,} x {a.dim} ({a.norms} norms, {a.clusters} clusters) in "
        f"{t1 - t0:.1f}s; exact top-{a.k} for {len(gt_q)} users in {time.perf_counter() - t1:.1f}s",
        flush=True,
    )

    config = RecConfig()
    config.recall.per_source = a.k
    shard_cpus = a.shard_cpus or config.serving.replica_cpus / 2
    t = phase("data", t_start)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=max(512 << 20, 2 * items.nbytes),
    )
    t = phase("ray_init", t)
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hnsw_shards_"))
    version_dir = workdir / VERSION
    try:
        # ---- build -------------------------------------------------------------------------
        print(
            f"building {a.shards} shards in parallel (M={a.m}, ef_construction="
            f"{a.ef_construction}, 1 thread each) ...",
            flush=True,
        )
        result["build"] = build_shards(ray, items, a, version_dir)
        t = phase("build", t)

        # ---- serve -------------------------------------------------------------------------
        shards = shard_actors(a.shards, shard_cpus)
        before = await asyncio.gather(
            *[s.__ray_call__.remote(_actor_stats, VERSION) for s in shards]
        )
        t0 = time.perf_counter()
        index = RemoteIndex(shards, VERSION, version_dir)
        load_s = time.perf_counter() - t0
        loaded = await asyncio.gather(
            *[s.__ray_call__.remote(_actor_stats, VERSION) for s in shards]
        )
        result["serve"] = {
            "load_s": round(load_s, 2),
            "shard_num_cpus": shard_cpus,
            "live_items": len(index),
        }
        for part, b, m in zip(result["build"]["shards"], before, loaded, strict=True):
            part.update(
                rss_empty_actor_mib=round(b["rss_bytes"] / 2**20, 1),
                rss_loaded_mib=round(m["rss_bytes"] / 2**20, 1),
                rss_index_mib=round((m["rss_bytes"] - b["rss_bytes"]) / 2**20, 1),
                index_file_mib=round(part["index_file_bytes"] / 2**20, 1),
            )

        t = phase("load", t)
        recall_with_index = _stages_path()
        t = phase("import_stages", t)
        stub = _RecallStub(index, config)
        result["serve"]["query_path"] = (
            "deployments.stages.recall_with_index -> RemoteIndex.asearch"
            if recall_with_index
            else "RemoteIndex.asearch"
        )

        async def search(q: np.ndarray, f: np.ndarray) -> np.ndarray:
            if recall_with_index is None:
                return (await index.asearch(q, a.k, f))[0]
            view = SimpleNamespace(vec=q, filter_ids=f)
            return (await recall_with_index(stub, view, None, False, NO_FILTERS))[0]

        async def timed_pass(order: list[int], concurrency: int) -> tuple[list, list, float]:
            lat, found = [0.0] * len(order), [None] * len(order)
            queue = list(enumerate(order))[::-1]

            async def worker() -> None:
                while queue:
                    pos, u = queue.pop()
                    t = time.perf_counter()
                    found[pos] = await search(queries[u], filters[u])
                    lat[pos] = (time.perf_counter() - t) * 1e3

            t = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(concurrency)])
            return lat, found, time.perf_counter() - t

        await timed_pass(list(range(min(50, a.queries))), 1)  # warm-up
        everyone = list(range(a.queries))
        lat1, found1, wall1 = await timed_pass(everyone, 1)
        latc, _, wallc = await timed_pass(everyone, a.concurrency)
        rec = recall_at(found1[: a.gt_queries], exact)
        result["query"] = {
            "k": a.k,
            "ef_search": a.ef_search,
            "effective_ef": f"max(ef_search, k + |seen|) = max({a.ef_search}, {a.k}+~{a.seen})",
            "sequential": {**pct(lat1), "qps": round(len(everyone) / wall1, 1)},
            f"concurrency_{a.concurrency}": {**pct(latc), "qps": round(len(everyone) / wallc, 1)},
            "recall_at_k": round(float(rec.mean()), 4),
            "recall_p5": round(float(np.percentile(rec, 5)), 3),
            "recall_min": round(float(rec.min()), 3),
            "recall_by_interests": {
                int(k): round(float(rec[interests[: a.gt_queries] == k].mean()), 4)
                for k in (1, 2, 3)
                if (interests[: a.gt_queries] == k).any()
            },
        }
        print(
            f"query: p50 {result['query']['sequential']['p50_ms']} ms, p99 "
            f"{result['query']['sequential']['p99_ms']} ms, recall@{a.k} "
            f"{result['query']['recall_at_k']}",
            flush=True,
        )

        t = phase("queries", t)
        # ---- ef_search sweep (set in the live actors; the graph is unchanged) ---------------
        sweep = []
        for ef in sorted({a.ef_search, *(int(x) for x in a.ef_sweep.split(",") if x.strip())}):
            await asyncio.gather(*[s.__ray_call__.remote(_set_ef, VERSION, ef) for s in shards])
            lat, found, _ = await timed_pass(list(range(a.gt_queries)), 1)
            r = recall_at(found, exact)
            sweep.append(
                {
                    "ef_search": ef,
                    "recall_at_k": round(float(r.mean()), 4),
                    "recall_p5": round(float(np.percentile(r, 5)), 3),
                    **pct(lat),
                }
            )
        await asyncio.gather(
            *[s.__ray_call__.remote(_set_ef, VERSION, a.ef_search) for s in shards]
        )
        result["ef_sweep"] = sweep
        t = phase("ef_sweep", t)

        # ---- churn while serving -------------------------------------------------------------
        result["churn"] = await churn(
            a, mix, index, shards, search, items, alive, dirs, norms, queries, filters, exact
        )
        after = await asyncio.gather(
            *[s.__ray_call__.remote(_actor_stats, VERSION) for s in shards]
        )
        for part, m in zip(result["build"]["shards"], after, strict=True):
            part["rss_after_churn_mib"] = round(m["rss_bytes"] / 2**20, 1)
            part["live_after_churn"] = m["live_items"]
        t = phase("churn", t)
    finally:
        ray.shutdown()
        if not a.keep_index and not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    phase("shutdown", t)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    return result


async def churn(
    a,
    mix: Mixture,
    index,
    shards,
    search,
    items: np.ndarray,
    alive: np.ndarray,
    dirs: np.ndarray,
    norms: np.ndarray,
    queries: np.ndarray,
    filters: list[np.ndarray],
    exact: np.ndarray,
) -> dict:
    """Add and delete `a.churn` items each while a query loop runs; verify both."""
    n = a.items
    add_dirs, add_norms, _ = mix.items(a.churn)
    add_ids = np.arange(n, n + a.churn, dtype=np.int64)
    add_vecs = add_dirs * add_norms[:, None]
    hot = np.unique(exact)
    cold = np.setdiff1d(np.arange(n), hot)
    take_hot = min(len(hot), a.churn)
    del_ids = np.concatenate(
        [
            mix.rng.choice(hot, take_hot, replace=False),
            mix.rng.choice(cold, a.churn - take_hot, replace=False),
        ]
    )
    mix.rng.shuffle(del_ids)
    del_pos = np.full(n + a.churn, np.iinfo(np.int64).max)  # order of deletion, per id
    del_pos[del_ids] = np.arange(a.churn)
    batches = [
        (
            add_ids[i : i + a.churn_batch],
            add_vecs[i : i + a.churn_batch],
            del_ids[i : i + a.churn_batch],
        )
        for i in range(0, a.churn, a.churn_batch)
    ]
    pace = a.churn_seconds / max(1, len(batches))
    state = {"deleted": 0}
    stop = asyncio.Event()
    loop_log: list[tuple[float, float, int, np.ndarray]] = []  # (t, ms, deleted-before, ids)
    probes: list[tuple[float, int, np.ndarray, int, np.ndarray]] = []  # (ms, batch, q, id, found)
    t_zero = time.perf_counter()

    async def query_loop() -> None:
        u = 0
        while not stop.is_set():
            snapshot = state["deleted"]  # submissions below happen before any other task runs
            t = time.perf_counter()
            ids = await search(queries[u % len(queries)], filters[u % len(queries)])
            loop_log.append((t - t_zero, (time.perf_counter() - t) * 1e3, snapshot, ids))
            u += 1

    async def churner() -> tuple[float, float]:
        await asyncio.sleep(min(2.0, a.churn_seconds / 4))  # a little load before the churn
        t_begin = time.perf_counter() - t_zero
        for b, (ids, vecs, dels) in enumerate(batches):
            t = time.perf_counter()
            index.add(ids, vecs)
            index.mark_deleted(dels)
            state["deleted"] += len(dels)
            # read-your-writes: a query aimed at a new item, submitted after its add
            j = int(ids[0]) - n
            target = add_dirs[j] / (add_norms[j] if a.norms == "degree" else 1.0)
            got = await search(target, np.empty(0, np.int64))
            probes.append(((time.perf_counter() - t) * 1e3, b, target, int(ids[0]), got))
            if b + 1 < len(batches):
                await asyncio.sleep(max(0.0, pace - (time.perf_counter() - t)))
        return t_begin, time.perf_counter() - t_zero

    looper = asyncio.create_task(query_loop())
    t_begin, t_end = await churner()
    await asyncio.sleep(1.0)
    stop.set()
    await looper

    def returned_deleted(ids: np.ndarray, snapshot: int) -> int:
        ids = ids[ids >= 0]
        return int((del_pos[ids] < snapshot).sum())

    during = [ms for t, ms, _, _ in loop_log if t_begin <= t <= t_end]
    before = [ms for t, ms, _, _ in loop_log if t < t_begin]
    bad_during = sum(returned_deleted(ids, snap) for _, _, snap, ids in loop_log)

    # ---- after the churn: exact search over the new live set --------------------------------
    all_items = np.concatenate([items, add_vecs])
    live = np.concatenate([alive, np.ones(a.churn, bool)])
    live[del_ids] = False
    # Each probe against exact search over the items live when it ran (with unit norms the
    # aimed-at item is always the exact top-1; with degree norms it need not be in the top-k).
    probe_should, probe_found = [], []
    for _, b, target, new_id, got in probes:
        done = (b + 1) * a.churn_batch
        mask = np.concatenate([alive, np.zeros(a.churn, bool)])
        mask[add_ids[:done]] = True
        mask[del_ids[:done]] = False
        top = exact_topk(all_items, mask, target[None], [np.empty(0, np.int64)], a.k)[0]
        probe_should.append(new_id in top)
        probe_found.append(new_id in top and new_id in got)
    gt_q, gt_f = queries[: a.gt_queries], filters[: a.gt_queries]
    exact_after = exact_topk(all_items, live, gt_q, gt_f, a.k)
    found_after = [await search(q, f) for q, f in zip(gt_q, gt_f, strict=True)]
    rec_after = recall_at(found_after, exact_after)
    bad_after = sum(returned_deleted(ids, a.churn) for ids in found_after)

    sample = min(1000, a.churn)
    rng = np.random.default_rng(a.seed + 1)
    # queries aimed at added items: their own direction (fold-in row of a one-item user)
    add_pick = rng.choice(a.churn, sample, replace=False)
    add_q = add_dirs[add_pick] / (add_norms[add_pick, None] if a.norms == "degree" else 1.0)
    none = [np.empty(0, np.int64)] * sample
    add_exact = exact_topk(all_items, live, add_q, none, a.k)
    add_found = [await search(q, f) for q, f in zip(add_q, none, strict=True)]
    should = np.array([add_ids[j] in e for j, e in zip(add_pick, add_exact, strict=True)])
    got = np.array([add_ids[j] in f for j, f in zip(add_pick, add_found, strict=True)])
    # queries aimed at deleted items: their own direction
    del_pick = rng.choice(del_ids, sample, replace=False)
    del_q = dirs[del_pick] / (norms[del_pick, None] if a.norms == "degree" else 1.0)
    del_found = [await search(q, f) for q, f in zip(del_q, none, strict=True)]
    bad_aimed = sum(returned_deleted(ids, a.churn) for ids in del_found)

    probe_ms = [p[0] for p in probes]
    return {
        "added": a.churn,
        "deleted": a.churn,
        "deleted_hot": take_hot,
        "batch": a.churn_batch,
        "batches": len(batches),
        "seconds": round(t_end - t_begin, 2),
        "latency_before": pct(before),
        "latency_during": pct(during),
        "queries_during": len(during),
        "add_then_query_probe": {
            **pct(probe_ms),
            "found": int(sum(probe_found)),
            "in_exact_topk": int(sum(probe_should)),
            "of": len(probes),
        },
        "deleted_returned_during_churn": bad_during,
        "deleted_returned_after": bad_after,
        "deleted_returned_to_queries_aimed_at_them": bad_aimed,
        "deleted_aimed_queries": sample,
        "recall_at_k_after": round(float(rec_after.mean()), 4),
        "added_aimed_queries": sample,
        "added_in_exact_topk": int(should.sum()),
        "added_found": int((got & should).sum()),
        "added_found_rate": round(float((got & should).sum() / max(1, should.sum())), 4),
        "added_found_top1": int(
            sum(int(f[0]) == add_ids[j] for j, f in zip(add_pick, add_found, strict=True))
        ),
    }


def print_table(r: dict) -> None:
    a = r["args"]
    b, q, c = r["build"], r["query"], r["churn"]
    probe = c["add_then_query_probe"]
    print()
    print(
        f"HNSW shards: {a['items']:,} items x {a['dim']} dims ({a['norms']} norms, "
        f"{a['clusters']} clusters), {a['shards']} shard actors, k={a['k']}, "
        f"M={a['m']}, ef_construction={a['ef_construction']}, ef_search={a['ef_search']}"
    )
    print(f"query path: {r['serve']['query_path']}")
    print(
        f"build: {b['wall_s']} s wall, {b['parallel_tasks']} tasks in parallel x 1 hnswlib "
        f"thread ({os.cpu_count()} cores, shared); load into actors {r['serve']['load_s']} s"
    )
    print(
        f"{'shard':>5} {'items':>9} {'build s':>8} {'save s':>7} {'file MiB':>9} "
        f"{'RSS empty':>10} {'RSS loaded':>11} {'RSS index':>10} {'RSS churned':>12}"
    )
    for s in b["shards"]:
        print(
            f"{s['shard']:>5} {s['items']:>9,} {s['build_s']:>8} {s['save_s']:>7} "
            f"{s['index_file_mib']:>9} {s['rss_empty_actor_mib']:>10} {s['rss_loaded_mib']:>11} "
            f"{s['rss_index_mib']:>10} {s.get('rss_after_churn_mib', ''):>12}"
        )
    seq, con = q["sequential"], q[f"concurrency_{a['concurrency']}"]
    print(f"{'latency':<26} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'qps':>7}")
    for name, s in (
        ("1 in flight", seq),
        (f"{a['concurrency']} in flight", con),
        ("1 in flight, before churn", c["latency_before"]),
        ("1 in flight, during churn", c["latency_during"]),
        ("add then query (probe)", c["add_then_query_probe"]),
    ):
        print(
            f"{name:<26} {s.get('n', 0):>6} {s.get('p50_ms', ''):>8} {s.get('p99_ms', ''):>8} "
            f"{s.get('max_ms', ''):>8} {s.get('qps', ''):>7}"
        )
    print(
        f"recall@{a['k']} vs exact: {q['recall_at_k']} (p5 {q['recall_p5']}, min "
        f"{q['recall_min']}); by interests {q['recall_by_interests']}"
    )
    print(f"{'ef_search':>9} {'recall':>7} {'p5':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for s in r["ef_sweep"]:
        print(
            f"{s['ef_search']:>9} {s['recall_at_k']:>7} {s['recall_p5']:>6} {s['p50_ms']:>7} "
            f"{s['p99_ms']:>7}"
        )
    print(
        f"churn: +{c['added']:,} / -{c['deleted']:,} items ({c['deleted_hot']:,} of them hot) in "
        f"{c['batches']} batches over {c['seconds']} s while querying"
    )
    print(
        f"  new item found by the next query: {probe['found']}/{probe['in_exact_topk']} that "
        f"exact search ranks in the top-k ({probe['of']} probes); aimed queries: "
        f"{c['added_found']}/{c['added_in_exact_topk']} found (top-1 {c['added_found_top1']}/"
        f"{c['added_aimed_queries']})"
    )
    print(
        f"  deleted items returned: during {c['deleted_returned_during_churn']}, after "
        f"{c['deleted_returned_after']}, to {c['deleted_aimed_queries']} queries aimed at them "
        f"{c['deleted_returned_to_queries_aimed_at_them']}"
    )
    print(f"  recall@{a['k']} after churn vs exact over the new live set: {c['recall_at_k_after']}")
    print(f"phases (s): {r['phases_s']}")
    print(
        f"total {r['total_s']} s; load average {r['machine']['loadavg_start']} -> "
        f"{r['machine']['loadavg_end']}"
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = asyncio.run(run(a))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {out}")
    c = result["churn"]
    ok = (
        c["deleted_returned_during_churn"] == 0
        and c["deleted_returned_after"] == 0
        and c["deleted_returned_to_queries_aimed_at_them"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
