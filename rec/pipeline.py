"""The serving pipeline as plain Python: live state followed from the log, and the four stages
(profile → recall → rank → aggregate) as methods.

The same object runs in one process (the fused topology, offline evaluation, tests) or split
across Serve deployments, each calling only its stage; what crosses a stage boundary carries
item ids as strings, so replicas whose catalogues differ for a moment never mix items up.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from rec.arrays import gathered, grown
from rec.catalog import NO_CODE, Catalog
from rec.config import RecConfig
from rec.events import (
    KIND_EVENT,
    KIND_ITEM,
    KIND_ITEM_DELETE,
    KIND_USER_DELETE,
    parse_payload,
)
from rec.index import Index
from rec.model import ModelBundle
from rec.profile import ProfileStore, ProfileView, event_weight
from rec.ranker import Ranker
from rec.recall import Cooccurrence, Trending, top_n, top_n_rows

SOURCES = ("itemcf", "usercf", "gf", "ease", "ann", "pop", "new")
SCORED = ("itemcf", "usercf", "gf", "ease", "ann")  # sources whose score every candidate carries
DENSE_SOURCES = ("itemcf", "usercf", "gf", "ease")  # scored over the whole catalogue per request
# ways to order the final list; training picks one
ORDERINGS = ("ranker", "gf", "ease", "ann", "blend")
# The "blend" ordering sums the whole-catalogue models' scores. Item-CF's and user-CF's sparse
# neighbourhood scores (zero for most candidates, a few outliers setting the scale) are what EASE
# and the graph filter generalise; adding them cost 9% NDCG@10 on Diginetica.
BLENDED = ("gf", "ease", "ann")
DENSE_FEATURES = (
    "s_itemcf",
    "s_usercf",
    "s_gf",
    "s_ease",
    "s_ann",
    "r_itemcf",  # the same scores relative to the best candidate of the request
    "r_usercf",
    "r_gf",
    "r_ease",
    "r_ann",
    "last_sim",  # similarity to the user's latest positive item (item-CF + live co-occurrence)
    "log_pop",
    "log_trend",
    "log_age_days",
    "cat_affinity",
    "tag_affinity",
    "last_cat_match",
    "log_user_events",
    "hour_sin",
    "hour_cos",
)
FEATURE_COLUMN = {name: j for j, name in enumerate(DENSE_FEATURES)}
NEW_ITEMS_KEPT = 200


@dataclass(frozen=True)
class CandidateSet:
    """Merged recall output: one row per candidate item."""

    item_ids: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    scores: np.ndarray  # [n, len(SCORED)]: each scored source's score of every candidate
    # The candidates' indices in the catalogue that recalled them (`Catalog.token`): a stage in
    # the same process reads them instead of looking every id up again.
    idx: np.ndarray | None = None
    catalog: int | None = None

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class RankInputs:
    """What the ranker reads of one request's candidates: per candidate the model's item index
    (n_items: unknown), item vector and dense features, and the user's one vector."""

    item_idx: np.ndarray  # [n]
    user_vec: np.ndarray  # [d]
    item_vec: np.ndarray  # [n, d]
    dense: np.ndarray  # [n, len(DENSE_FEATURES)]

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The given candidates as `Ranker.predict`'s per-row arrays (training examples)."""
        return (
            self.item_idx[rows],
            np.broadcast_to(self.user_vec, (len(rows), len(self.user_vec))),
            self.item_vec[rows],
            self.dense[rows],
        )


def rank_probabilities(ranker: Ranker, inputs: list[RankInputs]) -> list[np.ndarray]:
    """The ranker's probability of every candidate of each request, in one model call."""
    sizes = [len(x.item_idx) for x in inputs]
    if sum(sizes) == 0:
        return [np.zeros(0, np.float32) for _ in inputs]
    probs = ranker.predict_requests(
        np.stack([x.user_vec for x in inputs]),
        sizes,
        *(
            np.concatenate(column)
            for column in zip(*((x.item_idx, x.item_vec, x.dense) for x in inputs), strict=True)
        ),
    )
    return np.split(probs, np.cumsum(sizes)[:-1])


class Recommender:
    def __init__(
        self, config: RecConfig, model: ModelBundle | None = None, index: Index | None = None
    ) -> None:
        self.config = config
        self.catalog = Catalog()
        self.profiles = ProfileStore(config.profile)
        self.cooc = Cooccurrence(config.recall.recent_for_itemcf)
        self.pop_counts = np.zeros(0, np.float32)  # positive events per catalogue index
        self.pop_trend = Trending(config.recall.trending_half_life_s)
        self.new_items: deque[str] = deque(maxlen=NEW_ITEMS_KEPT)
        self.offset = 0  # next log offset to apply
        self.model: ModelBundle | None = None
        self.index: Index | None = None
        self._item_vecs = np.zeros((0, 1), np.float32)
        self._query_vecs = np.zeros((0, 1), np.float32)
        if model is not None:
            self._use_model(model, index)

    # ---- live state -------------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        return self.model.version if self.model else None

    def apply(self, records: list[dict], learn: bool = True, in_model: bool = False) -> None:
        """Fold log records (in offset order) into the live state; already-applied ones are
        skipped. learn=False updates profiles and the catalogue only (no co-occurrence or
        trending), the 'profile updates only' variant of the prequential evaluation.
        in_model=True: the model was trained on these records, so their co-occurrence is in its
        item-CF already and is not counted again (what `model.log_offset` says for a log
        prefix, for records that are not one: training's held-out replay)."""
        for r in records:
            off = r.get("offset")
            if off is not None:
                if off < self.offset:
                    continue
                self.offset = off + 1
            kind = r["kind"]
            if kind == KIND_EVENT:
                self._apply_event(r, learn, in_model)
            elif kind == KIND_ITEM:
                p = parse_payload(r)
                is_new = r["item_id"] not in self.catalog.index
                was_deleted = r["item_id"] in self.catalog.deleted
                idx = self.catalog.upsert(
                    r["item_id"], p.get("category"), p.get("tags") or [], p.get("title"), r["ts"]
                )
                self._ensure_vectors(idx)
                if was_deleted and self.index is not None and idx < len(self._item_vecs):
                    self.index.add(np.asarray([idx]), self._item_vecs[idx : idx + 1])
                if is_new or idx >= (self.model.n_items if self.model else 0):
                    self.new_items.append(r["item_id"])
            elif kind == KIND_ITEM_DELETE:
                idx = self.catalog.delete(r["item_id"])
                if idx is not None and self.index is not None:
                    self.index.mark_deleted(np.asarray([idx]))
            elif kind == KIND_USER_DELETE:
                self.profiles.forget(r["user_id"])

    def _apply_event(self, r: dict, learn: bool = True, in_model: bool = False) -> None:
        item_id, ts = r["item_id"], float(r["ts"])
        idx = self.catalog.ensure(item_id, ts)
        self._ensure_vectors(idx)
        prof = self.profiles.users.get(r["user_id"])
        w = event_weight(r["type"], r.get("value"), self.config.profile) if learn else 0.0
        if (
            w > 0
            and not in_model
            and (self.model is None or r.get("offset", self.offset) >= self.model.log_offset)
        ):
            self._count_pair(idx, prof)  # older pairs are in the model already
        self.profiles.apply_event(
            r, self.catalog.meta.get(item_id), self._query_vector, self.version
        )
        if w > 0:
            self.pop_counts = grown(self.pop_counts, idx + 1)
            self.pop_counts[idx] += 1.0
            self.pop_trend.add(item_id, ts)

    def _count_pair(self, idx: int, prof) -> None:
        first_time = prof is None or self.catalog.ids[idx] not in prof.items
        if first_time:
            index = self.catalog.index
            recent = [index[i] for i, w, _ in prof.recent if w > 0 and i in index] if prof else []
            distinct = list(dict.fromkeys(reversed(recent)))[::-1]  # each partner once, by recency
            self.cooc.add(idx, distinct, True)

    def _ensure_vectors(self, idx: int) -> None:
        """Give catalogue items the model does not know a vector: the mean of their category's
        (content cold start), so new items can be found by the ANN index at once."""
        if self.model is None or idx < len(self._item_vecs):
            return
        n = len(self.catalog)
        dim = self._item_vecs.shape[1]
        add_item = np.zeros((n - len(self._item_vecs), dim), np.float32)
        add_query = np.zeros_like(add_item)
        for row, i in enumerate(range(len(self._item_vecs), n)):
            cat = self.catalog.category(self.catalog.ids[i])
            members = self._category_members.get(cat)
            if members is not None and len(members):
                add_item[row] = self.model.embeddings.item[members].mean(axis=0)
                add_query[row] = self.model.embeddings.query[members].mean(axis=0)
        start = len(self._item_vecs)
        self._item_vecs = np.vstack([self._item_vecs, add_item])
        self._query_vecs = np.vstack([self._query_vecs, add_query])
        if self.index is not None:
            live = np.flatnonzero(np.abs(add_item).sum(axis=1) > 0)
            if len(live):
                self.index.add(np.arange(start, n, dtype=np.int64)[live], add_item[live])

    def _query_vector(self, item_id: str) -> np.ndarray | None:
        idx = self.catalog.index.get(item_id)
        if idx is None or idx >= len(self._query_vecs):
            return None
        return self._query_vecs[idx]

    def _use_model(self, model: ModelBundle, index: Index | None) -> None:
        """Serve `model` from a fresh state: the catalogue based on its item order, its vectors
        and index. A replica that moves to a new version builds a new Recommender and replays
        the log into it (what a freshly started replica does), so no state outlives a version."""
        self.model = model
        self.catalog = self.catalog.rebase(model.item_ids)
        for item_id, cat in zip(model.item_ids, model.item_categories, strict=True):
            if self.catalog.meta[item_id].category is None:
                self.catalog.set_category(item_id, cat)
        members: dict[str | None, list[int]] = {}
        for i, cat in enumerate(model.item_categories):
            members.setdefault(cat, []).append(i)
        self._category_members = {c: np.asarray(v) for c, v in members.items() if c is not None}
        self._item_vecs = model.embeddings.item.copy()
        self._query_vecs = model.embeddings.query.copy()
        self.index = index if index is not None else model.build_index(self.config.recall)
        self._ensure_vectors(len(self.catalog) - 1)

    # ---- stage 1: profile ------------------------------------------------------------------

    def view(self, user_id: str) -> ProfileView:
        return self.profiles.view(user_id, self._query_vector, self.version)

    # ---- stage 2: recall -------------------------------------------------------------------

    def ann_filter(self, view: ProfileView) -> np.ndarray:
        return self._indices(view.seen)

    def recall(
        self, view: ProfileView, ann: tuple[np.ndarray, np.ndarray] | None = None
    ) -> CandidateSet:
        """Candidates from every source, merged and deduplicated, seen and deleted items out.
        `ann` is the embedding search result when the index lives elsewhere (shard actors)."""
        n = self.config.recall.per_source
        n_total = len(self.catalog)
        exclude = self._exclude(view)
        dense = self._dense_scores(view, n_total)
        trend = self.pop_trend.vector(self.catalog)
        *tops, (trending, _) = top_n_rows(np.vstack([dense, trend]), n, exclude)
        lists = [(name, ids) for name, (ids, _) in zip(DENSE_SOURCES, tops, strict=True)]
        if view.vec is not None:
            if ann is None and self.index is not None and len(self.index):
                ids, _ = self.index.search(view.vec, n, filter_ids=exclude)
                ann = (ids[0], None)
            if ann is not None:
                ids = np.asarray(ann[0], np.int64)
                lists.append(("ann", ids[(ids >= 0) & ~np.isin(ids, exclude)]))
        lists.append(("pop", trending))
        new = [
            self.catalog.index[i]
            for i in reversed(list(self.new_items)[-n:])
            if i not in view.seen and i not in self.catalog.deleted
        ]
        lists.append(("new", np.asarray(new, np.int64)))
        cand, sources = merge_lists(lists, self.config.aggregate.candidates)
        scores = self._score_matrix(view, cand, dense)
        ids = self.catalog.ids
        return CandidateSet(
            tuple(map(ids.__getitem__, cand.tolist())), sources, scores, cand, self.catalog.token
        )

    def _dense_scores(self, view: ProfileView, n_total: int) -> np.ndarray:
        """[len(DENSE_SOURCES), n_total]: each whole-catalogue source's score of every item."""
        out = np.zeros((len(DENSE_SOURCES), n_total), np.float32)
        if not view.recent:
            return out
        row = dict(zip(DENSE_SOURCES, out, strict=True))  # views: writes fill `out`
        seeds = self._seeds(view)
        if self.model is not None and seeds:
            idx = np.asarray([i for i, _ in seeds], np.int64)
            w = np.asarray([w for _, w in seeds], np.float32)
            row["itemcf"][:] = self.model.itemcf.scores(idx, w, n_total)
            hist = [(self.catalog.index[i], wt) for i, wt in self._history(view)]
            if hist:
                hidx = np.asarray([i for i, _ in hist], np.int64)
                hw = np.asarray([w for _, w in hist], np.float32)
                row["usercf"][:] = self.model.usercf.scores(hidx, hw, n_total)
            liked = self._indices(view.liked)
            ones = np.ones(len(liked), np.float32)
            row["gf"][:] = self.model.graph.scores(liked, ones, n_total)
            if self.model.ease is not None:
                row["ease"][:] = self.model.ease.scores(liked, ones, n_total)
        # online co-occurrence, including items newer than the model
        self.cooc.add_scores(row["itemcf"], seeds)
        return out

    def _seeds(self, view: ProfileView) -> list[tuple[int, float]]:
        """The most recent positively-rated distinct items, weighted by recency."""
        seeds: dict[int, float] = {}
        limit = self.config.recall.recent_for_itemcf
        for item_id, w, _ in reversed(view.recent):
            idx = self.catalog.index.get(item_id)
            if idx is None or w <= 0 or idx in seeds:
                continue
            seeds[idx] = 1.0 / (1.0 + 0.1 * len(seeds))
            if len(seeds) >= limit:
                break
        return list(seeds.items())

    def _history(self, view: ProfileView) -> list[tuple[str, float]]:
        weights: dict[str, float] = {}
        for item_id, w, _ in view.recent:
            weights[item_id] = weights.get(item_id, 0.0) + w
        return [(i, w) for i, w in weights.items() if i in self.catalog.index]

    def _score_matrix(self, view: ProfileView, idx: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """[len(idx), len(SCORED)]: the dense sources' scores of the candidates, then ANN's."""
        out = np.zeros((len(idx), len(SCORED)), np.float32)
        out[:, : len(DENSE_SOURCES)] = dense[:, idx].T
        if view.vec is not None and len(self._item_vecs):
            ok = idx < len(self._item_vecs)
            out[ok, len(DENSE_SOURCES)] = self._item_vecs[idx[ok]] @ view.vec.astype(np.float32)
        return out

    def _exclude(self, view: ProfileView) -> np.ndarray:
        return self._indices(view.seen | self.catalog.deleted)

    def _indices(self, item_ids) -> np.ndarray:
        get = self.catalog.index.get
        return np.asarray([i for i in map(get, item_ids) if i is not None], np.int64)

    def _candidate_positions(self, cands: CandidateSet) -> np.ndarray:
        """`_positions` of the candidates: the recall's own indices when this catalogue made
        them (catalogue indices never change within one catalogue), else by id."""
        if cands.catalog == self.catalog.token and cands.idx is not None:
            return cands.idx
        return self._positions(cands.item_ids)

    def _positions(self, item_ids) -> np.ndarray:
        """Each item's catalogue index, -1 for one this catalogue lacks (a stage boundary
        carries item ids, and another replica's catalogue may be ahead of this one's)."""
        return np.fromiter(
            map(self.catalog.index.get, item_ids, repeat(-1)), np.int64, len(item_ids)
        )

    # ---- stage 3: rank ---------------------------------------------------------------------

    def features(
        self, view: ProfileView, cands: CandidateSet, context: dict | None = None
    ) -> np.ndarray:
        """Dense ranker features of each candidate (names in DENSE_FEATURES)."""
        return self._features(view, cands, self._candidate_positions(cands), context)

    def _features(
        self, view: ProfileView, cands: CandidateSet, idx: np.ndarray, context: dict | None
    ) -> np.ndarray:
        """`features`, given the candidates' catalogue indices (`_positions`)."""
        n = len(cands)
        f = self._recall_features(cands, idx)
        if n == 0:
            return f
        col = FEATURE_COLUMN
        catalog = self.catalog
        f[:, col["last_sim"]] = self._last_similarity(view, idx)
        now = self.pop_trend.latest or view.last_ts or time.time()
        cat_total = sum(v for v in view.tags.values() if v > 0) or 1.0
        last_cat = catalog.code(catalog.category(view.recent[-1][0]) if view.recent else None)
        f[:, col["log_trend"]] = np.log1p(
            gathered(self.pop_trend.vector(catalog), idx, 0, np.float32)
        )
        f[:, col["cat_affinity"]] = catalog.category_weights(idx, view.tags) / cat_total
        codes = catalog.category_codes(idx)
        f[:, col["last_cat_match"]] = (codes == last_cat) & (codes != NO_CODE)
        f[:, col["tag_affinity"]] = catalog.tag_weights(idx, view.tags) / cat_total
        first_ts = catalog.first_seen(idx)
        age = np.log1p(np.maximum(now - first_ts, 0.0) / 86400.0)
        f[:, col["log_age_days"]] = np.where(np.isnan(first_ts), 0.0, age)
        f[:, col["log_user_events"]] = math.log1p(view.n_events)
        hour = _hour(context, now)
        f[:, col["hour_sin"]] = math.sin(2 * math.pi * hour / 24)
        f[:, col["hour_cos"]] = math.cos(2 * math.pi * hour / 24)
        return f

    def _recall_features(self, cands: CandidateSet, idx: np.ndarray | None = None) -> np.ndarray:
        """The features a recall order reads: each source's score, raw and relative to the
        request's best candidate, and popularity (the rest of the row is zero). `idx`: the
        candidates' catalogue indices (`_positions`), when the caller has them."""
        n = len(cands)
        f = np.zeros((n, len(DENSE_FEATURES)), np.float32)
        if n == 0:
            return f
        f[:, : len(SCORED)] = cands.scores
        top = np.abs(cands.scores).max(axis=0)
        f[:, len(SCORED) : 2 * len(SCORED)] = cands.scores / np.where(top > 0, top, 1.0)
        if idx is None:
            idx = self._candidate_positions(cands)
        f[:, FEATURE_COLUMN["log_pop"]] = np.log1p(gathered(self.pop_counts, idx, 0, np.float32))
        return f

    def _last_similarity(self, view: ProfileView, idx: np.ndarray) -> np.ndarray:
        seeds = self._seeds(view)  # the first is the latest positive item
        if not seeds:
            return np.zeros(len(idx), np.float32)
        return self._similarity(np.asarray([seeds[0][0]]), idx)[0]

    def _similarity(self, seed_idx: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """[seeds × items]: trained item-CF similarity plus live co-occurrence, of distinct
        items given by catalogue index (-1: not in the catalogue, similarity 0)."""
        seeds = seed_idx.tolist()
        rows, neighbours, sims = [], [], []
        if self.model is not None:  # trained first, then live counts (each cell gets one of each)
            for r, i in enumerate(seeds):
                js, s = self.model.itemcf.row(i)
                rows.append(np.full(len(js), r))
                neighbours.append(js)
                sims.append(s)
        live = self.cooc.rows(seeds)
        rows.append(live[0])
        neighbours.append(live[1])
        sims.append(live[2])
        out = np.zeros((len(seed_idx), len(cols)), np.float32)
        neighbours = np.concatenate(neighbours)
        if not len(neighbours) or not len(cols):
            return out
        order = np.argsort(cols, kind="stable")
        pos = np.minimum(np.searchsorted(cols[order], neighbours), len(cols) - 1)
        hit = cols[order][pos] == neighbours
        flat = np.concatenate(rows)[hit] * len(cols) + order[pos[hit]]
        np.add.at(out.reshape(-1), flat, np.concatenate(sims)[hit].astype(np.float32))
        return out

    def rank(
        self, view: ProfileView, cands: CandidateSet, context: dict | None = None
    ) -> np.ndarray:
        """Calibrated relevance probability per candidate (a recall-score blend before the first
        ranker exists)."""
        return self.rank_many([(view, cands, context)])[0]

    def rank_many(
        self, requests: list[tuple[ProfileView, CandidateSet, dict | None]]
    ) -> list[np.ndarray]:
        """Rank several requests' candidates in one model call (batching across requests).
        The model's `ordering` (chosen on held-out data in training) decides whether the ranker
        or a recall-score order is served."""
        ordering = self.model.ordering if self.model else "live"
        if ordering != "ranker" or self.model.ranker is None:
            name = "blend" if ordering == "ranker" else ordering
            return [recall_order(self._recall_features(cands), name) for _, cands, _ in requests]
        return rank_probabilities(self.model.ranker, [self.rank_inputs(*req) for req in requests])

    def rank_inputs(
        self, view: ProfileView, cands: CandidateSet, context: dict | None
    ) -> RankInputs:
        idx = self._candidate_positions(cands)
        dense = self._features(view, cands, idx, context)
        dim = self._item_vecs.shape[1]
        known = (idx >= 0) & (idx < len(self._item_vecs))
        item_vec = np.zeros((len(idx), dim), np.float32)
        item_vec[known] = self._item_vecs[idx[known]]
        user = view.vec if view.vec is not None else np.zeros(dim, np.float32)
        n_model = self.model.n_items if self.model else 0
        return RankInputs(
            np.where(known & (idx < n_model), idx, n_model),
            user.astype(np.float32),
            item_vec,
            dense,
        )

    # ---- stage 4: aggregate ------------------------------------------------------------------

    def finalize(
        self,
        view: ProfileView,
        cands: CandidateSet,
        scores: np.ndarray,
        k: int,
        exclude: frozenset[str] = frozenset(),
        request_id: str | None = None,
    ) -> dict:
        """Order by score, drop excluded/seen/deleted, apply diversity, reserve exploration
        slots for fresh catalogue items (they have no feedback yet) and explain each item."""
        agg = self.config.aggregate
        blocked = view.seen | self.catalog.deleted | exclude
        order = [
            r
            for r in np.argsort(-np.asarray(scores), kind="stable").tolist()
            if cands.item_ids[r] not in blocked
        ]
        n_explore = min(int(round(k * agg.explore_fraction)), k) if view.known else 0
        per_cat: dict[str | None, int] = {}

        def fits(row: int) -> bool:  # the diversity rule, counted over the whole list
            cat = self.catalog.category(cands.item_ids[row])
            if agg.max_per_category is None or cat is None:
                return True
            if per_cat.get(cat, 0) >= agg.max_per_category:
                return False
            per_cat[cat] = per_cat.get(cat, 0) + 1
            return True

        explore: list[int] = []
        for row in (r for r in order if "new" in cands.sources[r]):
            if len(explore) >= n_explore:
                break
            if fits(row):
                explore.append(row)
        rows: list[int] = []
        for row in order:
            if len(rows) >= k - len(explore):
                break
            if row not in explore and fits(row):
                rows.append(row)
        items = []
        chosen = rows + explore
        anchors = self._anchors(
            view, [cands.item_ids[r] for r in chosen if "itemcf" in cands.sources[r]]
        )
        for row in chosen:
            entry = {
                "item_id": cands.item_ids[row],
                "score": round(float(scores[row]), 6),
                "sources": list(cands.sources[row]),
            }
            entry["reason"] = self._reason(view, entry, anchors.get(entry["item_id"]))
            items.append(entry)
        return {
            "user_id": view.user_id,
            "items": items,
            "model_version": self.version,
            "request_id": request_id or uuid.uuid4().hex,
        }

    def _reason(self, view: ProfileView, entry: dict, anchor: str | None) -> str:
        sources = entry["sources"]
        item_id = entry["item_id"]
        if "new" in sources:
            cat = self.catalog.category(item_id)
            return f"new in {cat}" if cat else "new arrival"
        if anchor is not None:
            return f"because you interacted with {anchor}"
        if "usercf" in sources:
            return "popular with users like you"
        if "ann" in sources:
            cat = self.catalog.category(item_id)
            return f"matches your taste for {cat}" if cat else "matches your taste"
        return "trending now"

    def _anchors(self, view: ProfileView, item_ids: list[str]) -> dict[str, str]:
        """For each item, the recent item that contributes most to its item-CF score (trained
        similarity plus live co-occurrence, weighted by recency)."""
        seeds = self._seeds(view)
        if not item_ids or not seeds:
            return {}
        seed_idx = np.asarray([i for i, _ in seeds], np.int64)
        contrib = self._similarity(seed_idx, self._positions(item_ids))
        contrib *= np.asarray([w for _, w in seeds], np.float32)[:, None]
        best = contrib.argmax(axis=0)
        return {
            item: self.catalog.ids[seed_idx[best[c]]]
            for c, item in enumerate(item_ids)
            if contrib[best[c], c] > 0
        }

    # ---- one process, whole pipeline -------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        k: int | None = None,
        *,
        exclude: frozenset[str] = frozenset(),
        context: dict | None = None,
        request_id: str | None = None,
    ) -> dict:
        k = k or self.config.aggregate.default_k
        view = self.view(user_id)
        cands = self.recall(view)
        scores = self.rank(view, cands, context)
        return self.finalize(view, cands, scores, k, exclude, request_id)

    def similar(self, item_id: str, k: int = 10) -> list[dict] | None:
        """Item-to-item neighbours (item-CF, then embedding cosine); None for an unknown item."""
        i = self.catalog.index.get(item_id)
        if i is None:
            return None
        scores: dict[int, float] = {}
        for j, s in zip(*self.cooc.row(i), strict=True):
            scores[int(j)] = float(s)
        if self.model is not None:
            nb, sim = self.model.itemcf.neighbors(i)
            for j, s in zip(nb.tolist(), sim.tolist(), strict=True):
                scores[j] = scores.get(j, 0.0) + s
            if len(scores) < k and i < len(self._item_vecs):
                v = self._item_vecs
                norms = np.linalg.norm(v, axis=1) * (np.linalg.norm(v[i]) or 1.0)
                cos = (v @ v[i]) / np.where(norms > 0, norms, 1.0)
                for j in top_n(cos, k + 1)[0].tolist():
                    scores.setdefault(j, 0.0)
                    scores[j] = max(scores[j], 1e-3 * float(cos[j]))
        scores.pop(i, None)
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        out = []
        for j, s in ranked:
            jid = self.catalog.ids[j]
            if jid not in self.catalog.deleted:
                out.append({"item_id": jid, "score": round(float(s), 6)})
            if len(out) >= k:
                break
        return out

    def item_info(self, item_id: str) -> dict | None:
        meta = self.catalog.meta.get(item_id)
        if meta is None:
            return None
        return {
            "item_id": item_id,
            "category": meta.category,
            "tags": list(meta.tags),
            "title": meta.title,
            "deleted": item_id in self.catalog.deleted,
            "first_ts": meta.first_ts,
        }


def merge_lists(
    lists: list[tuple[str, np.ndarray]], limit: int
) -> tuple[np.ndarray, tuple[tuple[str, ...], ...]]:
    """Merge named candidate lists (catalogue indices, best first): each item once, in order of
    first appearance, with the names of the lists holding it; beyond `limit` items, those with
    the best position in any list are kept (a round-robin merge)."""
    names = tuple(name for name, _ in lists)
    arrays = [np.asarray(items, np.int64) for _, items in lists]
    sizes = [len(a) for a in arrays]
    if not sum(sizes):
        return np.empty(0, np.int64), ()
    every = np.concatenate(arrays)
    unique, first, which = np.unique(every, return_index=True, return_inverse=True)
    masks = np.zeros(len(unique), np.int64)  # bit j: list j holds the item
    np.bitwise_or.at(masks, which, np.repeat(1 << np.arange(len(arrays), dtype=np.int64), sizes))
    order = np.argsort(first, kind="stable")  # first appearance
    if len(order) > limit:
        best = np.full(len(unique), len(every), np.int64)
        np.minimum.at(best, which, np.concatenate([np.arange(n) for n in sizes]))
        order = order[np.argsort(best[order], kind="stable")[:limit]]
    return unique[order], tuple(map(_names_by_mask(names).__getitem__, masks[order].tolist()))


@functools.lru_cache(maxsize=64)
def _names_by_mask(names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """For every bit mask over `names`, the names whose bits are set (in order)."""
    return tuple(
        tuple(name for j, name in enumerate(names) if m >> j & 1) for m in range(1 << len(names))
    )


def _hour(context: dict | None, now: float) -> float:
    if context and isinstance(context.get("hour"), int | float):
        return float(context["hour"]) % 24
    return (now % 86400) / 3600.0


def recall_order(dense: np.ndarray, ordering: str) -> np.ndarray:
    """Scores in (0, 1) from recall scores alone: one source's ('gf', 'ease', 'ann'), or a sum of
    scores, each scaled to its maximum within the request: of the BLENDED models ('blend'), or,
    before any model exists, of every source, live co-occurrence included ('live')."""
    col = FEATURE_COLUMN
    if ordering in SCORED:
        s = dense[:, col[f"s_{ordering}"]]
    else:
        names = SCORED if ordering == "live" else BLENDED
        parts = [dense[:, col[f"s_{name}"]] for name in names]
        s = sum(p / (np.abs(p).max() or 1.0) for p in parts) + 0.01 * dense[:, col["log_pop"]]
    s = s - (s.max() if len(s) else 0.0)
    return (1.0 / (1.0 + np.exp(-s))).astype(np.float32)
