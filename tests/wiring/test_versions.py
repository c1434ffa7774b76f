"""One model version per request: continuous requests across a swap in the split topology, and
every answer's items, scores and model_version are those of one version's whole pipeline. The
replicas start, and build the second version's state, from a checkpoint of the first version
taken before the log's end, so the answers also show checkpoint + tail == a full replay."""

from __future__ import annotations

import copy
import importlib
import shutil
import time

from ray import serve

import deployments.app
import deployments.ingress
from deployments.eventlog import EventLogService, LocalHandle
from rec import checkpoint
from rec.eventlog import EventLog
from rec.model import ModelBundle, load_saved_index, publish
from rec.pipeline import Recommender
from rec.train import train
from tests.conftest import small_config

USERS = [f"u{n}" for n in range(1, 9)]
K = 10


def _ranked_version(model: ModelBundle, name: str, config) -> ModelBundle:
    """`model` served by its ranker under another version name (saved, not published)."""
    out = copy.copy(model)
    out.version, out.ordering = name, "ranker"
    out.save(config.model_dir, out.build_index(config.recall))
    return out


def _answer(out: dict) -> tuple:
    return tuple((i["item_id"], i["score"]) for i in out["items"])


def test_every_answer_comes_from_one_version_across_a_swap(tmp_path, trained) -> None:
    src, _ = trained
    shutil.copytree(src, tmp_path / "data")
    config = small_config(tmp_path / "data", "split")
    with EventLog(config.log_dir, config.eventlog) as log:
        table = log.table()
    other = config.model_copy(deep=True)
    other.ranker.seed = 7  # another ranker: mixing it with the first version's candidates shows
    first = _ranked_version(train(table, config), "v-first", config)
    second = _ranked_version(train(table, other), "v-second", config)
    publish(config.model_dir, first.version)
    records = table.to_pylist()
    cut = len(records) - 300  # the last 300 records come from the log, the rest from the checkpoint
    taken = Recommender(config, first, load_saved_index(config.model_dir / first.version))
    taken.apply(records[:cut])
    ckpt = checkpoint.save(taken.state, config.checkpoint_dir)

    handle_log = LocalHandle(
        lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump())
    )
    importlib.reload(deployments.ingress)
    importlib.reload(deployments.app)
    handle = serve.run(
        deployments.app.build_app(config, log=handle_log), _local_testing_mode=True, name="rec-v"
    )
    answers: list[tuple[str, str, tuple]] = []
    started_from = []
    try:
        deadline = time.monotonic() + 60
        published_at = None
        after_swap = 0
        while time.monotonic() < deadline and after_swap < 3 * len(USERS):
            for user in USERS:
                out = handle.recommend.remote({"user_id": user, "k": K}).result()
                answers.append((out["model_version"], user, _answer(out)))
                after_swap += out["model_version"] == second.version
            started_from.append(handle.model_info.remote().result()["started_from"])
            seen = {v for v, _, _ in answers}
            if published_at is None and first.version in seen:
                publish(config.model_dir, second.version)  # mid-traffic: the swap begins
                published_at = len(answers)
    finally:
        handle_log.close()

    assert set(started_from) == {ckpt.name}  # both versions' states came from it
    versions = [v for v, _, _ in answers]
    assert first.version in versions and second.version in versions, set(versions)
    expected = {}
    for model in (first, second):
        rec = Recommender(config, model, load_saved_index(config.model_dir / model.version))
        with EventLog(config.log_dir, config.eventlog) as log:
            rec.apply(log.table().to_pylist())  # impressions appended meanwhile change nothing
        expected[model.version] = {u: _answer(rec.recommend(u, K)) for u in USERS}
    assert expected[first.version] != expected[second.version]
    for version, user, answer in answers:
        assert answer == expected[version][user], (version, user, answer, expected[version][user])
