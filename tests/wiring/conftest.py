"""Wiring tier: the Serve app in local testing mode (one process, no Ray), both topologies,
on a small generated data set with a model trained by the pure training code."""

from __future__ import annotations

import importlib

import pytest

from rec.model import publish
from rec.train import train
from tests.conftest import live_dataset, small_config


@pytest.fixture(scope="module", autouse=True)
def fresh_ingress_afterwards():
    """Serve's local testing mode binds the routes of the module-level FastAPI app to the replica
    it creates, so a real deployment later in the same process would pickle that replica (its
    model and running tasks) along with the class: the ingress and app modules are imported
    afresh after each wiring module, for whichever tests run next."""
    yield
    import deployments.app
    import deployments.ingress

    importlib.reload(deployments.ingress)
    importlib.reload(deployments.app)


@pytest.fixture(scope="session")
def dataset():
    return live_dataset(seed=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, dataset):
    """A data dir with the data set in its log and a published model (built once)."""
    from rec.eventlog import EventLog

    root = tmp_path_factory.mktemp("wiring")
    config = small_config(root, "fused")
    records = dataset.item_records() + dataset.event_records()
    with EventLog(config.log_dir, config.eventlog) as log:
        log.append(records)
        table = log.table()
    model = train(table, config)
    model.save(config.model_dir, model.build_index(config.recall))
    publish(config.model_dir, model.version)
    return root, model
