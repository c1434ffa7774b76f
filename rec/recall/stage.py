"""The recall stage: one model version's recall models over the live catalogue.

It turns a profile view into a merged candidate set: each registered recall model's top items
(`rec.recall.registry.MODELS`), the embedding index's nearest items to the user vector (folded in
here, against this version's item factors), trending and fresh items. Every candidate carries
each scored source's score (the ranker's features), its category and the history item it is
most similar to (its explanation), so the stages after it need neither the catalogue nor the
models. What crosses a stage boundary names items by id: replicas whose catalogues differ for a
moment never mix items up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from rec.arrays import member
from rec.config import RecConfig
from rec.filters import NO_FILTERS, Filters
from rec.index import Index
from rec.model import ModelBundle
from rec.profile import ProfileView
from rec.recall.base import DenseScores, RecallQuery, RequestScores, top_n, top_n_rows
from rec.recall.registry import MODELS
from rec.state import LiveState

MODEL_SOURCES = tuple(MODELS)  # the trained recall models, scored from the history per request
SCORED = (*MODEL_SOURCES, "ann")  # sources whose score every candidate carries
SOURCES = (*SCORED, "pop", "new")


@dataclass(frozen=True)
class CandidateSet:
    """Merged recall output: one row per candidate item."""

    item_ids: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    scores: np.ndarray  # [n, len(SCORED)]: each scored source's score of every candidate
    categories: tuple[str | None, ...] = ()
    # The user's recent positive items (`seeds`) and per candidate the position among them of
    # the one contributing most to its item-CF similarity (trained plus live co-occurrence),
    # -1 when none is similar: its anchor, which explains it.
    seeds: tuple[str, ...] = ()
    anchor_of: np.ndarray | None = None
    last_sim: np.ndarray | None = None  # similarity to the user's latest positive item
    user_vec: np.ndarray | None = None  # folded in against this version's item factors
    # The candidates' indices in the catalogue that recalled them (`Catalog.token`): a stage in
    # the same process reads them instead of looking every id up again.
    idx: np.ndarray | None = None
    catalog: int | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def anchor(self, row: int) -> str | None:
        pos = -1 if self.anchor_of is None else int(self.anchor_of[row])
        return self.seeds[pos] if pos >= 0 else None


class Recall:
    """Recall over `state`'s catalogue with `model` (None: live co-occurrence, trending and
    fresh items only). It holds the version's item vectors, grown for items the model does not
    know, and the index over them; `state` tells it of catalogue changes."""

    def __init__(
        self,
        config: RecConfig,
        state: LiveState,
        model: ModelBundle | None = None,
        index: Index | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.model = model
        self.index: Index | None = None
        self.item_vecs = np.zeros((0, 1), np.float32)
        self.query_vecs = np.zeros((0, 1), np.float32)
        self._category_members: dict[str, np.ndarray] = {}
        if model is not None:
            if state.model_version != model.version:  # a checkpoint's state may be based on it
                state.rebase(model.basis)
            members: dict[str | None, list[int]] = {}
            for i, cat in enumerate(model.item_categories):
                members.setdefault(cat, []).append(i)
            self._category_members = {c: np.asarray(v) for c, v in members.items() if c is not None}
            self.item_vecs = model.embeddings.item.copy()
            self.query_vecs = model.embeddings.query.copy()
            self.index = index if index is not None else model.build_index(config.recall)
            self.items_added(0, len(state.catalog))
            cat = state.catalog
            gone = [cat.index[i] for i in cat.deleted if i in cat.index]
            if gone and self.index is not None:  # deleted before a checkpoint the state comes from
                self.index.mark_deleted(np.asarray(gone, np.int64))
        state.listener = self

    @property
    def version(self) -> str | None:
        return self.model.version if self.model else None

    # ---- catalogue changes (`rec.state.CatalogListener`) --------------------------------------

    def items_added(self, start: int, stop: int) -> None:
        """Give catalogue items the model does not know a vector: the mean of their category's
        (content cold start), so new items can be found by the ANN index at once."""
        first = len(self.item_vecs)
        if self.model is None or stop <= first:
            return
        catalog, emb = self.state.catalog, self.model.embeddings
        add_item = np.zeros((stop - first, self.item_vecs.shape[1]), np.float32)
        add_query = np.zeros_like(add_item)
        for row, i in enumerate(range(first, stop)):
            members = self._category_members.get(catalog.category(catalog.ids[i]))
            if members is not None and len(members):
                add_item[row] = emb.item[members].mean(axis=0)
                add_query[row] = emb.query[members].mean(axis=0)
        self.item_vecs = np.vstack([self.item_vecs, add_item])
        self.query_vecs = np.vstack([self.query_vecs, add_query])
        if self.index is not None:
            live = np.flatnonzero(np.abs(add_item).sum(axis=1) > 0)
            if len(live):
                self.index.add(np.arange(first, stop, dtype=np.int64)[live], add_item[live])

    def item_deleted(self, idx: int) -> None:
        if self.index is not None:
            self.index.mark_deleted(np.asarray([idx]))

    def item_restored(self, idx: int) -> None:
        if self.index is not None and idx < len(self.item_vecs):
            self.index.add(np.asarray([idx]), self.item_vecs[idx : idx + 1])

    # ---- one request -------------------------------------------------------------------------

    def user_vector(self, view: ProfileView) -> np.ndarray | None:
        """The user's vector in this version: Σ c(w) q_j over the items touched (c = 1 for a
        liked item, -0.5 for a disliked one), None without any."""
        if self.model is None:
            return None
        # sorted: a set's order differs between processes, and with it the float sums
        liked, disliked = np.sort(self.indices(view.liked)), np.sort(self.indices(view.disliked))
        if not len(liked) and not len(disliked):
            return None
        q = self.query_vecs
        vec = q[liked].sum(axis=0) - np.float32(0.5) * q[disliked].sum(axis=0)
        return vec.astype(np.float32)

    def ann_filter(self, view: ProfileView, filters: Filters = NO_FILTERS) -> np.ndarray:
        """Item indices the embedding search leaves out (deleted ones the index knows)."""
        seen = self.indices(filters.blocked(view.seen))
        return np.union1d(seen, filters.outside(self.state.catalog)) if filters.narrows else seen

    def recall(
        self,
        view: ProfileView,
        ann: tuple[np.ndarray, np.ndarray] | None = None,
        filters: Filters = NO_FILTERS,
    ) -> CandidateSet:
        """Candidates from every source, merged and deduplicated, seen (unless the request
        includes them), deleted and filtered-out items out. `ann` is the embedding search
        result when the index lives elsewhere (shard actors)."""
        state, catalog = self.state, self.state.catalog
        n = self.config.recall.per_source
        seen = filters.blocked(view.seen)
        exclude = np.unique(self.indices(seen | catalog.deleted))  # sorted: `member`
        if filters.narrows:
            exclude = np.union1d(exclude, filters.outside(catalog))
        seeds = self.seeds(view)
        scored = self._request_scores(view, seeds, len(catalog))
        # whole-catalogue rows are ranked together, with trending (one partition for all)
        whole = [name for name, s in scored.items() if isinstance(s, DenseScores)]
        rows = [scored[name].vector for name in whole]
        *tops, (trending, _) = top_n_rows(
            np.vstack([*rows, state.stats.trend.vector(catalog)]), n, exclude
        )
        best = {name: ids for name, (ids, _) in zip(whole, tops, strict=True)}
        for name, s in scored.items():
            if name not in best:
                best[name] = s.top(n, exclude)[0]
        lists = [(name, best[name]) for name in MODEL_SOURCES if name in best]
        vec = self.user_vector(view)
        if vec is not None:
            if ann is None and self.index is not None and len(self.index):
                ids, _ = self.index.search(vec, n, filter_ids=exclude)
                ann = (ids[0], None)
            if ann is not None:
                ids = np.asarray(ann[0], np.int64)
                lists.append(("ann", ids[(ids >= 0) & ~member(ids, exclude)]))
        lists.append(("pop", trending))
        new = [
            catalog.index[i]
            for i in reversed(list(state.stats.new_items)[-n:])
            if i not in seen and i not in catalog.deleted and filters.allows(catalog.category(i))
        ]
        lists.append(("new", np.asarray(new, np.int64)))
        cand, sources = merge_lists(lists, self.config.aggregate.candidates)
        scores = np.zeros((len(cand), len(SCORED)), np.float32)
        for col, name in enumerate(MODEL_SOURCES):
            if name in scored:
                scores[:, col] = scored[name].at(cand)
        if vec is not None and len(self.item_vecs):
            ok = cand < len(self.item_vecs)
            scores[ok, len(MODEL_SOURCES)] = self.item_vecs[cand[ok]] @ vec
        anchor_of, last_sim = self._anchors(seeds, cand)
        ids = catalog.ids
        return CandidateSet(
            tuple(map(ids.__getitem__, cand.tolist())),
            sources,
            scores,
            tuple(catalog.categories(cand)),
            tuple(ids[i] for i, _ in seeds),
            anchor_of,
            last_sim,
            vec,
            cand,
            catalog.token,
        )

    def query(self, view: ProfileView, seeds: list[tuple[int, float]]) -> RecallQuery:
        history = self._history(view)
        liked = self.indices(view.liked)
        return RecallQuery(
            np.asarray([i for i, _ in seeds], np.int64),
            np.asarray([w for _, w in seeds], np.float32),
            np.asarray([i for i, _ in history], np.int64),
            np.asarray([w for _, w in history], np.float32),
            liked,
        )

    def _request_scores(
        self, view: ProfileView, seeds: list[tuple[int, float]], n_total: int
    ) -> dict[str, RequestScores]:
        """Each recall model's scores of this request (a model the version lacks is absent),
        item-CF's with the live co-occurrence added (items newer than the model included)."""
        out: dict[str, RequestScores] = {}
        if not view.recent:
            return out
        if self.model is not None and seeds:
            q = self.query(view, seeds)
            for name in MODEL_SOURCES:
                source = self.model.sources.get(name)
                if source is not None:
                    out[name] = source.request(q, n_total)
        itemcf = out.setdefault("itemcf", DenseScores(np.zeros(n_total, np.float32)))
        self.state.stats.cooc.add_scores(itemcf.vector, seeds)
        return out

    def seeds(self, view: ProfileView) -> list[tuple[int, float]]:
        """The most recent positively-rated distinct items, weighted by recency."""
        seeds: dict[int, float] = {}
        limit = self.config.recall.recent_for_itemcf
        index = self.state.catalog.index
        for item_id, w, _ in reversed(view.recent):
            idx = index.get(item_id)
            if idx is None or w <= 0 or idx in seeds:
                continue
            seeds[idx] = 1.0 / (1.0 + 0.1 * len(seeds))
            if len(seeds) >= limit:
                break
        return list(seeds.items())

    def _history(self, view: ProfileView) -> list[tuple[int, float]]:
        """Each recent item's catalogue index and summed weight."""
        index = self.state.catalog.index
        weights: dict[str, float] = {}
        for item_id, w, _ in view.recent:
            weights[item_id] = weights.get(item_id, 0.0) + w
        return [(index[i], w) for i, w in weights.items() if i in index]

    def _anchors(
        self, seeds: list[tuple[int, float]], cand: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each candidate's anchor, the seed contributing most to its item-CF score (recency
        weighted; -1: none), and its similarity to the latest seed (a ranker feature)."""
        if not seeds or not len(cand):
            return np.full(len(cand), -1, np.int64), np.zeros(len(cand), np.float32)
        sim = self.similarity(np.asarray([i for i, _ in seeds], np.int64), cand)
        contrib = sim * np.asarray([w for _, w in seeds], np.float32)[:, None]
        best = contrib.argmax(axis=0)
        found = contrib[best, np.arange(len(cand))] > 0
        return np.where(found, best, -1), sim[0]

    def similarity(self, seed_idx: np.ndarray, cols: np.ndarray) -> np.ndarray:
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
        live = self.state.stats.cooc.rows(seeds)
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

    # ---- catalogue lookups -------------------------------------------------------------------

    def indices(self, item_ids) -> np.ndarray:
        """Catalogue indices of the items this catalogue holds (others are left out)."""
        get = self.state.catalog.index.get
        return np.asarray([i for i in map(get, item_ids) if i is not None], np.int64)

    def positions(self, item_ids) -> np.ndarray:
        """Each item's catalogue index, -1 for one this catalogue lacks (a stage boundary
        carries item ids, and another replica's catalogue may be ahead of this one's)."""
        get = self.state.catalog.index.get
        return np.fromiter(map(get, item_ids, repeat(-1)), np.int64, len(item_ids))

    def candidate_positions(self, cands: CandidateSet) -> np.ndarray:
        """`positions` of the candidates: the recall's own indices when this catalogue made
        them (catalogue indices never change within one catalogue), else by id."""
        if cands.catalog == self.state.catalog.token and cands.idx is not None:
            return cands.idx
        return self.positions(cands.item_ids)

    def similar(self, item_id: str, k: int = 10) -> list[dict] | None:
        """Item-to-item neighbours (item-CF, then embedding cosine); None for an unknown item."""
        catalog = self.state.catalog
        i = catalog.index.get(item_id)
        if i is None:
            return None
        scores: dict[int, float] = {}
        for j, s in zip(*self.state.stats.cooc.row(i), strict=True):
            scores[int(j)] = float(s)
        if self.model is not None:
            nb, sim = self.model.itemcf.neighbors(i)
            for j, s in zip(nb.tolist(), sim.tolist(), strict=True):
                scores[j] = scores.get(j, 0.0) + s
            if len(scores) < k and i < len(self.item_vecs):
                v = self.item_vecs
                norms = np.linalg.norm(v, axis=1) * (np.linalg.norm(v[i]) or 1.0)
                cos = (v @ v[i]) / np.where(norms > 0, norms, 1.0)
                for j in top_n(cos, k + 1)[0].tolist():
                    scores.setdefault(j, 0.0)
                    scores[j] = max(scores[j], 1e-3 * float(cos[j]))
        scores.pop(i, None)
        out = []
        for j, s in sorted(scores.items(), key=lambda kv: -kv[1]):
            jid = catalog.ids[j]
            if jid not in catalog.deleted:
                out.append({"item_id": jid, "score": round(float(s), 6)})
            if len(out) >= k:
                break
        return out

    def item_info(self, item_id: str) -> dict | None:
        catalog = self.state.catalog
        meta = catalog.meta.get(item_id)
        if meta is None:
            return None
        return {
            "item_id": item_id,
            "category": meta.category,
            "tags": list(meta.tags),
            "title": meta.title,
            "deleted": item_id in catalog.deleted,
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
