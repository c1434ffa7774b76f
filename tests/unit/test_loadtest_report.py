"""The load test's pure parts: percentiles, result rows, targets, summary and plot (no server)."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from loadtest import report
from loadtest.client import Client, Population


def test_percentile_matches_numpy() -> None:
    rng = random.Random(0)
    xs = [rng.expovariate(0.05) for _ in range(1001)]
    for q in (0, 50, 95, 99, 100):
        assert report.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert report.percentile([], 99) is None
    assert report.percentile([7.0], 99) == 7.0


def test_scenario_row_has_the_required_fields() -> None:
    row = report.scenario_row("recommend", 8, 2.0, [10.0] * 99 + [50.0], errors=2, extra=1)
    assert {"name", "concurrency", "rps", "p50_ms", "p95_ms", "p99_ms", "errors"} <= set(row)
    assert row["rps"] == 51.0  # errors are answered requests too
    assert row["p50_ms"] == 10.0 and row["p99_ms"] > 10.0 and row["extra"] == 1
    json.dumps(row)


def _results(rec8_rps=130.0, rec8_p99=90.0, stale=0, never_pushed=0) -> dict:
    row = report.scenario_row
    fresh = {"samples": 50, "stale_first_reads": stale, "p99_ms": 40.0}
    scenarios = [
        row("floor", 8, 1, [5.0] * 177, 0),
        row("floor-proxy", 8, 1, [25.0] * 150, 0),
        row("recommend-proxy", 8, 1, [70.0] * 110, 0),
        {**row("recommend", 8, 1, [40.0] * int(rec8_rps), 0), "p99_ms": rec8_p99},
        row("recommend", 32, 1, [200.0] * 125, 0),
        {**row("mixed", 8, 1, [40.0] * 100, 0), "freshness": fresh},
        {**row("events-batch", 4, 1, [50.0] * 20, 0), "events_per_s": 20_000.0},
        row("events-single", 1, 1, [12.0] * 80, 0),
        row("retrain-baseline", 8, 1, [80.0] * 100, 0),
        {**row("retrain", 8, 1, [100.0] * 100, 0), "swapped": True},
        {
            **row("overload", None, 1, [300.0] * 100, 0),
            "rejected": {"count": 200, "p99_ms": 20.0},
            "offered": 300,
        },
        row("recovery", 8, 1, [60.0] * 120, 0),
        row("pipeline", 1, 1, [10.0] * 100, 0),
        {
            **row("push", 8, 1, [20.0] * 50, never_pushed),
            "streams": 20,
            "lists_received": 70,
            "never_pushed": never_pushed,
        },
    ]
    return {
        "machine": "test",
        "cpu_count": 2,
        "scenarios": scenarios,
        "new_items": {"seconds": [0.03, 0.05], "not_seen": 0, "timeout_s": 10},
    }


def test_targets_pass_and_fail_on_the_right_figures() -> None:
    targets = {t["target"]: t for t in report.evaluate_targets(_results())}
    assert set(targets) == set(report.TARGET_TEXT)
    assert all(t["ok"] for t in targets.values()), [t for t in targets.values() if not t["ok"]]
    bad = {t["target"]: t for t in report.evaluate_targets(_results(100.0, 150.0, stale=1))}
    assert bad["recommend_vs_floor"]["ok"] is False  # 100 < 0.7 * 177
    assert bad["recommend8_p99"]["ok"] is False
    assert bad["freshness_reflected"]["ok"] is False
    assert bad["recommend32_scaling"]["ok"] is True  # 125 >= 0.9 * 100
    assert bad["recommend_vs_floor_proxy"]["ok"] is False  # 100 < 0.7 * 150
    assert bad["recommend_proxy_vs_floor_proxy"]["ok"] is True  # 110 >= 0.7 * 150
    assert targets["pipeline_share"]["value"] == 0.65  # 130 / (2 cores * 100)
    assert bad["pipeline_share"]["ok"] is False  # 100 / 200 < 0.6
    lost = {t["target"]: t for t in report.evaluate_targets(_results(never_pushed=1))}
    assert lost["push_every_event"]["ok"] is False and lost["push_p99"]["ok"] is True


def test_missing_scenarios_are_not_measured_rather_than_failed() -> None:
    targets = report.evaluate_targets({"scenarios": []})
    assert {t["ok"] for t in targets} == {None}


def test_summary_and_plot(tmp_path) -> None:
    results = _results()
    results["targets"] = report.evaluate_targets(results)
    md = report.to_markdown(results)
    assert "| recommend | 8 |" in md and "## Targets" in md and "## Push" in md
    report.plot(results, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_only_targets_this_machine() -> None:
    with pytest.raises(ValueError):
        Client("http://example.org:8000")
    Client("http://127.0.0.1:8000")


def test_user_mix() -> None:
    from rec.data import generate

    pop = Population.from_dataset(generate(n_users=50, n_items=40, n_events=2000, seed=1))
    pop.active = ["a1", "a2"]
    rng = random.Random(0)
    kinds = [pop.user_mix(rng)[0] for _ in range(4000)]
    share = {k: kinds.count(k) / len(kinds) for k in ("known", "cold", "active")}
    assert share["known"] == pytest.approx(0.70, abs=0.03)
    assert share["cold"] == pytest.approx(0.15, abs=0.03)
    assert pop.item(rng) in set(pop.items)


def test_client_sends_to_the_base_with_fewest_requests_in_flight() -> None:
    """Several direct-ingress URLs: least requests in flight first, in turn among equals."""
    a, b, c = "http://127.0.0.1:30000", "http://127.0.0.1:30001", "http://127.0.0.1:30002"
    client = Client([a, b, c])
    assert {client._pick() for _ in range(3)} == {a, b, c}  # equals: each in turn
    client._in_flight.update({a: 2, b: 0, c: 1})
    assert {client._pick() for _ in range(6)} == {b}
    client._in_flight.update({b: 3})
    assert client._pick() == c
    with pytest.raises(ValueError):
        Client([a, "http://example.org:30000"])


def test_open_loop_fires_at_the_rate_whatever_the_answers_do() -> None:
    """Every scheduled request starts, slow answers do not hold the next ones back, and the
    call returns once all have finished."""
    import asyncio

    from loadtest.client import open_loop

    fired: list[float] = []
    done: list[float] = []

    async def fire(due: float) -> None:
        fired.append(due)
        await asyncio.sleep(0.05)  # answers slower than the interval between sends
        done.append(due)

    started = asyncio.run(open_loop(200.0, 0.098, fire))
    assert started == 20 and len(fired) == 20 and sorted(done) == sorted(fired)
    gaps = np.diff(fired)
    assert gaps == pytest.approx([0.005] * 19)


def test_client_resends_a_refused_request_to_another_replica() -> None:
    """A replica whose port refuses (killed, restarting elsewhere): the request goes to the
    next one, as a load balancer with redispatch does; all refusing is a failure (-1)."""
    import asyncio
    import socket

    from aiohttp import web

    def closed_port() -> str:
        with socket.socket() as s:  # bound then closed: nothing listens there
            s.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{s.getsockname()[1]}"

    async def scenario() -> tuple:
        app = web.Application()
        app.router.add_get("/x", lambda _r: web.json_response({"ok": True}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        live = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with Client([closed_port(), live]) as client:
                answers = [(await client.call("GET", "/x"))[0] for _ in range(4)]
                sent_elsewhere = client.failovers
            async with Client([closed_port(), closed_port()]) as client:
                dead = (await client.call("GET", "/x"))[0]
        finally:
            await runner.cleanup()
        return answers, sent_elsewhere, dead

    answers, sent_elsewhere, dead = asyncio.run(scenario())
    assert answers == [200] * 4 and sent_elsewhere >= 1
    assert dead == -1


def test_pushes_time_a_click_to_the_list_past_its_offset_and_keep_connects() -> None:
    from loadtest.client import Pushes

    async def run() -> tuple:
        pushes = Pushes()
        first = {"offset": 4, "trigger": "connect", "items": [{"item_id": "i1"}]}
        pushes.received("u", first, at=1.0)
        waiting = asyncio.ensure_future(pushes.answered("u", 7, acked=2.0, timeout_s=5.0))
        await asyncio.sleep(0)
        pushes.received("u", {"offset": 7, "trigger": "event", "items": []}, at=2.5)  # not past
        assert not waiting.done()
        pushes.received("u", {"offset": 8, "trigger": "event", "items": [{"item_id": "i2"}]}, 2.75)
        took = await waiting
        never = await pushes.answered("u", 8, acked=3.0, timeout_s=0.01)
        return pushes, took, never

    pushes, took, never = asyncio.run(run())
    assert took == 0.75 and never is None
    assert pushes.connects == {"u": [1.0]} and pushes.shown == {"u": "i2"}
    assert pushes.messages == 3
