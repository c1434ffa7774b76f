"""Ranking model: a small torch MLP that scores (user, item) candidates from pre-computed features.

The caller assembles the features (embeddings, recall scores, popularity, context ...); this
module only sees arrays, so the same code trains inside a distributed worker and serves in any
process. Probabilities are Platt-calibrated on a held-out split so that scores keep their meaning
across retrains. Persistence is safetensors + JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from safetensors.torch import load_file, save_file
from scipy.special import expit
from scipy.stats import rankdata
from torch import Tensor, nn
from torch.nn import functional as F

from rec.config import RankerConfig

WEIGHTS_FILE = "model.safetensors"
META_FILE = "ranker.json"
FORMAT_VERSION = 1
PREDICT_BATCH = 65536
# Standardised dense features are clipped here: a value far outside what training saw (an item
# age years past the training data, say) is read as the edge of that range, not extrapolated.
DENSE_CLIP = 5.0
# Share of training rows whose item id is hidden (mapped to the unknown row) so that row learns
# the prior of a new item instead of staying at its random initialisation.
UNKNOWN_ID_RATE = 0.05
CALIBRATION_MIN_SLOPE = 1e-3  # Platt slope floor: calibration keeps the ranker's order
CALIBRATION_STEPS = 200

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda when available else cpu; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (init, dropout) without disturbing the caller's RNG state."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _take(arrays: Arrays, rows: np.ndarray) -> Arrays:
    """The given rows of every feature array."""
    idx, user, item, dense = arrays
    return idx[rows], user[rows], item[rows], dense[rows]


class RankerNet(nn.Module):
    """(Item-id embedding +) user/item vectors + standardised dense features -> one logit.

    Row `n_items` of the embedding is the shared "unknown item" row: any index outside
    [0, n_items) maps to it. Buffers hold the dense standardisation and the Platt calibration,
    so one state_dict is the whole model.
    """

    def __init__(
        self,
        n_items: int,
        user_dim: int,
        n_dense: int,
        item_embedding_dim: int,
        hidden: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_items = n_items
        # Optional: on held-out replays an id embedding overfit (validation NDCG fell below the
        # recall blend on ml-100k), so the default ranks by features and vectors alone.
        self.item_emb = (
            nn.Embedding(n_items + 1, item_embedding_dim) if item_embedding_dim else None
        )
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.register_buffer("calib_a", torch.ones(()))
        self.register_buffer("calib_b", torch.zeros(()))
        layers: list[nn.Module] = []
        width = item_embedding_dim + 3 * user_dim + n_dense + 1
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, item_idx: Tensor, user_vec: Tensor, item_vec: Tensor, dense: Tensor
    ) -> Tensor:
        """Raw (uncalibrated) logits [n]: what training optimises."""
        product = user_vec * item_vec
        ids = [self._id_embedding(item_idx)] if self.item_emb is not None else []
        x = torch.cat(
            [
                *ids,
                user_vec,
                item_vec,
                product,
                self._standardised(dense),
                product.sum(dim=-1, keepdim=True),
            ],
            dim=-1,
        )
        return self.mlp(x).squeeze(-1)

    def _id_embedding(self, item_idx: Tensor) -> Tensor:
        """Each item's id embedding; any index outside [0, n_items) reads the unknown row."""
        known = (item_idx >= 0) & (item_idx < self.n_items)
        return self.item_emb(torch.where(known, item_idx, self.n_items))

    def _standardised(self, dense: Tensor) -> Tensor:
        return ((dense - self.dense_mean) / self.dense_std).clamp(-DENSE_CLIP, DENSE_CLIP)

    def forward_requests(
        self,
        user_vec: Tensor,
        sizes: list[int],
        item_idx: Tensor,
        item_vec: Tensor,
        dense: Tensor,
    ) -> Tensor:
        """`forward` for the candidates of requests that share one user vector each: user_vec
        [g, d], and sizes[r] consecutive rows per request r. The first layer's user terms fold
        into one [hidden, d] weight and one bias per request,
            u·W_u + x·W_i + (u∘x)·W_p + (u·x) w_s = u·W_u + x·(W_i + (W_p + w_s) diag(u)),
        so a candidate costs a third of the first layer's multiply-adds and no [n, 3d] input is
        built. Same logits as `forward` on the broadcast rows, up to float rounding."""
        first, *rest = self.mlp
        d = user_vec.shape[1]
        e = self.item_emb.embedding_dim if self.item_emb is not None else 0
        w_e, w_u, w_i, w_p, w_d, w_s = first.weight.split(
            [e, d, d, d, self.dense_mean.numel(), 1], dim=1
        )
        bias = torch.addmm(first.bias, user_vec, w_u.T)  # [g, hidden]
        folded = w_i + (w_p + w_s) * user_vec[:, None, :]  # [g, hidden, d]
        g, width = len(sizes), max(sizes, default=0)
        if all(size == width for size in sizes):  # one request (or equal ones): no padding
            rows, padded = None, item_vec.view(g, width, d)
        else:  # each request's rows padded to the longest request
            counts = torch.as_tensor(sizes, device=item_vec.device)
            starts = torch.cumsum(counts, 0) - counts
            offsets = torch.arange(g, device=item_vec.device) * width - starts
            rows = torch.arange(len(item_vec), device=item_vec.device) + offsets.repeat_interleave(
                counts
            )
            padded = item_vec.new_zeros(g * width, d).index_copy_(0, rows, item_vec)
            padded = padded.view(g, width, d)
        h = torch.baddbmm(bias[:, None, :], padded, folded.transpose(1, 2)).flatten(0, 1)
        if rows is not None:
            h = h[rows]
        h = torch.addmm(h, self._standardised(dense), w_d.T)
        if self.item_emb is not None:
            h = torch.addmm(h, self._id_embedding(item_idx), w_e.T)
        for layer in rest:
            h = layer(h)
        return h.squeeze(-1)

    def calibrate(self, logits: Tensor) -> Tensor:
        """Platt-scaled logits: a * logit + b."""
        return self.calib_a * logits + self.calib_b


class Ranker:
    """Trains, calibrates, scores and persists a `RankerNet` over numpy feature arrays."""

    def __init__(
        self,
        config: RankerConfig,
        n_items: int,
        user_dim: int,
        n_dense: int,
        dense_names: list[str] | None = None,
    ) -> None:
        if dense_names is not None and len(dense_names) != n_dense:
            raise ValueError(f"{len(dense_names)} dense_names for n_dense={n_dense}")
        self.config = config
        self.n_items = n_items
        self.user_dim = user_dim
        self.n_dense = n_dense
        self.dense_names = list(dense_names) if dense_names is not None else None
        self.device = resolve_device(config.device)
        # Initialised on the CPU so that a seed gives the same weights on every device.
        with _seeded(config.seed, torch.device("cpu")):
            self.net = RankerNet(
                n_items, user_dim, n_dense, config.item_embedding_dim, config.hidden, config.dropout
            )
        self.net.to(self.device)

    def fit(
        self,
        item_idx: ArrayLike,
        user_vec: ArrayLike,
        item_vec: ArrayLike,
        dense: ArrayLike,
        labels: ArrayLike,
        *,
        group_size: int = 1,
        valid_fraction: float = 0.1,
        prepare_model: Callable[[nn.Module], nn.Module] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
    ) -> dict[str, float]:
        """Train on the examples (warm-starting from the current weights), then calibrate.

        With `group_size` 1 every row is an independent labelled example (binary cross-entropy).
        With `group_size` g > 1 the rows are consecutive groups of g candidates of one request,
        exactly one of them labelled 1 (the item the user picked), and the loss is the softmax
        cross-entropy of the picked item within its group: the ranker learns to order one
        request's candidates, which is its job when serving.

        A seeded random `valid_fraction` of the rows (of the groups) is held out: it reports AUC
        each epoch and fits the Platt calibration afterwards. `prepare_model` may wrap the net
        (e.g. for distributed data parallel); training runs through the wrapper while `self.net`
        stays the unwrapped module. `on_epoch(epoch, {"loss", "valid_auc"})` is called after each
        epoch (epochs count from 0). Validation metrics are NaN when no row is held out.
        """
        cfg = self.config
        arrays = self._arrays(item_idx, user_vec, item_vec, dense)
        y = np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)
        n = len(y)
        if len(arrays[0]) != n:
            raise ValueError(f"{len(arrays[0])} feature rows for {n} labels")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        if not all(np.isfinite(a).all() for a in (*arrays[1:], y)):
            raise ValueError("non-finite values in the features or labels")
        g = int(group_size)
        if g < 1 or n % g:
            raise ValueError(f"{n} rows do not split into groups of {group_size}")
        if g > 1 and not (y.reshape(-1, g).sum(axis=1) == 1).all():
            raise ValueError("every group needs exactly one row labelled 1")

        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(n // g)
        n_valid = int(round(n // g * valid_fraction))
        valid_rows = (order[:n_valid, None] * g + np.arange(g)).ravel()
        train_rows = (order[n_valid:, None] * g + np.arange(g)).ravel()
        if train_rows.size == 0:
            raise ValueError("no training rows")
        train, valid = _take(arrays, train_rows), _take(arrays, valid_rows)
        y_valid = y[valid_rows]

        dense_train = train[3].astype(np.float64)
        std = dense_train.std(axis=0)
        std[std < 1e-6] = 1.0
        self.net.dense_mean.copy_(torch.from_numpy(dense_train.mean(axis=0)))
        self.net.dense_std.copy_(torch.from_numpy(std))

        rate = float(np.clip(y[train_rows].mean(), 1e-4, 1 - 1e-4))
        with torch.no_grad():  # start at the base rate, so early steps learn ranking, not the prior
            self.net.mlp[-1].bias.fill_(math.log(rate / (1 - rate)))
        model = prepare_model(self.net) if prepare_model is not None else self.net
        self.net = getattr(model, "module", model)
        self.device = next(self.net.parameters()).device
        t_idx, t_user, t_item, t_dense = (torch.from_numpy(a).to(self.device) for a in train)
        t_y = torch.from_numpy(y[train_rows]).to(self.device)
        n_train = len(train_rows) // g  # training units: rows, or groups of g rows
        per_batch = max(1, cfg.batch_size // g)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )

        train_loss = math.nan
        with _seeded(cfg.seed, self.device):
            for epoch in range(cfg.epochs):
                model.train()
                perm = torch.from_numpy(rng.permutation(n_train)).to(self.device)
                hide = torch.from_numpy(rng.random(n_train * g) < UNKNOWN_ID_RATE).to(self.device)
                total = torch.zeros((), device=self.device)
                offsets = torch.arange(g, device=self.device)
                for start in range(0, n_train, per_batch):
                    units = perm[start : start + per_batch]
                    rows = (units[:, None] * g + offsets).reshape(-1)
                    idx = torch.where(hide[rows], self.n_items, t_idx[rows])
                    logits = model(idx, t_user[rows], t_item[rows], t_dense[rows])
                    if g == 1:
                        loss = F.binary_cross_entropy_with_logits(logits, t_y[rows])
                    else:
                        loss = F.cross_entropy(logits.view(-1, g), t_y[rows].view(-1, g).argmax(1))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * len(units)
                train_loss = float(total) / n_train
                valid_auc = (
                    auc(y_valid, self._logits(valid, calibrated=False)) if n_valid else math.nan
                )
                if on_epoch is not None:
                    on_epoch(epoch, {"loss": train_loss, "valid_auc": valid_auc})

        return {"train_loss": train_loss, **self._calibrate(valid, y_valid)}

    def predict(
        self, item_idx: ArrayLike, user_vec: ArrayLike, item_vec: ArrayLike, dense: ArrayLike
    ) -> np.ndarray:
        """Calibrated click/like probabilities, float32 [n]."""
        return expit(
            self._logits(self._arrays(item_idx, user_vec, item_vec, dense), calibrated=True)
        )

    def predict_requests(
        self,
        user_vecs: ArrayLike,
        sizes: ArrayLike,
        item_idx: ArrayLike,
        item_vec: ArrayLike,
        dense: ArrayLike,
    ) -> np.ndarray:
        """`predict` for the candidates of several requests, each scored against its user's one
        vector: user_vecs [g, d], and sizes[r] consecutive candidate rows per request r (what
        serving has; `RankerNet.forward_requests` spends a third of the work per candidate)."""
        users = np.ascontiguousarray(user_vecs, dtype=np.float32)
        counts = np.asarray(sizes, np.int64).reshape(-1)
        if users.ndim != 2 or users.shape != (len(counts), self.user_dim):
            raise ValueError(
                f"user_vecs has shape {users.shape}, expected {(len(counts), self.user_dim)}"
            )
        idx, item, dns = self._candidates(item_idx, item_vec, dense)
        if counts.sum() != len(idx) or (counts < 0).any():
            raise ValueError(f"sizes {counts.tolist()} do not add up to {len(idx)} rows")
        net = self._eval_net()
        with torch.inference_mode():
            t_users, t_idx, t_item, t_dense = (
                torch.from_numpy(a).to(self.device) for a in (users, idx, item, dns)
            )
            logits = net.calibrate(
                net.forward_requests(t_users, counts.tolist(), t_idx, t_item, t_dense)
            )
            return expit(logits.float().cpu().numpy())

    def save(self, path: str | Path) -> None:
        """Write `model.safetensors` (weights and buffers) and `ranker.json` into directory `path`."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "n_items": self.n_items,
            "user_dim": self.user_dim,
            "n_dense": self.n_dense,
            "dense_names": self.dense_names,
            "config": self.config.model_dump(mode="json"),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Ranker:
        """Read a directory written by `save`; `device` overrides the saved config's device."""
        directory = Path(path)
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported ranker format {meta.get('format')!r} in {directory}")
        config = meta["config"] if device is None else {**meta["config"], "device": device}
        ranker = cls(
            RankerConfig.model_validate(config),
            meta["n_items"],
            meta["user_dim"],
            meta["n_dense"],
            meta["dense_names"],
        )
        ranker.net.load_state_dict(load_file(directory / WEIGHTS_FILE))
        ranker.net.eval()
        return ranker

    def _arrays(
        self,
        item_idx: ArrayLike,
        user_vec: ArrayLike,
        item_vec: ArrayLike,
        dense: ArrayLike,
    ) -> Arrays:
        """Contiguous int64/float32 arrays, one row per candidate, shapes checked against the
        model's dimensions."""
        idx, item, dns = self._candidates(item_idx, item_vec, dense)
        user = np.ascontiguousarray(user_vec, dtype=np.float32)
        if user.shape != (len(idx), self.user_dim):
            raise ValueError(
                f"user_vec has shape {user.shape}, expected {(len(idx), self.user_dim)}"
            )
        return idx, user, item, dns

    def _candidates(
        self, item_idx: ArrayLike, item_vec: ArrayLike, dense: ArrayLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The candidates' own arrays (index, item vector, dense features), contiguous
        int64/float32, shapes checked."""
        idx = np.ascontiguousarray(item_idx, dtype=np.int64).reshape(-1)
        item = np.ascontiguousarray(item_vec, dtype=np.float32)
        dns = np.ascontiguousarray(dense, dtype=np.float32)
        for name, array, width in (("item_vec", item, self.user_dim), ("dense", dns, self.n_dense)):
            if array.shape != (len(idx), width):
                raise ValueError(f"{name} has shape {array.shape}, expected {(len(idx), width)}")
        return idx, item, dns

    def _eval_net(self) -> RankerNet:
        """The net in eval mode (switched only when training left it in train mode)."""
        return self.net.eval() if self.net.training else self.net

    def _logits(self, arrays: Arrays, *, calibrated: bool) -> np.ndarray:
        """Logits (raw or Platt-scaled) in eval mode, in batches of at most PREDICT_BATCH rows."""
        net = self._eval_net()
        n = len(arrays[0])
        out = np.empty(n, dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, PREDICT_BATCH):
                batch = (
                    torch.from_numpy(a[start : start + PREDICT_BATCH]).to(self.device)
                    for a in arrays
                )
                logits = net(*batch)
                if calibrated:
                    logits = net.calibrate(logits)
                out[start : start + PREDICT_BATCH] = logits.float().cpu().numpy()
        return out

    def _calibrate(self, valid: Arrays, y_valid: np.ndarray) -> dict[str, float]:
        """Fit Platt scaling on the validation split; return its AUC, log loss and ECE.

        The slope is kept positive (a = exp(θ), at least CALIBRATION_MIN_SLOPE): calibration
        rescales scores and never reverses the order the ranker learned. A free slope turned
        negative on a small validation split whose AUC fell below 0.5 (Diginetica: 306 groups,
        AUC 0.45) and the reversed ranker then hit nothing in the test."""
        if len(y_valid) == 0:
            self.net.calib_a.fill_(1.0)
            self.net.calib_b.fill_(0.0)
            return {"valid_auc": math.nan, "valid_logloss": math.nan, "ece": math.nan}
        logits = torch.from_numpy(self._logits(valid, calibrated=False)).double()
        target = torch.from_numpy(y_valid).double()
        ab = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)  # θ = log a, b

        def slope() -> Tensor:
            return ab[0].exp().clamp_min(CALIBRATION_MIN_SLOPE)

        if 0.0 < float(target.mean()) < 1.0:  # with one class the optimum is at infinity
            optimizer = torch.optim.LBFGS(
                [ab], max_iter=CALIBRATION_STEPS, line_search_fn="strong_wolfe"
            )

            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = F.binary_cross_entropy_with_logits(slope() * logits + ab[1], target)
                loss.backward()
                return loss

            optimizer.step(closure)
        a, b = float(slope().detach()), float(ab[1].detach())
        self.net.calib_a.fill_(a)
        self.net.calib_b.fill_(b)
        scaled = a * logits + b
        return {
            "valid_auc": auc(y_valid, logits.numpy()),
            "valid_logloss": float(F.binary_cross_entropy_with_logits(scaled, target)),
            "ece": expected_calibration_error(y_valid, torch.sigmoid(scaled).numpy()),
        }


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC by the Mann-Whitney rank statistic, ties averaged; 0.5 when one class is missing."""
    y = np.asarray(labels).reshape(-1) > 0.5
    ranks = rankdata(np.asarray(scores, dtype=np.float64).reshape(-1))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, bins: int = 10) -> float:
    """Sum over equal-width probability bins of (share of rows) * |mean label - mean prob|.

    NaN for empty input.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(p) == 0:
        return math.nan
    which = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    label_sum = np.bincount(which, weights=y, minlength=bins)
    prob_sum = np.bincount(which, weights=p, minlength=bins)
    return float(np.abs(label_sum - prob_sum).sum() / len(p))
