"""Ranker: learns a synthetic problem, calibrates, is deterministic, persists without pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rec.config import RankerConfig
from rec.ranker import (
    CALIBRATION_MIN_SLOPE,
    META_FILE,
    WEIGHTS_FILE,
    Ranker,
    RankerNet,
    auc,
    expected_calibration_error,
)

N_ITEMS = 50
USER_DIM = 8
N_DENSE = 3
DENSE_NAMES = ["recall_score", "log_popularity", "noise"]


def make_problem(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Label ~ Bernoulli(sigmoid(2 u.v + 1.5 z(dense0) + item bias - 0.5)).

    The dense features have very different scales so that standardisation matters.
    """
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(400, USER_DIM)) / np.sqrt(USER_DIM)
    items = rng.normal(size=(N_ITEMS, USER_DIM))
    bias = rng.normal(size=N_ITEMS)
    user_rows = rng.integers(0, len(users), n)
    item_idx = rng.integers(0, N_ITEMS, n)
    user_vec = users[user_rows]
    item_vec = items[item_idx]
    z = rng.normal(size=n)
    dense = np.stack([100.0 * z + 50.0, rng.exponential(3.0, n), 1e-3 * rng.normal(size=n)], axis=1)
    logit = 2.0 * (user_vec * item_vec).sum(axis=1) + 1.5 * z + bias[item_idx] - 0.5
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return {
        "item_idx": item_idx.astype(np.int64),
        "user_vec": user_vec.astype(np.float32),
        "item_vec": item_vec.astype(np.float32),
        "dense": dense.astype(np.float32),
        "labels": labels,
    }


def features(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in data.items() if k != "labels"}


def config(**overrides: object) -> RankerConfig:
    base: dict[str, object] = {"hidden": [32, 16], "epochs": 4, "batch_size": 256, "device": "cpu"}
    return RankerConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def problem() -> dict[str, np.ndarray]:
    return make_problem(20_000)


@pytest.fixture(scope="module")
def fitted(problem: dict[str, np.ndarray]) -> tuple[Ranker, dict[str, float], list]:
    ranker = Ranker(config(), N_ITEMS, USER_DIM, N_DENSE, DENSE_NAMES)
    epochs: list[tuple[int, dict]] = []
    metrics = ranker.fit(**problem, on_epoch=lambda e, m: epochs.append((e, m)))
    return ranker, metrics, epochs


@pytest.fixture(params=["cpu", "cuda"])
def torch_device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


def test_learns_and_calibrates(fitted, problem) -> None:
    ranker, metrics, epochs = fitted
    assert set(metrics) == {"train_loss", "valid_auc", "valid_logloss", "ece"}
    assert metrics["valid_auc"] > 0.8
    assert metrics["ece"] < 0.05
    assert 0.0 < metrics["valid_logloss"] < 0.6
    assert [e for e, _ in epochs] == [0, 1, 2, 3]
    assert all(set(m) == {"loss", "valid_auc"} for _, m in epochs)
    assert epochs[-1][1]["loss"] < epochs[0][1]["loss"]
    assert epochs[-1][1]["valid_auc"] == pytest.approx(metrics["valid_auc"])

    probs = ranker.predict(**features(problem))
    assert probs.shape == (20_000,) and probs.dtype == np.float32
    assert ((probs > 0) & (probs < 1)).all()
    assert auc(problem["labels"], probs) > 0.8


def test_dense_standardisation_uses_fit_statistics(fitted, problem) -> None:
    ranker, _, _ = fitted
    mean = ranker.net.dense_mean.numpy()
    std = ranker.net.dense_std.numpy()
    assert mean[0] == pytest.approx(50.0, abs=3.0)
    assert std[0] == pytest.approx(100.0, rel=0.05)
    assert std[2] == pytest.approx(1e-3, rel=0.05)


def test_same_seed_same_predictions() -> None:
    data = make_problem(4_000, seed=1)
    first = Ranker(config(epochs=2), N_ITEMS, USER_DIM, N_DENSE)
    second = Ranker(config(epochs=2), N_ITEMS, USER_DIM, N_DENSE)
    torch.manual_seed(123)  # the global RNG must not matter
    first.fit(**data)
    torch.manual_seed(456)
    second.fit(**data)
    np.testing.assert_allclose(
        first.predict(**features(data)), second.predict(**features(data)), atol=1e-6
    )
    other = Ranker(config(epochs=2, seed=7), N_ITEMS, USER_DIM, N_DENSE)
    other.fit(**data)
    assert not np.allclose(first.predict(**features(data)), other.predict(**features(data)))


def test_save_load_round_trip_without_pickle(fitted, problem, tmp_path, monkeypatch) -> None:
    ranker, _, _ = fitted
    ranker.save(tmp_path / "ranker")
    assert {p.name for p in (tmp_path / "ranker").iterdir()} == {META_FILE, WEIGHTS_FILE}
    meta = json.loads((tmp_path / "ranker" / META_FILE).read_text())
    assert meta["n_items"] == N_ITEMS and meta["dense_names"] == DENSE_NAMES
    assert meta["config"]["hidden"] == [32, 16]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = Ranker.load(tmp_path / "ranker", device="cpu")
    assert loaded.dense_names == DENSE_NAMES and loaded.device == torch.device("cpu")
    sample = {k: v[:3000] for k, v in features(problem).items()}
    np.testing.assert_array_equal(loaded.predict(**sample), ranker.predict(**sample))
    assert float(loaded.net.calib_a) == float(ranker.net.calib_a)


def test_unknown_items_are_scored(fitted) -> None:
    ranker, _, _ = fitted
    rng = np.random.default_rng(3)
    n = 5
    item_idx = np.array([N_ITEMS, N_ITEMS + 7, 10**9, -1, 3])
    user_vec = rng.normal(size=(n, USER_DIM)).astype(np.float32)
    item_vec = np.zeros((n, USER_DIM), dtype=np.float32)
    dense = np.tile(np.array([[50.0, 3.0, 0.0]], dtype=np.float32), (n, 1))
    probs = ranker.predict(item_idx, user_vec, item_vec, dense)
    assert probs.shape == (n,)
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
    # every unknown index shares one row: same user/dense features -> same score
    same_user = np.tile(user_vec[:1], (4, 1))
    shared = ranker.predict(item_idx[:4], same_user, item_vec[:4], dense[:4])
    assert np.ptp(shared) == 0.0


@pytest.mark.parametrize("sizes", [[7], [5, 5, 5], [3, 0, 6, 1]])
@pytest.mark.parametrize("item_embedding_dim", [0, 4])
def test_predict_requests_equals_predict_on_broadcast_rows(sizes, item_embedding_dim) -> None:
    """The serving path (one user vector per request, the first layer's user terms folded into
    the weights) scores every candidate as the per-row forward does, for one request, equal
    ones (no padding) and unequal ones (padded), with and without an item-id embedding."""
    ranker = Ranker(
        config(item_embedding_dim=item_embedding_dim, epochs=1),
        N_ITEMS,
        USER_DIM,
        N_DENSE,
        DENSE_NAMES,
    )
    data = make_problem(2_000, seed=5)
    ranker.fit(**data)
    rng = np.random.default_rng(6)
    n = sum(sizes)
    users = rng.normal(size=(len(sizes), USER_DIM)).astype(np.float32)
    item_idx = rng.integers(-1, N_ITEMS + 3, n)  # unknown ids too
    item_vec, dense = data["item_vec"][:n], data["dense"][:n]
    per_row = ranker.predict(item_idx, np.repeat(users, sizes, axis=0), item_vec, dense)
    grouped = ranker.predict_requests(users, sizes, item_idx, item_vec, dense)
    assert grouped.shape == (n,)
    np.testing.assert_allclose(grouped, per_row, rtol=1e-5, atol=1e-6)


def test_predict_requests_rejects_sizes_that_do_not_add_up(fitted) -> None:
    ranker, _, _ = fitted
    rows = np.zeros((4, USER_DIM), np.float32)
    with pytest.raises(ValueError, match="add up"):
        ranker.predict_requests(
            np.zeros((2, USER_DIM)), [2, 3], np.zeros(4, np.int64), rows, np.zeros((4, N_DENSE))
        )
    with pytest.raises(ValueError, match="user_vecs"):
        ranker.predict_requests(
            np.zeros((3, USER_DIM)), [2, 2], np.zeros(4, np.int64), rows, np.zeros((4, N_DENSE))
        )


def test_shape_mismatch_is_rejected(fitted) -> None:
    ranker, _, _ = fitted
    with pytest.raises(ValueError, match="dense"):
        ranker.predict(
            np.zeros(2, dtype=np.int64),
            np.zeros((2, USER_DIM)),
            np.zeros((2, USER_DIM)),
            np.zeros((2, N_DENSE + 1)),
        )


def test_auc_hand_computed() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # positives ranked 2.5 and 4 of 4 -> (6.5 - 3) / (2 * 2)
    assert auc([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert auc([1, 1, 1], [0.1, 0.2, 0.3]) == 0.5
    assert auc([0, 1, 1], [0.9, 0.2, 0.3]) == 0.0


def test_ece_hand_computed() -> None:
    # one row per bin 0, 4, 5, 9: (0.05 + 0.45 + 0.45 + 0.05) / 4
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.05, 0.45, 0.55, 0.95])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.25)
    # two rows in bin 1: |0.5 - 0.11|; p = 1.0 falls in the last bin
    assert expected_calibration_error([1, 0], [0.1, 0.12]) == pytest.approx(0.39)
    assert expected_calibration_error([1, 1], [1.0, 1.0]) == pytest.approx(0.0)
    assert expected_calibration_error([0, 1, 1], [0.2, 0.2, 0.2], bins=5) == pytest.approx(
        abs(2 / 3 - 0.2)
    )


class Wrapper(nn.Module):
    """Stands in for a DDP wrapper: holds the net as `.module` and counts forward calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(*args)


def test_prepare_model_hook() -> None:
    data = make_problem(4_000, seed=2)
    ranker = Ranker(config(epochs=3), N_ITEMS, USER_DIM, N_DENSE)
    net = ranker.net
    wrappers: list[Wrapper] = []

    def prepare(module: nn.Module) -> nn.Module:
        wrappers.append(Wrapper(module))
        return wrappers[-1]

    metrics = ranker.fit(**data, prepare_model=prepare)
    assert len(wrappers) == 1
    assert ranker.net is net and isinstance(ranker.net, RankerNet)
    # every training batch went through the wrapper: 3 epochs x ceil(3600 / 256) batches
    assert wrappers[0].calls == 3 * 15
    assert metrics["valid_auc"] > 0.75


def test_fit_and_predict_on_device(torch_device: str) -> None:
    data = make_problem(3_000, seed=4)
    ranker = Ranker(config(epochs=2, device=torch_device), N_ITEMS, USER_DIM, N_DENSE)
    assert ranker.device.type == torch_device
    metrics = ranker.fit(**data)
    assert metrics["valid_auc"] > 0.7
    probs = ranker.predict(**features(data))
    assert probs.shape == (3_000,) and probs.dtype == np.float32
    assert ((probs > 0) & (probs < 1)).all()


def test_calibration_never_reverses_the_learned_order(problem) -> None:
    """A validation split on which the ranker looks worse than chance (labels that favour its
    lowest scores) must not flip the order through a negative Platt slope."""
    ranker = Ranker(config(epochs=1), N_ITEMS, USER_DIM, N_DENSE, DENSE_NAMES)
    ranker.fit(**{k: v[:4_000] for k, v in problem.items()})
    arrays = ranker._arrays(
        *(problem[k][4_000:6_000] for k in ("item_idx", "user_vec", "item_vec", "dense"))
    )
    raw = ranker._logits(arrays, calibrated=False)
    reversed_labels = (raw < np.quantile(raw, 0.2)).astype(np.float32)
    metrics = ranker._calibrate(arrays, reversed_labels)
    assert metrics["valid_auc"] < 0.1  # the split does say "reverse it"
    assert float(ranker.net.calib_a) >= CALIBRATION_MIN_SLOPE
    calibrated = ranker._logits(arrays, calibrated=True)
    in_raw_order = calibrated[np.argsort(raw, kind="stable")]
    assert (np.diff(in_raw_order) >= 0).all() and in_raw_order[-1] > in_raw_order[0]


def test_no_validation_split() -> None:
    data = make_problem(1_000, seed=5)
    ranker = Ranker(config(epochs=1), N_ITEMS, USER_DIM, N_DENSE)
    metrics = ranker.fit(**data, valid_fraction=0.0)
    assert np.isnan(metrics["valid_auc"]) and np.isnan(metrics["ece"])
    assert float(ranker.net.calib_a) == 1.0 and float(ranker.net.calib_b) == 0.0


def test_save_creates_directory(tmp_path: Path) -> None:
    ranker = Ranker(config(), N_ITEMS, USER_DIM, 0)
    ranker.save(tmp_path / "a" / "b")
    loaded = Ranker.load(tmp_path / "a" / "b")
    empty = np.zeros((2, 0), dtype=np.float32)
    vec = np.ones((2, USER_DIM), dtype=np.float32)
    np.testing.assert_array_equal(
        loaded.predict([0, 1], vec, vec, empty), ranker.predict([0, 1], vec, vec, empty)
    )


def make_groups(n_groups: int, g: int, seed: int) -> dict[str, np.ndarray]:
    """Groups of g candidates of one request; the picked one (labelled 1, any position) is the
    candidate with the largest hidden utility 2 u.v + 1.5 z plus Gumbel noise."""
    rows = make_problem(n_groups * g, seed)
    rng = np.random.default_rng(seed + 1)
    z = (rows["dense"][:, 0] - 50.0) / 100.0
    utility = 2.0 * (rows["user_vec"] * rows["item_vec"]).sum(axis=1) + 1.5 * z
    utility += rng.gumbel(size=len(z))
    picked = utility.reshape(-1, g).argmax(axis=1)
    labels = np.zeros((n_groups, g), np.float32)
    labels[np.arange(n_groups), picked] = 1.0
    return {**rows, "labels": labels.ravel()}


def test_listwise_groups_learn_to_put_the_picked_candidate_first() -> None:
    g = 5
    ranker = Ranker(config(epochs=6), N_ITEMS, USER_DIM, N_DENSE, DENSE_NAMES)
    ranker.fit(**make_groups(3000, g, seed=1), group_size=g)
    test = make_groups(1000, g, seed=2)
    scores = ranker.predict(**features(test)).reshape(-1, g)
    truth = test["labels"].reshape(-1, g).argmax(axis=1)
    top1 = float((scores.argmax(axis=1) == truth).mean())
    best = (
        2.0 * (test["user_vec"] * test["item_vec"]).sum(axis=1)
        + 1.5 * (test["dense"][:, 0] - 50) / 100
    )
    oracle = float((best.reshape(-1, g).argmax(axis=1) == truth).mean())
    assert top1 > 0.35 and top1 > 0.8 * oracle  # chance is 0.2


def test_groups_must_be_whole_with_one_pick() -> None:
    data = make_groups(10, 4, seed=3)
    ranker = Ranker(config(), N_ITEMS, USER_DIM, N_DENSE, DENSE_NAMES)
    with pytest.raises(ValueError, match="groups of 3"):
        ranker.fit(**data, group_size=3)
    data["labels"][:4] = 0.0
    with pytest.raises(ValueError, match="exactly one"):
        ranker.fit(**data, group_size=4)
