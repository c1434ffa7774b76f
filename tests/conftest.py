"""Shared fixtures: seeded rng, torch devices, the shared data directory, small trained models."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from rec.config import AccessConfig, ApiKey, RecConfig

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def live_dataset(seed: int, days: float = 30.0):
    """The small generated data set the served tiers load: it ends now, as the events the tests
    post are stamped with the wall clock."""
    from rec.data import generate

    return generate(
        n_users=300,
        n_items=200,
        n_events=8000,
        seed=seed,
        days=days,
        start_ts=time.time() - days * 86400,
    )


# The stacks' API keys: an admin key every test client sends, and one key per other scope
# for the access tests.
ADMIN_KEY = "test-admin-key-0123456789"
SCOPED_KEYS = {scope: f"test-{scope}-key-0123456789" for scope in ("read", "events", "catalog")}
ADMIN = {"X-API-Key": ADMIN_KEY}
LIMITED_KEY = "test-limited-key-0123456789"  # read scope, 1 request/s, bursts of 2


def small_config(data_dir, topology: str = "fused") -> RecConfig:
    """A RecConfig that trains in seconds on the small test data sets, with the test keys."""
    config = RecConfig(data_dir=data_dir)
    config.access = AccessConfig(
        keys=[
            ApiKey(name="admin", key=ADMIN_KEY, scopes=["admin"]),
            *(ApiKey(name=s, key=k, scopes=[s]) for s, k in SCOPED_KEYS.items()),
            ApiKey(name="limited", key=LIMITED_KEY, scopes=["read"], rate_per_s=1, burst=2),
        ]
    )
    config.serving.topology = topology
    config.serving.reload_poll_s = 0.2
    config.serving.max_streams = 8  # a test reaches the bound
    config.train.every_s = config.checkpoint.every_s = None  # a test starts what it needs
    config.ranker.epochs = 1
    config.ranker.max_examples = 3000
    return config


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


@pytest.fixture(params=["cpu", "cuda"])
def torch_device(request) -> str:
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
