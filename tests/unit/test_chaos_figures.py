"""The figures `make chaos` and `make soak` report, from made-up request records: what counts
as a failure outside the fault's first second, recovery, lost and doubled events, and a
memory slope."""

from __future__ import annotations

import json

import pytest

from loadtest.chaos import Answer, summarize, timeline
from loadtest.soak import SWAP_SETTLE_S, WARMUP_S, label, slopes, warmed_up_at


def test_failures_in_the_first_second_are_the_faults_own():
    ok = [Answer(t / 10, t / 10 + 0.05, "recommend", 200) for t in range(200)]
    failed = [
        Answer(10.2, 10.3, "recommend", -1, "refused"),  # in the fault's first second
        Answer(10.9, 12.5, "events", 500, "log restarting"),  # started inside it
        Answer(13.0, 13.4, "recommend", 503, "late"),  # after it: counted
    ]
    out = summarize(ok + failed, t_fault=10.0, acked={"a", "b", "c"}, logged=["a", "b", "b"])
    assert out["requests"] == 203 and out["failed"] == 3
    assert out["failed_outside_first_s"] == 1
    assert out["failed_share"] == pytest.approx(1 / 203, abs=1e-5)
    assert out["recovery_s"] == pytest.approx(3.4)  # fault -> end of the last failure
    assert out["events_lost"] == 1 and out["events_logged_twice"] == 1
    assert out["by_kind"]["events"]["failed"] == 1
    assert not out["targets_met"]  # 0.49% failed and an event lost


def test_a_clean_fault_meets_the_targets_and_the_timeline_counts_per_second():
    answers = [Answer(t / 10, t / 10 + 0.05, "recommend", 200) for t in range(100)]
    answers.append(Answer(5.1, 5.2, "events", -1))
    out = summarize(answers, t_fault=5.0, acked={"a"}, logged=["a"])
    assert out["targets_met"] and out["recovery_s"] == pytest.approx(0.2)
    seconds = {row["t_s"]: row for row in timeline(answers, 5.0)}
    assert seconds[0.0] == {"t_s": 0.0, "requests": 11, "failed": 1}
    assert sum(row["requests"] for row in seconds.values()) == 101


def test_memory_slope_after_the_warm_up():
    flat = [(t, 500.0 + (t % 20) * 0.1) for t in range(0, 1200, 10)]
    growing = [(t, 300.0 + t * 0.05) for t in range(0, 1200, 10)]  # 30 MB per 10 minutes
    short = [(t, 400.0 + t) for t in range(600, 900, 10)]  # a Train worker's life
    # a job's working set: 60 MB for three minutes late in the window, then back down
    peak = [(t, 300.0 + (60.0 if 900 <= t < 1080 else 0.0)) for t in range(0, 1200, 10)]
    rows = {
        r["process"]: r
        for r in slopes({"a": flat, "b": growing, "c": short, "d": peak}, t_warm=180)
    }
    assert rows["d"]["flat"] is True and rows["d"]["floor_growth_mb"] == 0.0
    assert rows["d"]["slope_mb_per_10min"] > 10  # what a fitted line would have judged on
    assert rows["c"]["flat"] is None  # listed, not judged
    assert rows["a"]["flat"] is True and abs(rows["a"]["slope_mb_per_10min"]) < 1
    assert rows["b"]["flat"] is False and rows["b"]["slope_mb_per_10min"] == pytest.approx(
        30, rel=1e-3
    )
    assert rows["b"]["mb_after_warmup"] == pytest.approx(309.0)
    json.dumps(rows)  # what soak.json holds: plain JSON types


def test_the_soak_warm_up_ends_after_the_first_model_swap() -> None:
    assert warmed_up_at([]) == WARMUP_S
    assert warmed_up_at([(5.0, "v1")]) == WARMUP_S
    assert warmed_up_at([(5.0, "v1"), (60.0, "v2")]) == WARMUP_S  # swapped early
    assert warmed_up_at([(0.0, None), (5.0, "v1"), (300.0, "v2"), (450.0, "v3")]) == (
        300.0 + SWAP_SETTLE_S
    )


def test_a_process_keeps_its_label_while_it_runs_a_method() -> None:
    class Proc:
        def __init__(self, title: str) -> None:
            self.title = title

        def cmdline(self) -> list[str]:
            return [self.title, ""]

    assert label(Proc("ray::EventLogService.append")) == "ray::EventLogService"
    assert label(Proc("ray::ServeReplica:rec:Aggregator")) == "ray::ServeReplica:rec:Aggregator"
    assert label(Proc("ray::ServeReplica:rec:Aggregator.check_health")) == (
        "ray::ServeReplica:rec:Aggregator"
    )


def test_the_soak_report_lists_proxy_probes_not_answered() -> None:
    from loadtest.soak import to_markdown

    results = {
        "started": "2026-12-08T02:00:00+00:00",
        "machine": "test",
        "minutes": 20,
        "retrain_every_s": 150,
        "warmup_s": 300,
        "requests": 10,
        "errors": 0,
        "by_kind": {"recommend": {"p50_ms": 1, "p99_ms": 2}, "events": {"p99_ms": 3}},
        "events_acked": 1,
        "events_lost": 0,
        "models_served": [(0.1, "v1")],
        "memory": [],
        "proxy_probe_failures": [
            {"t_s": 594, "status": -1, "seconds": 30.0, "body": "TimeoutError()"}
        ],
        "total_s": 1,
    }
    md = to_markdown(results)
    assert "at 594 s -1 after 30.0 s (TimeoutError())" in md
    assert "not answered 200" not in to_markdown({**results, "proxy_probe_failures": []})
