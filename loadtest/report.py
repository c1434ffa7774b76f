"""Pure helpers of the load test: percentiles, one scenario's summary row, the targets of the
issue checked against a run, the Markdown summary and the latency plot. No network, no Ray."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

TARGET_TEXT = {
    "recommend_vs_floor": "recommend@8 rps ≥ 0.7 × floor@8 rps (both on the run's path)",
    "recommend_vs_floor_proxy": "recommend@8 rps ≥ 0.7 × floor-proxy@8 rps (the floor through "
    "Serve's proxy)",
    "recommend_proxy_vs_floor_proxy": "recommend-proxy@8 rps ≥ 0.7 × floor-proxy@8 rps (both "
    "through the proxy)",
    "recommend8_p99": "recommend@8 p99 ≤ 100 ms",
    "recommend32_errors": "recommend@32 errors = 0",
    "recommend32_scaling": "recommend@32 rps ≥ 0.9 × recommend@8 rps",
    "recommend32_p99": "recommend@32 p99 ≤ 400 ms",
    "freshness_p99": "POST /events answer → reflecting /recommend answer, p99 ≤ 50 ms (mixed@8)",
    "freshness_reflected": "the first /recommend after the event reflects it (every sample, mixed)",
    "push_p99": "POST /events answer → the list pushed on the user's stream, p99 ≤ 100 ms "
    "(push: mixed@8 with 20 streams open)",
    "push_every_event": "every probed event pushed a list reflecting it (push)",
    "new_item_s": "POST /items → recommended ≤ 5 s (worst trial)",
    "events_batch_eps": "batched POST /events ≥ 10,000 acknowledged events/s (best run)",
    "events_single_p99": "single POST /events p99 ≤ 30 ms (1 client)",
    "retrain_errors": "retrain under recommend@8: zero errors",
    "retrain_p99": "retrain under recommend@8: p99 ≤ 2 × no-training p99",
    "overload_fast_503": "overload 3× capacity: rejected answers are 503, p99 ≤ 50 ms",
    "overload_other_errors": "overload: no errors other than 503",
    "overload_accepted_p99": "overload: accepted p99 ≤ 400 ms (the 32-client limit)",
    "recovery": "after overload, recommend@8: zero errors, p99 ≤ 100 ms",
    "pipeline_share": "recommend@8 rps ≥ 0.6 × cores × pipeline rps (the in-process pipeline, "
    "one thread, same run): the served share of the pipeline's own limit",
}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def latency_stats(latencies_ms: Sequence[float]) -> dict:
    return {
        "p50_ms": _r(percentile(latencies_ms, 50)),
        "p95_ms": _r(percentile(latencies_ms, 95)),
        "p99_ms": _r(percentile(latencies_ms, 99)),
        "max_ms": _r(max(latencies_ms) if latencies_ms else None),
    }


def timeline(
    started: Sequence[float], latencies_ms: Sequence[float], t0: float, step_s: float = 10.0
) -> list[dict]:
    """Latency over time: one entry per step_s of request start times (seconds from t0)."""
    buckets: dict[int, list[float]] = {}
    for t, ms in zip(started, latencies_ms, strict=True):
        buckets.setdefault(int((t - t0) // step_s), []).append(ms)
    return [
        {
            "t_s": b * step_s,
            "requests": len(v),
            "p50_ms": _r(percentile(v, 50)),
            "p99_ms": _r(percentile(v, 99)),
            "max_ms": _r(max(v)),
        }
        for b, v in sorted(buckets.items())
    ]


def scenario_row(
    name: str,
    concurrency: int | None,
    seconds: float,
    latencies_ms: Sequence[float],
    errors: int,
    **extra,
) -> dict:
    """One entry of results["scenarios"]: rps counts every answered request (errors too);
    percentiles are over the successful ones."""
    n = len(latencies_ms) + errors
    row = {
        "name": name,
        "concurrency": concurrency,
        "rps": round(n / seconds, 1) if seconds > 0 else 0.0,
        **latency_stats(latencies_ms),
        "errors": errors,
        "requests": n,
        "seconds": round(seconds, 2),
    }
    row.update(extra)
    return row


def find(results: dict, name: str, concurrency: int | None = None) -> dict | None:
    for row in results.get("scenarios", []):
        if row["name"] == name and (concurrency is None or row["concurrency"] == concurrency):
            return row
    return None


def _check(key: str, value, ok: bool | None, detail: str = "") -> dict:
    return {"target": key, "what": TARGET_TEXT[key], "value": value, "ok": ok, "detail": detail}


def _ratio_check(name: str, top: dict | None, base: dict | None, minimum: float) -> dict:
    """top's req/s over base's req/s must reach `minimum`; unmeasured when either is missing."""
    if not (top and base and base["rps"]):
        return _check(name, None, None)
    ratio = top["rps"] / base["rps"]
    return _check(name, round(ratio, 2), ratio >= minimum, f"{top['rps']} vs {base['rps']} req/s")


def pipeline_share(results: dict, rec8: dict | None) -> dict:
    """recommend@8 ÷ (cores × the in-process pipeline's rate on one thread)."""
    pipe, cores = find(results, "pipeline", 1), results.get("cpu_count") or 1
    if not rec8 or not pipe or not pipe["rps"]:
        return _check("pipeline_share", None, None)
    share = rec8["rps"] / (cores * pipe["rps"])
    detail = f"{rec8['rps']} req/s served vs {cores} × {pipe['rps']} in process"
    return _check("pipeline_share", round(share, 3), share >= 0.6, detail)


def evaluate_targets(results: dict) -> list[dict]:
    """Every target of the issue, checked against one run. ok is None when the run did not
    measure it (scenario skipped or failed)."""
    out = []
    floor8, rec8, rec32 = (
        find(results, "floor", 8),
        find(results, "recommend", 8),
        find(results, "recommend", 32),
    )
    out.append(_ratio_check("recommend_vs_floor", rec8, floor8, 0.7))
    floor_proxy8 = find(results, "floor-proxy", 8)
    if floor_proxy8:  # a direct-ingress run measures the proxy path beside it
        out.append(_ratio_check("recommend_vs_floor_proxy", rec8, floor_proxy8, 0.7))
        out.append(
            _ratio_check(
                "recommend_proxy_vs_floor_proxy",
                find(results, "recommend-proxy", 8),
                floor_proxy8,
                0.7,
            )
        )
    out.append(
        _check(
            "recommend8_p99",
            rec8 and rec8["p99_ms"],
            None if not rec8 or rec8["p99_ms"] is None else rec8["p99_ms"] <= 100,
        )
    )
    out.append(
        _check(
            "recommend32_errors",
            rec32 and rec32["errors"],
            None if not rec32 else rec32["errors"] == 0,
        )
    )
    out.append(_ratio_check("recommend32_scaling", rec32, rec8, 0.9))
    out.append(pipeline_share(results, rec8))
    out.append(
        _check(
            "recommend32_p99",
            rec32 and rec32["p99_ms"],
            None if not rec32 or rec32["p99_ms"] is None else rec32["p99_ms"] <= 400,
        )
    )

    mixed8 = find(results, "mixed", 8)
    fresh8 = (mixed8 or {}).get("freshness") or {}
    p99 = fresh8.get("p99_ms")
    out.append(
        _check(
            "freshness_p99",
            p99,
            None if p99 is None else p99 <= 50,
            f"{fresh8.get('samples', 0)} samples",
        )
    )
    push = find(results, "push")
    out.append(
        _check(
            "push_p99",
            push and push["p99_ms"],
            None if not push or push["p99_ms"] is None else push["p99_ms"] <= 100,
            f"{push['requests']} events" if push else "",
        )
    )
    out.append(
        _check(
            "push_every_event",
            push and f"{push['requests'] - push['never_pushed']}/{push['requests']}",
            None if not push or not push["requests"] else push["never_pushed"] == 0,
        )
    )
    samples = stale = 0
    for row in results.get("scenarios", []):
        if row["name"] == "mixed" and row.get("freshness"):
            samples += row["freshness"]["samples"]
            stale += row["freshness"]["stale_first_reads"]
    out.append(
        _check(
            "freshness_reflected",
            f"{samples - stale}/{samples}",
            None if not samples else stale == 0,
        )
    )

    trials = (results.get("new_items") or {}).get("seconds") or []
    worst = max(trials) if trials else None
    failed = (results.get("new_items") or {}).get("not_seen", 0)
    out.append(
        _check(
            "new_item_s",
            _r(worst, 3),
            None if worst is None and not failed else (not failed and worst <= 5),
            f"{len(trials)} trials, {failed} not seen in time",
        )
    )

    batches = [r for r in results.get("scenarios", []) if r["name"] == "events-batch"]
    best = max((r.get("events_per_s", 0) for r in batches), default=None)
    out.append(_check("events_batch_eps", best, None if best is None else best >= 10_000))
    single1 = find(results, "events-single", 1)
    out.append(
        _check(
            "events_single_p99",
            single1 and single1["p99_ms"],
            None if not single1 or single1["p99_ms"] is None else single1["p99_ms"] <= 30,
        )
    )

    base, retrain = find(results, "retrain-baseline", 8), find(results, "retrain", 8)
    out.append(
        _check(
            "retrain_errors",
            retrain and retrain["errors"],
            None if not retrain else retrain["errors"] == 0,
            "" if not retrain else f"new model served: {retrain.get('swapped')}",
        )
    )
    if base and retrain and base["p99_ms"] and retrain["p99_ms"] is not None:
        ratio = retrain["p99_ms"] / base["p99_ms"]
        out.append(
            _check(
                "retrain_p99",
                round(ratio, 2),
                ratio <= 2.0,
                f"{retrain['p99_ms']} vs {base['p99_ms']} ms",
            )
        )
    else:
        out.append(_check("retrain_p99", None, None))

    over = find(results, "overload")
    if over:
        rej = over.get("rejected", {})
        fast = rej.get("count", 0) > 0 and (rej.get("p99_ms") or 0) <= 50
        out.append(
            _check(
                "overload_fast_503",
                rej.get("p99_ms"),
                fast,
                f"{rej.get('count', 0)} rejected of {over.get('offered', 0)} offered",
            )
        )
        out.append(_check("overload_other_errors", over["errors"], over["errors"] == 0))
        out.append(
            _check(
                "overload_accepted_p99",
                over["p99_ms"],
                None if over["p99_ms"] is None else over["p99_ms"] <= 400,
            )
        )
    else:
        for key in ("overload_fast_503", "overload_other_errors", "overload_accepted_p99"):
            out.append(_check(key, None, None))
    rec = find(results, "recovery", 8)
    out.append(
        _check(
            "recovery",
            rec and rec["p99_ms"],
            None
            if not rec or rec["p99_ms"] is None
            else rec["errors"] == 0 and rec["p99_ms"] <= 100,
            "" if not rec else f"{rec['errors']} errors, {rec['rps']} req/s",
        )
    )
    return out


def _fmt(x, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd if abs(x) >= 1 or x == 0 else 3}f}"
    return str(x)


def to_markdown(results: dict) -> str:
    lines = [
        "# rec load test",
        "",
        f"Machine: {results.get('machine')}  ",
        f"Started: {results.get('started')}  ",
        f"Client: {results.get('client', {}).get('kind', '')}  ",
        f"Ray settings: {_settings(results.get('ray_settings') or {})}",
        "",
    ]
    if results.get("notes"):
        lines += [f"> {n}" for n in results["notes"]] + [""]
    lines += [
        "| scenario | clients | req/s | events/s | p50 ms | p95 ms | p99 ms | errors "
        "| client CPU | server CPU | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("scenarios", []):
        cpu = r.get("cpu") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _fmt(r["concurrency"]),
                    _fmt(r["rps"]),
                    _fmt(r.get("events_per_s"), 0),
                    _fmt(r["p50_ms"]),
                    _fmt(r["p95_ms"]),
                    _fmt(r["p99_ms"]),
                    _fmt(r["errors"]),
                    _pct(cpu.get("client_share")),
                    _pct(cpu.get("server_share")),
                    _pct(cpu.get("machine_busy_share")),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "CPU shares are of one core (the machine has "
        f"{results.get('cpu_count', '?')}); machine busy includes every process, other "
        "experiments too.",
        "",
    ]
    fresh = [
        (r["concurrency"], r["freshness"])
        for r in results.get("scenarios", [])
        if r["name"] == "mixed" and r.get("freshness")
    ]
    if fresh:
        lines += [
            "## Freshness",
            "",
            "| mixed clients | samples | reflected on first read | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for c, f in fresh:
            lines.append(
                f"| {c} | {f['samples']} | {f['samples'] - f['stale_first_reads']} "
                f"| {_fmt(f.get('p50_ms'))} | {_fmt(f.get('p95_ms'))} "
                f"| {_fmt(f.get('p99_ms'))} |"
            )
        lines.append("")
    push = find(results, "push")
    if push:
        lines += [
            "## Push",
            "",
            f"{push['streams']} streams open (GET /stream through the proxy) during mixed@"
            f"{push['concurrency']}; one client clicks for those users in turn: "
            "POST /events answer → the list pushed on that user's stream reflecting it.",
            "",
            "| events | pushed | lists received | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            f"| {push['requests']} | {push['requests'] - push['never_pushed']} "
            f"| {push['lists_received']} | {_fmt(push['p50_ms'])} | {_fmt(push['p95_ms'])} "
            f"| {_fmt(push['p99_ms'])} |",
            "",
        ]
    new = results.get("new_items")
    if new:
        secs = ", ".join(f"{s:.3f}" for s in new.get("seconds", []))
        lines += [
            f"New items: POST /items → first /recommend showing it: {secs} s "
            f"({new.get('not_seen', 0)} not seen within {new.get('timeout_s')} s).",
            "",
        ]
    over = find(results, "overload")
    if over:
        rej, lag = over.get("rejected", {}), over.get("client_send_lag", {})
        earlier = over.get("capacity_earlier_rps")
        earlier = f"; {earlier} earlier in the run" if earlier else ""
        lines += [
            f"Overload: offered {over.get('offered_rps')} req/s (3 × {over.get('capacity_rps')}"
            f", recommend@8 measured just before{earlier}) for {over['seconds']} s; accepted "
            f"{over.get('accepted', 0)} "
            f"({over['rps']} req/s answered in all), rejected {rej.get('count', 0)} "
            f"with 503 (p50 {_fmt(rej.get('p50_ms'))} ms, p99 {_fmt(rej.get('p99_ms'))} ms)"
            f", other errors {over['errors']}. Latencies count from the scheduled send; the "
            f"client itself sent late by p50 {_fmt(lag.get('p50_ms'))} ms, p99 "
            f"{_fmt(lag.get('p99_ms'))} ms.",
            "",
        ]
    retrain = find(results, "retrain", 8)
    if retrain:
        lines += [
            f"Retrain: {retrain.get('train_s')} s from POST /admin/retrain to the new model "
            f"served (swapped: {retrain.get('swapped')}).",
            "",
        ]
    lines += ["## Targets", "", "| target | value | ok |", "|---|---|---|"]
    for t in results.get("targets", []):
        ok = {True: "yes", False: "**no**", None: "not measured"}[t["ok"]]
        detail = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"| {t['what']} | {_fmt(t['value'])}{detail} | {ok} |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _settings(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def plot(results: dict, path: Path) -> None:
    """Throughput and latency against concurrent clients, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = []
    for r in results.get("scenarios", []):
        if r["name"] not in names and r["name"] in ("floor", "recommend", "mixed", "events-single"):
            names.append(r["name"])
    for i, name in enumerate(names):
        rows = sorted(
            (r for r in results["scenarios"] if r["name"] == name and r["concurrency"] is not None),
            key=lambda r: r["concurrency"],
        )
        xs = [r["concurrency"] for r in rows]
        color = f"C{i}"
        ax1.plot(xs, [r["rps"] for r in rows], "o-", color=color, label=name)
        ax2.plot(xs, [r["p99_ms"] for r in rows], "o-", color=color, label=f"{name} p99")
        ax2.plot(
            xs, [r["p50_ms"] for r in rows], "s--", color=color, alpha=0.6, label=f"{name} p50"
        )
    extra = [
        r
        for r in results.get("scenarios", [])
        if r["name"] in ("retrain-baseline", "retrain", "overload", "recovery")
        and r["p99_ms"] is not None
    ]
    for j, r in enumerate(extra):
        ax2.plot(
            [r["concurrency"] or 8],
            [r["p99_ms"]],
            marker="*^Dv"[j % 4],
            ls="",
            ms=10,
            color=f"C{len(names) + j}",
            label=f"{r['name']} p99",
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32])
        ax.set_xticklabels(["1", "8", "32"])
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("requests/s")
    ax1.set_title("throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.axhline(100, color="grey", ls=":", lw=1)
    ax2.axhline(400, color="grey", ls=":", lw=1)
    ax2.set_title("latency (p99 solid, p50 dashed; targets 100/400 ms dotted)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"rec load test — {results.get('machine', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
