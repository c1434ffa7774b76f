"""Graph filtering (GF-CF, Shen et al. CIKM 2021): a closed-form collaborative filter that scores
items by passing the user's interaction signal through the normalised item-item graph.

With R̃ = D_U^-1/2 R D_I^-1/2, a user with binary history r gets
    b = r R̃ᵀR̃  +  α · r D_I^-1/2 Ū Ūᵀ D_I^1/2
the linear low-pass filter plus an ideal low-pass filter on the top singular vectors Ū of R̃
(GF-CF). BSPM (Choi et al., SIGIR 2023) then sharpens the blurred signal by running the reverse
heat equation ds/dt = -s R̃ᵀR̃ for a time T, here one fourth-order Runge-Kutta step:
    s = b (I - T P + (T P)²/2 - (T P)³/6 + (T P)⁴/24),   P = R̃ᵀR̃
and finally re-weighs by item degree, s · (d_i + 1)^γ; T and γ are chosen on held-out data at
training time. The filter is linear in the history, and it is served in one of two forms whose
cost does not grow with the catalogue (`GraphFilter.served`):

- tabulated, for a catalogue of a few thousand items: row j of an items × items matrix holds what
  item j alone contributes, and a request sums its history's rows;
- factored (`FactoredGraphFilter`), above that: the filter split into a sparse item-item part
  (each item's top neighbours in P) and a rank-r part (a user factor summed from the history's
  rows, an item factor per item), so a request costs its history's neighbour lists and a dot
  product per candidate.

Either way the score is computed from the live history, so a new event changes the next answer.
The exact per-request filter (`scores` of `GraphFilter`) is what training validates T and γ on."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import svds

from rec.arrays import member
from rec.config import RecallConfig
from rec.recall.base import (
    RecallModel,
    RecallQuery,
    RequestScores,
    TrainingData,
    gathered_rows,
    load_csr,
    save_csr,
    top_n,
    weighted_rows,
)

DENSE_BLOCK = 512  # items filtered per batch while `tune` tabulates the filter


class GraphFilter(RecallModel):
    name = "gf"
    orderable = True
    blended = True
    reason = "related to items you liked"
    anchored_reason = "because you liked {anchor}"

    def __init__(
        self,
        by_item: sp.csr_matrix,
        basis: np.ndarray,
        item_degree: np.ndarray,
        alpha: float,
        sharpen: float = 0.0,
        pop: float = 0.0,
        dense: np.ndarray | None = None,
    ) -> None:
        self.by_item = by_item.tocsr()  # R̃ᵀ: items × users
        self.by_user = self.by_item.T.tocsr()  # R̃: users × items
        self._sharpen = float(sharpen)
        self._pop = float(pop)
        self.dense = dense  # items × items, row j: item j's contribution (see `tune`)
        self.basis = np.ascontiguousarray(basis, np.float32)  # Ū: items × k (row-major: a
        # column-major basis is copied whole by every sparse @ dense product)
        self.item_degree = item_degree.astype(np.float32)
        self.alpha = float(alpha)
        d = self.item_degree
        self._inv_sqrt = np.divide(1.0, np.sqrt(d), out=np.zeros_like(d), where=d > 0)
        self._sqrt = np.sqrt(d)

    @classmethod
    def fit(
        cls, x: sp.csr_matrix, dim: int = 256, alpha: float = 0.3, seed: int = 0
    ) -> GraphFilter:
        xb = x.copy().astype(np.float32)
        xb.data = (xb.data > 0).astype(np.float32)
        xb.eliminate_zeros()
        du = np.asarray(xb.sum(axis=1)).ravel()
        di = np.asarray(xb.sum(axis=0)).ravel()
        inv_u = np.divide(1.0, np.sqrt(du), out=np.zeros_like(du), where=du > 0)
        inv_i = np.divide(1.0, np.sqrt(di), out=np.zeros_like(di), where=di > 0)
        norm = (sp.diags(inv_u) @ xb @ sp.diags(inv_i)).tocsr()
        users, items = largest_component(xb)
        core = norm[users][:, items]
        if min(core.shape) <= dim + 1:  # small: the dense SVD is exact and quick
            _, s, vt = np.linalg.svd(core.toarray().astype(np.float64), full_matrices=False)
            s, vt = s[:dim], vt[:dim]
        else:
            s, vt = _top_singular(core, dim, seed)
        k = len(s)
        basis = np.zeros((xb.shape[1], k), np.float32)
        basis[items] = vt[np.argsort(-s)].T
        return cls(norm.T.tocsr(), basis, di, alpha)

    @classmethod
    def from_training(cls, data: TrainingData) -> GraphFilter:
        """The filter unsharpened; training chooses T and γ and sets them with `tune`."""
        rc = data.config
        return cls.fit(data.positive, rc.gf_dim, rc.gf_alpha, seed=data.seed)

    def query_scores(self, q: RecallQuery, n_total: int) -> np.ndarray:
        return self.scores(q.liked, np.ones(len(q.liked), np.float32), n_total)

    @property
    def n_items(self) -> int:
        return self.by_item.shape[0]

    def served(self, sharpen: float, pop: float, config: RecallConfig) -> RecallModel:
        """This filter with T and γ set, in the form requests are scored with: tabulated up to
        `gf_dense_max_items` items, factored above (`FactoredGraphFilter.of`)."""
        if self.n_items <= config.gf_dense_max_items:
            self.tune(sharpen, pop, dense=True)
            return self
        self.tune(sharpen, pop)
        return FactoredGraphFilter.of(
            self,
            config.gf_neighbors,
            min(config.gf_rank, 2 * self.basis.shape[1]),
            config.gf_candidates,
        )

    @property
    def sharpen(self) -> float:
        return self._sharpen

    @property
    def pop(self) -> float:
        return self._pop

    def tune(self, sharpen: float, pop: float, dense: bool = False) -> None:
        """Set the sharpening time T and degree exponent γ (training chooses them), and tabulate
        the filter when `dense`: row j of an items × items float32 matrix becomes the scores of
        a history of item j alone, so a request costs a sum of its history's rows instead of
        eight sparse products over the whole graph (ml-100k, T chosen: 0.88 ms per request).
        Building it costs the batched filter of every item, O(nnz · items)."""
        self._sharpen, self._pop = float(sharpen), float(pop)
        self.dense = None
        if not dense:
            return
        n = self.n_items
        table = np.empty((n, n), np.float32)
        for start in range(0, n, DENSE_BLOCK):
            stop = min(start + DENSE_BLOCK, n)
            x = sp.eye(stop - start, n, k=start, dtype=np.float32, format="csr")  # one item a row
            table[start:stop] = self._filtered(self.blurred(x)).T
        self.dense = table

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        out = np.zeros(n_total, np.float32)
        liked = idx[(weights > 0) & (idx >= 0) & (idx < self.n_items)]
        if len(liked) == 0:
            return out
        liked = np.unique(liked)
        if self.dense is not None and 4 * len(liked) < self.n_items:
            out[: self.n_items] = self.dense[liked].sum(axis=0)
        elif self.dense is not None:  # a long history: one product with the whole table is
            # cheaper than gathering its rows (1k items, 1k liked: 0.07 against 0.39 ms)
            history = np.zeros(self.n_items, np.float32)
            history[liked] = 1.0
            out[: self.n_items] = history @ self.dense
        else:
            out[: self.n_items] = self._filtered(self.blurred_one(liked))[:, 0]
        return out

    def _filtered(self, blurred: np.ndarray) -> np.ndarray:
        """Sharpened and degree-weighed with this filter's T and γ (items × n)."""
        terms = self.sharpening_terms(blurred) if self.sharpen else [blurred]
        return self.combine(terms, self.sharpen, self.pop)

    def blurred_one(self, liked: np.ndarray) -> np.ndarray:
        """`blurred` of one history (sorted distinct item indices), items × 1: the same numbers,
        summed in the same order, from the arrays directly (scipy's sparse products cost more
        than the arithmetic for a single row, and every request runs this)."""
        users = weighted_rows(self.by_item, liked, np.ones(len(liked), np.float32))
        linear = self.by_item @ users
        projected = (self._inv_sqrt[liked, None] * self.basis[liked]).sum(axis=0, keepdims=True)
        ideal = self.basis @ projected.T
        return (linear[:, None] + self.alpha * ideal * self._sqrt[:, None]).astype(np.float32)

    def blurred(self, x: sp.csr_matrix) -> np.ndarray:
        """items × n: the linear plus ideal low-pass filter of each row of the binary
        histories x (n × items)."""
        users = (x @ self.by_item).T.toarray()  # (x R̃ᵀ)ᵀ: users × n
        linear = self.by_item @ users
        ideal = self.basis @ (x.multiply(self._inv_sqrt[None, :]).tocsr() @ self.basis).T
        return (linear + self.alpha * ideal * self._sqrt[:, None]).astype(np.float32)

    def sharpening_terms(self, blurred: np.ndarray) -> list[np.ndarray]:
        """[b, bP, bP², bP³, bP⁴] (items × n each): every sharpening time T is a mix of these."""
        terms = [blurred]
        for _ in range(4):
            terms.append(self.by_item @ (self.by_user @ terms[-1]))
        return terms

    def combine(self, terms: list[np.ndarray], time: float, pop: float) -> np.ndarray:
        """b · exp(-time P) to fourth order (one RK4 step of ds/dt = -s P, P = R̃ᵀR̃), then the
        degree re-weighing (d_i + 1)^pop."""
        out = terms[0].copy()
        if time:
            coef = 1.0
            for order, term in enumerate(terms[1:], start=1):
                coef *= -time / order
                out += coef * term
        if pop:  # the normalisation can over-penalise popular items
            out *= np.power(self.item_degree + 1.0, pop)[:, None]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            **save_csr("gf", self.by_item),
            "gf_basis": self.basis,
            "gf_degree": self.item_degree,
            "gf_alpha": np.asarray(self.alpha),
            "gf_sharpen": np.asarray(self.sharpen),
            "gf_pop": np.asarray(self.pop),
            **({"gf_dense": self.dense} if self.dense is not None else {}),
        }

    @classmethod
    def load(cls, arrays) -> RecallModel | None:
        if "gf_nb_shape" in arrays:
            return FactoredGraphFilter.load(arrays)
        if "gf_shape" not in arrays:
            return None
        return cls(
            load_csr("gf", arrays),
            arrays["gf_basis"],
            arrays["gf_degree"],
            float(arrays["gf_alpha"]),
            float(arrays["gf_sharpen"]),
            float(arrays["gf_pop"]),
            arrays.get("gf_dense"),
        )


class FactoredGraphFilter(RecallModel):
    """The graph filter in a form whose request cost does not grow with the catalogue.

    With P = R̃ᵀR̃ = Ū Λ Ūᵀ + P_rest (Ū: the fitted top eigenvectors, exact ones of P, so the
    two parts are orthogonal), p(x) the sharpening polynomial and w_j = (d_j + 1)^γ, the filter

        s = (r P + α r D^-1/2 Ū Ūᵀ D^1/2) p(P) diag(w)

    splits exactly into  r P_rest p(P_rest) diag(w)  plus a part of rank 2k:
    (r Ū) Λ p(Λ) Ūᵀ diag(w)  +  α (r D^-1/2 Ū) Ūᵀ D^1/2 p(P) diag(w). The rest-spectrum part is
    served as β · r P diag(w) minus its top-eigen share β (r Ū) Λ Ūᵀ diag(w) (moved into the
    rank-2k part): P's eigenvalues outside Ū are small, so p is nearly constant over them and
    β is its mean there (weighed by eigenvalue, estimated with random probes). r P is served
    from each item's `neighbors` largest entries of P, the rank-2k part compressed to its best
    rank r. A request sums its history's neighbour rows (its candidates: the best `candidates`
    of them by that sum) and its history's rows of the query factors (one vector u); an item's
    score is its neighbour sum plus u · its item factor. Gowalla, measured: docs/benchmarks.md.
    """

    name = "gf"
    orderable = True
    blended = True
    reason = GraphFilter.reason
    anchored_reason = GraphFilter.anchored_reason

    def __init__(
        self,
        neighbors: sp.csr_matrix,
        query: np.ndarray,
        item: np.ndarray,
        candidates: int,
        sharpen: float = 0.0,
        pop: float = 0.0,
        beta: float = 1.0,
    ) -> None:
        self.neighbors = neighbors.tocsr()  # items × items: β P w, each row's largest entries
        self.query = np.ascontiguousarray(query, np.float32)  # items × r
        self.item = np.ascontiguousarray(item, np.float32)  # items × r
        self.candidates = int(candidates)
        self.sharpen, self.pop, self.beta = float(sharpen), float(pop), float(beta)

    @classmethod
    def of(
        cls, graph: GraphFilter, neighbors: int, rank: int, candidates: int, seed: int = 0
    ) -> FactoredGraphFilter:
        """The factored form of a tuned `graph` (T and γ set)."""
        u = graph.basis.astype(np.float64)
        lam = np.square(graph.by_user @ u).sum(axis=0)  # Ū's eigenvalues in P
        coef = sharpening_coefficients(graph.sharpen)
        poly = sum(c * lam**k for k, c in enumerate(coef))
        beta = rest_mean(graph, coef, seed) if graph.sharpen else 1.0
        w = np.power(graph.item_degree.astype(np.float64) + 1.0, graph.pop)
        item_a = u * (lam * poly - beta * lam)[None, :] * w[:, None]
        item_b = graph.alpha * graph.combine(
            graph.sharpening_terms(graph._sqrt[:, None].astype(np.float64) * u),
            graph.sharpen,
            graph.pop,
        )
        query, item = low_rank(
            np.hstack([u, graph._inv_sqrt[:, None] * u]), np.hstack([item_a, item_b]), rank
        )
        nb = top_neighbors(graph.by_item, graph.by_user, neighbors, (beta * w).astype(np.float32))
        return cls(nb, query, item, candidates, graph.sharpen, graph.pop, beta)

    @property
    def n_items(self) -> int:
        return self.neighbors.shape[0]

    def query_scores(self, q: RecallQuery, n_total: int) -> np.ndarray:
        return self.scores(q.liked, np.ones(len(q.liked), np.float32), n_total)

    def request(self, q: RecallQuery, n_total: int) -> RequestScores:
        return FactoredScores(self, q.liked)

    def scores(self, idx: np.ndarray, weights: np.ndarray, n_total: int) -> np.ndarray:
        """Every item's score (tests and the contract; a request scores only its candidates)."""
        liked = self._liked(idx, weights)
        out = np.zeros(n_total, np.float32)
        if len(liked):
            out[: self.n_items] = weighted_rows(
                self.neighbors, liked, np.ones(len(liked), np.float32)
            ) + self.item @ self.query[liked].sum(axis=0)
        return out

    def _liked(self, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.unique(idx[(weights > 0) & (idx >= 0) & (idx < self.n_items)])

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            **save_csr("gf_nb", self.neighbors),
            "gf_query": self.query,
            "gf_item": self.item,
            "gf_candidates": np.asarray(self.candidates),
            "gf_sharpen": np.asarray(self.sharpen),
            "gf_pop": np.asarray(self.pop),
            "gf_beta": np.asarray(self.beta),
        }

    @classmethod
    def load(cls, arrays) -> FactoredGraphFilter | None:
        if "gf_nb_shape" not in arrays:
            return None
        return cls(
            load_csr("gf_nb", arrays),
            arrays["gf_query"],
            arrays["gf_item"],
            int(arrays["gf_candidates"]),
            float(arrays["gf_sharpen"]),
            float(arrays["gf_pop"]),
            float(arrays["gf_beta"]),
        )


class FactoredScores(RequestScores):
    """One request's factored graph filter: its history's neighbour sums (over the items in
    those neighbour lists) and its user factor."""

    def __init__(self, model: FactoredGraphFilter, liked: np.ndarray) -> None:
        self.model = model
        liked = model._liked(np.asarray(liked, np.int64), np.ones(len(liked), np.float32))
        self.user = model.query[liked].sum(axis=0) if len(liked) else None
        cols, vals = gathered_rows(model.neighbors, liked)
        if 8 * len(cols) > model.n_items:  # a long history: summing over the catalogue in one
            # pass is cheaper than sorting its neighbour entries
            sums = np.bincount(cols, vals, minlength=model.n_items)
            self.cand = np.flatnonzero(sums)
            self.sparse = sums[self.cand].astype(np.float32)
        else:
            self.cand, inverse = np.unique(cols, return_inverse=True)
            self.sparse = np.bincount(inverse, vals, minlength=len(self.cand)).astype(np.float32)

    def at(self, idx: np.ndarray) -> np.ndarray:
        out = np.zeros(len(idx), np.float32)
        if self.user is None:
            return out
        known = np.flatnonzero((idx >= 0) & (idx < self.model.n_items))
        ids = idx[known]
        got = self.model.item[ids] @ self.user
        if len(self.cand):
            pos = np.minimum(np.searchsorted(self.cand, ids), len(self.cand) - 1)
            hit = self.cand[pos] == ids
            got[hit] += self.sparse[pos[hit]]
        out[known] = got
        return out

    def top(self, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        cand, sparse = self.cand, self.sparse
        if exclude is not None and len(exclude):
            keep = ~member(cand, np.unique(exclude))
            cand, sparse = cand[keep], sparse[keep]
        m = self.model.candidates
        if len(cand) > m:  # the best by neighbour sum are rescored in full
            best = np.argpartition(-sparse, m - 1)[:m]
            cand, sparse = cand[best], sparse[best]
        if not len(cand):
            return np.empty(0, np.int64), np.empty(0, np.float32)
        full = sparse + self.model.item[cand] @ self.user
        pos, vals = top_n(full, n)
        return cand[pos].astype(np.int64), vals


def sharpening_coefficients(time: float) -> list[float]:
    """c_k of exp(-time x) to fourth order: 1, -t, t²/2, -t³/6, t⁴/24."""
    coef = [1.0]
    for k in range(1, 5):
        coef.append(coef[-1] * -time / k)
    return coef


def rest_mean(graph: GraphFilter, coef: list[float], seed: int, probes: int = 16) -> float:
    """β = tr(P_rest p(P_rest)) / tr(P_rest): the sharpening polynomial's mean over P's
    eigenvalues outside the fitted basis, weighed by eigenvalue; the traces are Hutchinson
    estimates on random sign probes projected off the basis."""
    rng = np.random.default_rng(seed)
    u = graph.basis.astype(np.float64)
    z = rng.choice([-1.0, 1.0], size=(graph.n_items, probes))
    z -= u @ (u.T @ z)
    traces, y = [], z
    for _ in range(len(coef)):
        y = graph.by_item @ (graph.by_user @ y)
        y -= u @ (u.T @ y)  # keep round-off out of the basis
        traces.append(float((z * y).sum()))
    if traces[0] <= 0:
        return 1.0
    return float(sum(c * t for c, t in zip(coef, traces, strict=True)) / traces[0])


def low_rank(left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A Bᵀ the best rank-`rank` approximation of left rightᵀ (both items × m), from
    QR factorisations and the SVD of the small m × m core."""
    qa, ra = np.linalg.qr(left)
    qb, rb = np.linalg.qr(right)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    root = np.sqrt(s[:rank])
    return (qa @ (u[:, :rank] * root)).astype(np.float32), (qb @ (vt[:rank].T * root)).astype(
        np.float32
    )


def top_neighbors(
    by_item: sp.csr_matrix, by_user: sp.csr_matrix, k: int, scale: np.ndarray, block: int = 1024
) -> sp.csr_matrix:
    """Each item's k largest off-diagonal entries of P = by_item by_user (items × items),
    column j scaled by scale[j]; P is formed `block` rows at a time."""
    n = by_item.shape[0]
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        part = (by_item[start : start + block] @ by_user).tocoo()
        keep = part.row + start != part.col
        r, c = part.row[keep], part.col[keep]
        v = part.data[keep].astype(np.float32) * scale[c]
        order = np.lexsort((-v, r))
        r, c, v = r[order], c[order], v[order]
        first = np.searchsorted(r, r)  # where each row's run begins (r is sorted)
        keep = np.arange(len(r)) - first < k
        rows.append(r[keep] + start)
        cols.append(c[keep])
        vals.append(v[keep])
    m = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    m.sort_indices()
    return m


def _top_singular(m: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest singular values and right vectors of m (k < min(m.shape)). PROPACK first;
    ARPACK when PROPACK exhausts its Krylov space before k vectors (a rank below k). PROPACK is
    as fast as ARPACK on Gowalla, with the same singular values, and ARPACK's restarts crawl on
    degenerate spectra."""
    m = m.astype(np.float64)
    try:
        _, s, vt = svds(m, k=k, solver="propack", random_state=seed)
    except np.linalg.LinAlgError:
        v0 = np.random.default_rng(seed).standard_normal(min(m.shape))
        _, s, vt = svds(m, k=k, v0=v0, random_state=seed)
    return s, vt


def largest_component(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """The users and items (index arrays) of the largest connected component of the bipartite
    graph of x (users × items, nonzero = edge).

    Every component of that graph gives R̃ a singular value of exactly 1 (its √degree vector),
    so on a log of many small components the top singular vectors are those indicator vectors,
    one per component, and say nothing the linear filter does not (Diginetica's purchases:
    6,394 components, the largest 2,118 users and 1,671 items of 12.5k and 11.2k; the whole
    fit took 46 min on a shared machine, mostly in PROPACK, and takes 61 s fitted this way). The
    ideal low-pass filter is therefore fitted on the largest component; items outside it get
    only the linear filter. Gowalla is one component."""
    n_users, n_items = x.shape
    graph = sp.bmat([[None, x], [x.T, None]], format="csr")
    _, label = connected_components(graph, directed=False)
    big = np.argmax(np.bincount(label))
    return np.flatnonzero(label[:n_users] == big), np.flatnonzero(label[n_users:] == big)
