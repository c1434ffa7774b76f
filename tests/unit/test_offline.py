"""The served pipeline as an evaluation model (rec/offline.py): the `rec` variants and ablations
through the harness on small generated data, and `rec eval` registering them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from deployments.cli import eval_main
from rec import evaluation
from rec.config import RecConfig
from rec.data import generate
from rec.features import ORDERINGS
from rec.index import BruteForceIndex, HNSWIndex
from rec.offline import RecModel
from rec.splits import split_leave_last_out, split_prequential


def config() -> RecConfig:
    c = RecConfig()
    c.recall.embedding_dim, c.recall.gf_dim, c.recall.per_source = 16, 32, 50
    c.recall.index = "hnsw"  # 'auto' searches a catalogue this small exactly; rec-exact compares
    c.ranker.epochs, c.ranker.max_examples, c.ranker.hidden = 2, 400, [32]
    return c


@pytest.fixture(scope="module")
def data():
    return generate(n_users=200, n_items=100, n_events=4000, seed=1)


@pytest.fixture(scope="module")
def leave_last_out(data):
    split = split_leave_last_out(data)
    models = [RecModel(v, config()) for v in ("full", "recall", "ranker", "exact")]
    return split, models, evaluation.run(split, models, [10, 20])


def test_rec_variants_report_every_metric_and_beat_popularity(leave_last_out) -> None:
    split, _, result = leave_last_out
    pop = evaluation.run(split, evaluation.make_models(["pop"]), [10, 20])["results"][0]
    rows = {r["model"]: r for r in result["results"]}
    assert list(rows) == ["rec", "rec-recall", "rec-ranker", "rec-exact"]
    for r in rows.values():
        assert {"recall@20", "ndcg@20", "hr@10", "precision@10", "coverage@20"} <= set(r["metrics"])
        assert 0.0 <= r["metrics"]["ndcg@20"] <= 1.0
    assert rows["rec"]["metrics"]["ndcg@20"] > pop["metrics"]["ndcg@20"]


def test_ablations_are_the_same_trained_model_served_differently(leave_last_out) -> None:
    _, (full, recall, ranker, exact), _ = leave_last_out
    assert full.bundle.itemcf is recall.bundle.itemcf is ranker.bundle.itemcf is exact.bundle.itemcf
    chosen = full.bundle.metrics["recall_ordering"]
    assert full.bundle.ordering in (chosen, "ranker") and chosen in set(ORDERINGS) - {"ranker"}
    assert ranker.bundle.ordering == "ranker" and recall.bundle.ordering == chosen
    assert all(isinstance(s, BruteForceIndex) for s in exact.rec.index.shards)
    assert all(isinstance(s, HNSWIndex) for s in full.rec.index.shards)


def test_the_result_reports_what_training_chose(leave_last_out) -> None:
    _, (full, *_), result = leave_last_out
    info = result["results"][0]["training"]
    assert info["ordering"] == full.bundle.ordering
    assert set(info["ordering_ndcg"]) <= set(ORDERINGS)
    assert info["train_seconds"] > 0


def test_data_without_time_order_hold_out_a_random_share(data) -> None:
    """Where ts is only a file position (LightGCN lists items by id), a user's "last" events
    are not their latest, so the ranker's held-out events are a random share."""
    model = RecModel("full", config())
    model.config.ranker.max_examples = 50
    model.fit(split_leave_last_out(dataclasses.replace(data, ordered=False)).train)
    assert model.config.train.holdout == "random"
    assert RecModel("full", config()).config.train.holdout == "last"


def test_recommendations_leave_out_the_training_items(leave_last_out) -> None:
    split, (full, *_), _ = leave_last_out
    users = split.test_users[:20]
    top = full.recommend(users, 10)
    for u, row in zip(users.tolist(), top, strict=True):
        assert not set(row[row >= 0].tolist()) & set(split.train.matrix()[u].indices.tolist())


def test_prequential_static_stays_frozen_and_incremental_learns(data) -> None:
    split = split_prequential(data, 0.2)
    models = [RecModel(v, config()) for v in ("static", "incremental", "full")]
    result = evaluation.run_prequential(split, models, [10], users=split.test_users[:40])
    static, incremental, full = models
    assert len(static.records) == len(split.train)  # nothing was fed to it
    assert len(incremental.records) > len(split.train)  # every test event was
    assert incremental.rec.offset == len(incremental.records)
    assert len(full.records) == len(incremental.records)  # rec serves live, as deployed
    assert [r["model"] for r in result["results"]] == ["rec-static", "rec-incremental", "rec"]


def test_rec_eval_registers_the_pipeline_variants(data, tmp_path, capsys) -> None:
    path, out = tmp_path / "events.parquet", tmp_path / "result.json"
    pq.write_table(data.events, path)
    argv = [
        "--data",
        str(path),
        "--format",
        "csv",
        "--protocol",
        "leave-last-out",
        "--k",
        "10",
        "--models",
        "pop,rec-recall",
        "--json",
        str(out),
        "--max-users",
        "50",
    ]
    assert eval_main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["results"]] == ["pop", "rec-recall"]
    assert np.isfinite(result["results"][1]["metrics"]["ndcg@10"])
    assert "rec-recall" in capsys.readouterr().out
