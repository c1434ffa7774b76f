"""A replica's hot reload (rec/live.py): the next version's state is built beside the serving
one, shares its profiles, and serves what a full replay of the log under that version serves."""

from __future__ import annotations

from rec.data import generate
from rec.events import user_delete_record
from rec.model import publish
from rec.pipeline import Recommender
from rec.train import snapshot_table, train
from tests.unit.test_beacon import _live
from tests.unit.test_checkpoint import assert_same_state
from tests.unit.test_pipeline import make_config


def test_a_swap_keeps_the_replicas_profiles_and_equals_a_full_replay(tmp_path) -> None:
    config = make_config()
    config.data_dir = tmp_path
    ds = generate(n_users=60, n_items=40, n_events=1500, seed=5)
    records = ds.item_records() + ds.event_records()
    gone = records[-1]["user_id"]

    async def body(live, log, reads) -> None:
        await log.append.remote(records[:1200])
        await live.sync()
        store = live.rec.profiles
        assert store.offset == 1200 and live.rec.version is None
        model = train(
            snapshot_table(await log.read.remote(0, 10_000)), config, fit_ranker=None, version="v1"
        )
        model.save(config.model_dir, model.build_index(config.recall))
        publish(config.model_dir, "v1")
        # appended, not yet applied: the swap brings the store up to date once
        await log.append.remote(records[1200:] + [user_delete_record(gone, ts=1.8e9)])
        assert await live.reload_if_changed()
        assert live.rec.version == "v1" and live.rec.profiles is store
        assert store.offset == live.rec.offset == len(records) + 1
        assert gone not in store.users
        full = Recommender(config, model)
        full.apply(await log.read.remote(0, 10_000))
        assert_same_state(full.state, live.rec.state)
        for user in list(full.profiles.users.live)[:10]:
            assert live.rec.recommend(user, 5)["items"] == full.recommend(user, 5)["items"]

    _live(tmp_path, body, config)
