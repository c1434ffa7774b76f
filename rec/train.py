"""Training from a log snapshot: recall models, ranker examples, the ranker, one model version.

The ranker learns from the future: recall models are fitted on each user's earlier events,
the held-out later ones are replayed through the serving pipeline, and
each positive event becomes one example (the item that came next) plus sampled negatives, with
features computed by the very code that serves. The final recall models are then refitted on
the whole log and their embeddings rotated onto the basis the ranker learned on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.linalg import orthogonal_procrustes

from rec.config import RecConfig
from rec.eventlog import SCHEMA
from rec.events import KIND_EVENT, KIND_IMPRESSION, KIND_ITEM, parse_context
from rec.model import ModelBundle, new_version_name
from rec.pipeline import DENSE_FEATURES, ORDERINGS, Recommender
from rec.profile import event_weight
from rec.ranker import Ranker
from rec.recall import Embeddings, GraphFilter, ItemCF, UserCF, interaction_matrix, top_n

log = logging.getLogger(__name__)
HARD_POOL = 100  # hard negatives are drawn from the top of the recall scores
VALIDATION_EVENTS = 400  # held-out events that choose the graph filter's β, γ and the ordering
VALIDATION_K = 20
SHARPEN_GRID = (0.0, 0.4, 0.8)
POP_GRID = (0.0, 0.1, 0.2)

# Hook that trains the ranker on assembled examples (Ray Train supplies a distributed one).
FitRanker = Callable[[Ranker, "Examples"], dict]


@dataclass
class Examples:
    item_idx: np.ndarray
    user_vec: np.ndarray
    item_vec: np.ndarray
    dense: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def fit_ranker_locally(ranker: Ranker, ex: Examples) -> dict:
    return ranker.fit(ex.item_idx, ex.user_vec, ex.item_vec, ex.dense, ex.labels)


def train(table: pa.Table, config: RecConfig, *, log_offset: int | None = None,
          fit_ranker: FitRanker | None = fit_ranker_locally, version: str | None = None) -> ModelBundle:
    """A new model version from a log snapshot (`rec.eventlog.SCHEMA` columns)."""
    t0 = time.perf_counter()
    records = table.to_pylist()
    events = [r for r in records if r["kind"] == KIND_EVENT]
    if not events:
        raise ValueError("the log holds no events to train on")
    events.sort(key=lambda r: (r["ts"], r.get("offset", 0)))
    item_ids, categories = _item_order(records)
    user_ids = list(dict.fromkeys(r["user_id"] for r in events))
    item_index = {i: n for n, i in enumerate(item_ids)}
    user_index = {u: n for n, u in enumerate(user_ids)}

    prefix_events, suffix_events = holdout_split(events, config)
    metrics: dict = {"events": len(events), "users": len(user_ids), "items": len(item_ids)}

    ranker = None
    basis: Embeddings | None = None
    sharpen, pop, ordering = config.recall.gf_sharpen, 0.0, "ranker"
    if fit_ranker is not None and prefix_events and suffix_events:
        prefix = _fit_recall(prefix_events, item_index, user_index, config, categories,
                             item_ids, user_ids)
        (sharpen, pop), metrics["gf_validation_ndcg"] = choose_graph_filter(
            prefix, prefix_events, suffix_events, config)
        prefix.graph.sharpen, prefix.graph.pop = sharpen, pop
        basis = prefix.embeddings
        ex = assemble_examples(prefix, records, prefix_events, suffix_events, config,
                               _impressions(records))
        metrics["ranker_examples"] = len(ex)
        if len(ex) and 0 < ex.labels.mean() < 1:
            ranker = Ranker(config.ranker, len(item_ids), basis.dim, len(DENSE_FEATURES),
                            list(DENSE_FEATURES))
            metrics["ranker"] = fit_ranker(ranker, ex)
            prefix.ranker = ranker
            ordering, metrics["ordering_ndcg"] = choose_ordering(
                prefix, records, prefix_events, suffix_events, config)

    final = _fit_recall(events, item_index, user_index, config, categories, item_ids, user_ids)
    final.graph.sharpen, final.graph.pop = sharpen, pop
    final.ordering = ordering
    if basis is not None:
        rot, _ = orthogonal_procrustes(final.embeddings.item, basis.item)
        final.embeddings = Embeddings(final.embeddings.query @ rot, final.embeddings.item @ rot)
    final.ranker = ranker
    final.version = version or new_version_name()
    final.log_offset = (log_offset if log_offset is not None
                        else max((r.get("offset") or 0) for r in records) + 1)
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    final.metrics = metrics
    return final


def _validation_sample(suffix: list[dict], config: RecConfig) -> list[int]:
    """Evenly spread positions of positive held-out events used to choose settings."""
    positive = [n for n, r in enumerate(suffix)
                if event_weight(r["type"], r.get("value"), config.profile) > 0]
    step = max(1, len(positive) // VALIDATION_EVENTS)
    return positive[::step][:VALIDATION_EVENTS]


def _gain(ranked: np.ndarray, item: int) -> float:
    """NDCG@K of one relevant item in a ranked list."""
    hit = np.flatnonzero(ranked[:VALIDATION_K] == item)
    return float(1.0 / np.log2(hit[0] + 2)) if len(hit) else 0.0


def choose_graph_filter(prefix: ModelBundle, prefix_events: list[dict], suffix: list[dict],
                        config: RecConfig) -> tuple[tuple[float, float], dict]:
    """The graph filter's sharpening β and degree exponent γ with the best NDCG@20 on held-out
    events, each scored from its user's earlier history (a small validation search in fit)."""
    index = {i: n for n, i in enumerate(prefix.item_ids)}
    history: dict[str, set[int]] = {}
    for r in prefix_events:
        if event_weight(r["type"], r.get("value"), config.profile) > 0:
            history.setdefault(r["user_id"], set()).add(index[r["item_id"]])
    cases = [(np.fromiter(history[suffix[n]["user_id"]], np.int64), index[suffix[n]["item_id"]])
             for n in _validation_sample(suffix, config) if suffix[n]["user_id"] in history]
    cases = [(h, i) for h, i in cases if i not in set(h.tolist())]
    default = (config.recall.gf_sharpen, 0.0)
    if not cases:
        return default, {}
    graph, keep = prefix.graph, (prefix.graph.sharpen, prefix.graph.pop)
    results: dict[str, float] = {}
    for beta in SHARPEN_GRID:
        graph.sharpen, graph.pop = beta, 0.0
        base = [graph.scores(h, np.ones(len(h), np.float32), prefix.n_items) for h, _ in cases]
        for gamma in POP_GRID:
            weight = np.power(graph.item_degree + 1.0, gamma)
            gains = []
            for (hist, item), s in zip(cases, base, strict=True):
                s = s * weight
                s[hist] = -np.inf
                gains.append(_gain(top_n(s, VALIDATION_K, min_score=-np.inf)[0], item))
            results[f"beta={beta},gamma={gamma}"] = round(float(np.mean(gains)), 5)
    graph.sharpen, graph.pop = keep
    best = max(((b, g) for b in SHARPEN_GRID for g in POP_GRID),
               key=lambda bg: (results[f"beta={bg[0]},gamma={bg[1]}"], bg == default))
    return best, results


def choose_ordering(prefix: ModelBundle, records: list[dict], prefix_events: list[dict],
                    suffix: list[dict], config: RecConfig) -> tuple[str, dict]:
    """Order the final list by the ranker only where it earns its place: replay held-out events
    through the whole pipeline (recall included) and compare NDCG@20 of the ranker's order
    with the recall-score orders; the best one is served."""
    rec = Recommender(config, prefix, index=None)
    rec.apply([r for r in records if r["kind"] == KIND_ITEM])
    rec.apply(prefix_events)
    sample = set(_validation_sample(suffix, config))
    gains: dict[str, list[float]] = {name: [] for name in ORDERINGS}
    for n, r in enumerate(suffix):
        if n in sample:
            view = rec.view(r["user_id"])
            cands = rec.recall(view)
            ids = np.asarray(cands.item_ids)
            context = _context_of(r)
            for name in ORDERINGS:
                scores = rec.order_scores(view, cands, context, name)
                ranked = ids[np.argsort(-scores, kind="stable")]
                gains[name].append(_gain(ranked, r["item_id"]))
        rec.apply([r])
    results = {name: round(float(np.mean(g)), 5) for name, g in gains.items() if g}
    if not results:
        return "ranker", {}
    return max(ORDERINGS, key=lambda name: (results[name], name == "ranker")), results


def holdout_split(events: list[dict], config: RecConfig) -> tuple[list[dict], list[dict]]:
    """Events (in time order) split into what the ranker's recall models see and the held-out
    events it learns to predict: each user's last `holdout_fraction` of events ("last", for
    logs with real time) or a seeded random share of them ("random", for data without time).
    Fewer than 50 events: nothing is held out."""
    tc = config.train
    if len(events) < 50:
        return events, []
    by_user: dict[str, list[int]] = {}
    for n, r in enumerate(events):
        by_user.setdefault(r["user_id"], []).append(n)
    rng = np.random.default_rng(config.seed)
    held = np.zeros(len(events), bool)
    for rows in by_user.values():
        n_out = int(len(rows) * tc.holdout_fraction)
        if n_out == 0:
            continue
        out = rows[-n_out:] if tc.holdout == "last" else rng.choice(rows, n_out, replace=False)
        held[out] = True
    return ([r for r, h in zip(events, held, strict=True) if not h],
            [r for r, h in zip(events, held, strict=True) if h])


def _item_order(records: list[dict]) -> tuple[list[str], dict[str, str | None]]:
    """Items in order of first appearance, with the latest category seen for each."""
    order: dict[str, None] = {}
    categories: dict[str, str | None] = {}
    for r in records:
        if r["kind"] in (KIND_EVENT, KIND_ITEM) and r["item_id"]:
            order.setdefault(r["item_id"], None)
            if r["kind"] == KIND_ITEM and r.get("payload"):
                categories[r["item_id"]] = json.loads(r["payload"]).get("category")
    return list(order), categories


def _fit_recall(events: list[dict], item_index: dict[str, int], user_index: dict[str, int],
                config: RecConfig, categories: dict[str, str | None], item_ids: list[str],
                user_ids: list[str]) -> ModelBundle:
    rc = config.recall
    users = np.asarray([user_index[r["user_id"]] for r in events], np.int64)
    items = np.asarray([item_index[r["item_id"]] for r in events], np.int64)
    w = np.asarray([event_weight(r["type"], r.get("value"), config.profile) for r in events],
                   np.float32)
    x = interaction_matrix(users, items, w, len(user_ids), len(item_ids))
    x.data = np.clip(x.data, -2.0, 4.0)
    positive = x.copy()
    positive.data = (positive.data > 0).astype(np.float32)
    positive.eliminate_zeros()
    cf_input = x if rc.similarity == "pearson" else positive
    cf_input = cf_input.copy()
    cf_input.eliminate_zeros()
    return ModelBundle(
        version="",
        item_ids=item_ids,
        user_ids=user_ids,
        embeddings=Embeddings.fit(positive, rc.embedding_dim, seed=config.seed),
        itemcf=ItemCF.fit(cf_input, rc.similarity, rc.itemcf_neighbors, rc.shrinkage),
        usercf=UserCF.fit(cf_input, rc.similarity, rc.usercf_neighbors),
        graph=GraphFilter.fit(positive, rc.gf_dim, rc.gf_alpha, seed=config.seed),
        item_categories=[categories.get(i) for i in item_ids],
    )


def _impressions(records: list[dict]) -> dict[str, list[str]]:
    """request_id -> the items that answer showed (logged by the ingress)."""
    return {r["request_id"]: json.loads(r["payload"])["items"] for r in records
            if r["kind"] == KIND_IMPRESSION and r.get("request_id") and r.get("payload")}


def assemble_examples(prefix: ModelBundle, records: list[dict], prefix_events: list[dict],
                      suffix: list[dict], config: RecConfig,
                      shown: dict[str, list[str]] | None = None) -> Examples:
    """Replay the held-out events (in time order) through a pipeline holding the prefix model
    and every earlier event: each positive event is a positive example; its negatives are the
    items the same answer showed and the user did not pick (when the event names the request it
    answers), topped up with popularity-sampled unseen items."""
    shown = shown or {}
    rc = config.ranker
    rng = np.random.default_rng(rc.seed)
    rec = Recommender(config, prefix, index=None)
    rec.apply([r for r in records if r["kind"] == KIND_ITEM])
    rec.apply(prefix_events)
    positive = [n for n, r in enumerate(suffix)
                if event_weight(r["type"], r.get("value"), config.profile) > 0]
    if len(positive) > rc.max_examples:
        positive = positive[-rc.max_examples:]
    take = set(positive)
    counts = np.asarray([rec.pop_counts.get(i, 0.0) for i in prefix.item_ids]) + 1.0
    probs = counts**0.75 / (counts**0.75).sum()

    rows_item, rows_user, rows_dense, rows_label = [], [], [], []
    for n, r in enumerate(suffix):
        if n in take:
            view = rec.view(r["user_id"])
            negs = [i for i in shown.get(r.get("request_id") or "", [])
                    if i != r["item_id"] and i not in view.seen][: rc.negatives]
            dense = rec.dense_scores(view)
            hard = _hard_negatives(rec, view, r["item_id"], dense, rng, rc.hard_negatives)
            negs += [i for i in hard if i not in negs][: rc.negatives - len(negs)]
            draws = rng.choice(prefix.n_items, size=rc.negatives * 3, p=probs)
            for d in draws.tolist():
                cand = prefix.item_ids[d]
                if len(negs) >= rc.negatives:
                    break
                if cand != r["item_id"] and cand not in view.seen and cand not in negs:
                    negs.append(cand)
            cands = rec.score_candidates(view, [r["item_id"], *negs], dense)
            context = _context_of(r)
            rows_dense.append(rec.features(view, cands, context))
            rows_item.append([rec.catalog.index[i] for i in cands.item_ids])
            user = view.vec if view.vec is not None else np.zeros(prefix.embeddings.dim)
            rows_user.append(np.broadcast_to(user, (len(cands), len(user))))
            rows_label.append([1.0] + [0.0] * len(negs))
        rec.apply([r])
    if not rows_label:
        d = prefix.embeddings.dim
        return Examples(np.zeros(0, np.int64), np.zeros((0, d), np.float32),
                        np.zeros((0, d), np.float32), np.zeros((0, len(DENSE_FEATURES)), np.float32),
                        np.zeros(0, np.float32))
    item_idx = np.concatenate([np.asarray(x, np.int64) for x in rows_item])
    item_vec = np.zeros((len(item_idx), prefix.embeddings.dim), np.float32)
    known = item_idx < prefix.n_items
    item_vec[known] = prefix.embeddings.item[item_idx[known]]
    return Examples(
        item_idx=np.where(known, item_idx, prefix.n_items),
        user_vec=np.concatenate(rows_user).astype(np.float32),
        item_vec=item_vec,
        dense=np.concatenate(rows_dense).astype(np.float32),
        labels=np.concatenate([np.asarray(x, np.float32) for x in rows_label]),
    )


def _hard_negatives(rec: Recommender, view, positive: str, dense: dict[str, np.ndarray],
                    rng: np.random.Generator, n: int) -> list[str]:
    """Items the recall sources rank high for this user but the user did not pick next: the
    ranker's real job is to order such candidates, not to tell them from random items."""
    if n <= 0:
        return []
    total = sum(v / (v.max() or 1.0) for v in dense.values())
    top, _ = top_n(total, HARD_POOL, rec._exclude(view))
    pool = [rec.catalog.ids[i] for i in top.tolist() if rec.catalog.ids[i] != positive]
    if not pool:
        return []
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(picks.tolist())]


def _context_of(record: dict) -> dict | None:
    ctx = parse_context(record)
    if "hour" not in ctx:
        ctx["hour"] = (float(record["ts"]) % 86400) / 3600.0
    return ctx


def snapshot_table(records: list[dict]) -> pa.Table:
    """An Arrow table in log format from plain records (tests and offline use)."""
    rows = [{**r, "offset": r.get("offset", n)} for n, r in enumerate(records)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)

