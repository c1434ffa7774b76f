"""Offline evaluation harness: full-ranking metrics on a static split, hit rate on a prequential
replay, text tables, a Markdown/PNG report and the `rec eval` command line.

Models come from the `MODELS` registry (the baselines, plus whatever `register` adds), so the rec
pipeline's own models are evaluated by exactly the same code as the baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from tqdm import tqdm

from rec.baselines import BASELINES, BATCH_USERS, Model
from rec.data import Dataset, _make_dataset, _read_csv, load_csv, load_lightgcn, load_movielens
from rec.metrics import evaluate
from rec.splits import (
    Interactions,
    Split,
    split_full,
    split_leave_last_out,
    split_prequential,
    split_temporal,
)

MODELS: dict[str, Callable[[], Model]] = dict(BASELINES)
FORMATS = ("lightgcn", "movielens", "csv", "beauty", "lastfm", "diginetica")
PROTOCOLS = ("full", "temporal", "leave-last-out", "prequential")
T = TypeVar("T")


def register(name: str, factory: Callable[[], Model]) -> None:
    """Make a model available by name to `make_models` and the CLI (replaces an entry)."""
    MODELS[name] = factory


def make_models(names: Sequence[str]) -> list[Model]:
    """Fresh models for registry names; an unknown name is an error listing the known ones."""
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(sorted(MODELS))}")
    return [MODELS[n]() for n in names]


# ----------------------------------------------------------------------------------------------
# Static splits: full ranking
# ----------------------------------------------------------------------------------------------


def run(split: Split, models: list[Model], ks: list[int]) -> dict:
    """Fit each model on split.train and rank every item for split.test_users (train items
    excluded); all `rec.metrics.evaluate` metrics at every k.

    A model that refuses the data (MemoryError from fit) gets {"model", "skipped": reason}."""
    users, relevant = split.test_users, split.relevant()
    seen = split.train.seen()
    results = []
    for model, fitted in _fitted(models, split, results):
        start = time.perf_counter()
        chunks = [np.empty((0, max(ks)), dtype=np.int64)]
        for a in _progress(range(0, len(users), BATCH_USERS), f"{model.name} rank"):
            chunks.append(model.recommend(users[a : a + BATCH_USERS], max(ks), seen))
        metrics = evaluate(np.concatenate(chunks), relevant, ks, split.train.n_items)
        results.append({**fitted, "metrics": metrics, "eval_seconds": _seconds(start)})
    return {**_header(split, ks), "n_test_users": len(users), "results": results}


# ----------------------------------------------------------------------------------------------
# Prequential replay
# ----------------------------------------------------------------------------------------------


def run_prequential(
    split: Split,
    models: list[Model],
    ks: Sequence[int] = (10,),
    windows: int = 10,
    users: np.ndarray | None = None,
) -> dict:
    """Replay split.test in time order against each model fitted on split.train.

    Before each relevant test event of a user in `users` (None: every user) whose item the user
    has not interacted with yet, the model ranks top-max(ks) for that user, excluding the items
    the harness has seen the user touch so far (train plus replayed events); it is a hit at k
    when the event's item is among the first k. After every test event, relevant or not, the
    model is told via `observe`. Metrics: "hr@k" = hits / counted events, overall and per each
    of `windows` equal slices of the replay (by event count) under result["timeline"].
    """
    test = split.test
    counted_events = test.relevant()
    if users is not None:
        counted_events &= np.isin(test.users, users)
    window = np.arange(len(test)) * windows // max(len(test), 1)
    results = []
    for model, fitted in _fitted(models, split, results):
        start = time.perf_counter()
        rank = _replay(model, split, max(ks), counted_events)
        counted = rank >= 0
        timeline = []
        for w in range(windows):
            in_window = window == w
            hits = rank[in_window & counted]
            timeline.append(
                {
                    "window": w,
                    "start_ts": _ts_at(test.ts[in_window], 0),
                    "end_ts": _ts_at(test.ts[in_window], -1),
                    "events": int(hits.size),
                    **{f"hr@{k}": _hit_rate(hits, k) for k in ks},
                }
            )
        results.append(
            {
                **fitted,
                "metrics": {f"hr@{k}": _hit_rate(rank[counted], k) for k in ks},
                "events": int(counted.sum()),
                "timeline": timeline,
                "eval_seconds": _seconds(start),
            }
        )
    return {**_header(split, ks), "n_test_events": len(test), "results": results}


def _replay(model: Model, split: Split, k: int, counted: np.ndarray) -> np.ndarray:
    """Per test event: the 0-based rank of its item in the model's top-k (k on a miss), or -1
    when the event is not counted (not in `counted`, or an item the user had already seen)."""
    train_seen, test = split.train.seen(), split.test
    seen: dict[int, set[int]] = {}
    rank = np.full(len(test), -1, dtype=np.int64)
    stream = zip(test.users.tolist(), test.items.tolist(), test.ts.tolist(), strict=True)
    for e, (user, item, ts) in enumerate(_progress(stream, f"{model.name} replay", len(test))):
        user_seen = seen.get(user)
        if user_seen is None:
            row = train_seen.indices[train_seen.indptr[user] : train_seen.indptr[user + 1]]
            user_seen = seen[user] = set(row.tolist())
        if counted[e] and item not in user_seen:
            top = model.recommend(np.array([user]), k, _one_row(user, user_seen, test))[0]
            rank[e] = np.append(np.flatnonzero(top == item), k)[0]
        model.observe(user, item, ts)
        user_seen.add(item)
    return rank


def _one_row(user: int, items: set[int], test: Interactions) -> sp.csr_matrix:
    """Users × items exclusion matrix whose only filled row is `user`'s."""
    indices = np.fromiter(items, dtype=np.int64, count=len(items))
    indptr = np.zeros(test.n_users + 1, dtype=np.int64)
    indptr[user + 1 :] = len(items)
    return sp.csr_matrix(
        (np.ones(len(items), np.float32), indices, indptr), shape=(test.n_users, test.n_items)
    )


def _hit_rate(rank: np.ndarray, k: int) -> float | None:
    return float(np.mean(rank < k)) if rank.size else None


def _ts_at(ts: np.ndarray, position: int) -> float | None:
    return float(ts[position]) if ts.size else None


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _fitted(models: list[Model], split: Split, results: list[dict]) -> Iterable[tuple[Model, dict]]:
    """Fit each model in turn and yield it with its fit record; a model that refuses the data
    gets its "skipped" record appended to `results` instead."""
    for model in models:
        fitted = _fit(model, split)
        if "skipped" in fitted:
            results.append(fitted)
        else:
            yield model, fitted


def _fit(model: Model, split: Split) -> dict:
    """Fit the model; {"model", "fit_seconds"} plus "training" (what fit chose, when the model
    reports it), or {"model", "skipped"} on a MemoryError."""
    start = time.perf_counter()
    try:
        model.fit(split.train)
    except MemoryError as e:
        return {"model": model.name, "skipped": str(e)}
    record = {"model": model.name, "fit_seconds": _seconds(start)}
    info = model.fit_info()
    return {**record, "training": info} if info else record


def _header(split: Split, ks: Sequence[int]) -> dict:
    return {
        "dataset": split.name,
        "protocol": split.protocol,
        "ks": sorted(ks),
        "n_users": split.train.n_users,
        "n_items": split.train.n_items,
    }


def _seconds(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """tqdm on stderr when it is a terminal, the bare iterable otherwise."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty())


# ----------------------------------------------------------------------------------------------
# Tables and report
# ----------------------------------------------------------------------------------------------


def _table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a result: one row per model, metrics then fit/eval seconds."""
    metrics = next((list(r["metrics"]) for r in result["results"] if "metrics" in r), [])
    header = ["model", *metrics, "fit s", "eval s"]
    rows = []
    for r in result["results"]:
        if "skipped" in r:
            rows.append([r["model"], f"skipped: {r['skipped']}"])
            continue
        values = [r["metrics"].get(m) for m in metrics]
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        rows.append([r["model"], *cells, f"{r['fit_seconds']:.1f}", f"{r['eval_seconds']:.1f}"])
    return header, rows


def _title(result: dict) -> str:
    return f"{result['dataset']} — {result['protocol']}"


def print_table(result: dict) -> None:
    """Print the result as an aligned text table, model × metrics, with fit/eval seconds."""
    header, rows = _table(result)
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(row[c]) for row in [header, *full]) for c in range(len(header))]
    print(_title(result))
    for row in [header, *rows]:
        if len(row) == len(header):
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            print("  ".join(cells))
        else:
            print(f"{row[0].ljust(widths[0])}  {row[1]}")


def write_report(results: list[dict], out_dir: Path) -> Path:
    """README.md in out_dir with one table per result and PNG plots (metric vs k per model,
    one per metric family; hit rate over the replay for prequential results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Offline evaluation", ""]
    for result in results:
        header, rows = _table(result)
        lines += [f"## {_title(result)}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{result['dataset']}-{result['protocol']}")
        for name, x_label, y_label, series in _plots(result):
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, xs, ys in series:
                ax.plot(xs, ys, marker="o", label=label)
            ax.set(title=f"{_title(result)}: {y_label}", xlabel=x_label, ylabel=y_label)
            ax.legend()
            ax.grid(alpha=0.3)
            png = f"{stem}-{name}.png"
            fig.savefig(out_dir / png, dpi=100, bbox_inches="tight")
            plt.close(fig)
            lines += [f"![{y_label}]({png})", ""]
    md = out_dir / "README.md"
    md.write_text("\n".join(lines))
    return md


Series = list[tuple[str, list, list]]  # (model, xs, ys) per line of a plot


def _plots(result: dict) -> list[tuple[str, str, str, Series]]:
    """(file name part, x label, y label, series) for each plot of one result: hit rate per
    replay window for prequential results, else each metric family against k."""
    fitted = [r for r in result["results"] if "metrics" in r]
    ks = result["ks"]
    if result["protocol"] == "prequential":
        plots = []
        for k in ks:
            series = []
            for r in fitted:
                points = [t for t in r["timeline"] if t[f"hr@{k}"] is not None]
                xs, ys = [t["window"] for t in points], [t[f"hr@{k}"] for t in points]
                series.append((r["model"], xs, ys))
            x_label = "replay window (equal event counts, in time order)"
            plots.append((f"timeline-hr{k}", x_label, f"hr@{k}", series))
        return plots
    families = dict.fromkeys(m.split("@")[0] for r in fitted for m in r["metrics"])
    return [
        (f, "k", f, [(r["model"], ks, [r["metrics"][f"{f}@{k}"] for k in ks]) for r in fitted])
        for f in families
    ]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_beauty(path: str | Path) -> Dataset:
    """Amazon Beauty as S3-Rec ships it (Beauty_S3Rec.txt, or a folder holding it): one line
    per user, "user item item ..." in time order, no timestamps. ts = the item's position in
    its user's sequence (0, 1, ...), so order is kept per user; leave-last-out is the protocol
    this data supports. Type "click", no value."""
    path = Path(path)
    file = path / "Beauty_S3Rec.txt" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no Beauty_S3Rec.txt")
    users: list[str] = []
    items: list[str] = []
    ts: list[int] = []
    with file.open() as f:
        for line in f:
            fields = line.split()
            users += [fields[0]] * (len(fields) - 1) if fields else []
            items += fields[1:]
            ts += range(len(fields) - 1)
    n = len(users)
    return _make_dataset(
        file.parent.name,
        pa.array(users, pa.string()),
        pa.array(items, pa.string()),
        pa.repeat(pa.scalar("click"), n),
        pa.nulls(n, pa.float64()),
        pa.array(ts, pa.float64()),
    )


def load_lastfm(path: str | Path) -> Dataset:
    """HetRec 2011 Last.fm (user_artists.dat, or a folder holding it): tab-separated with a
    "userID artistID weight" header. Implicit: type "view", value = listening count, and no
    time, so ts = file order."""
    path = Path(path)
    file = path / "user_artists.dat" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no user_artists.dat")
    cols = {"userID": pa.string(), "artistID": pa.string(), "weight": pa.float64()}
    table = _read_csv(file, delimiter="\t", column_types=cols, include_columns=list(cols))
    n = table.num_rows
    return _make_dataset(
        file.parent.name,
        table["userID"],
        table["artistID"],
        pa.repeat(pa.scalar("view"), n),
        table["weight"],
        pa.array(np.arange(n, dtype=np.float64)),
        ordered=False,
    )


def load_diginetica(path: str | Path) -> Dataset:
    """DIGINETICA (CIKM Cup 2016) purchases (train-purchases.csv, or a folder holding it):
    ";"-separated "sessionId;userId;timeframe;eventdate;ordernumber;itemId". The user is userId,
    or "s<sessionId>" for anonymous sessions ("NA"); type "purchase"; ts = the event date (UTC
    midnight) plus timeframe (ms since the session started). product-categories.csv next to it,
    when present, gives each item's category."""
    path = Path(path)
    file = path / "train-purchases.csv" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no train-purchases.csv")
    cols = {
        "sessionId": pa.string(),
        "userId": pa.string(),
        "timeframe": pa.float64(),
        "eventdate": pa.date32(),
        "itemId": pa.string(),
    }
    table = _read_csv(file, delimiter=";", column_types=cols, include_columns=list(cols))
    user = pc.if_else(
        pc.is_null(table["userId"]),
        pc.binary_join_element_wise("s", table["sessionId"], ""),
        table["userId"],
    )
    day = pc.multiply(table["eventdate"].cast(pa.int32()).cast(pa.float64()), 86400.0)
    ts = pc.add(day, pc.divide(table["timeframe"], 1000.0))
    items = None
    categories = file.parent / "product-categories.csv"
    if categories.is_file():
        cat_cols = {"itemId": pa.string(), "categoryId": pa.string()}
        cat = _read_csv(
            categories, delimiter=";", column_types=cat_cols, include_columns=list(cat_cols)
        )
        cat = cat.filter(pc.is_in(cat["itemId"], value_set=pc.unique(table["itemId"])))
        items = pa.table(
            {
                "item_id": cat["itemId"],
                "category": cat["categoryId"],
                "tags": pa.array([[]] * cat.num_rows, pa.list_(pa.string())),
                "title": pa.nulls(cat.num_rows, pa.string()),
            }
        )
    n = table.num_rows
    return _make_dataset(
        file.parent.name,
        user,
        table["itemId"],
        pa.repeat(pa.scalar("purchase"), n),
        pa.nulls(n, pa.float64()),
        ts,
        items,
    )


def load_split(
    path: str | Path,
    format: str,
    protocol: str,
    test_fraction: float = 0.2,
    csv_columns: dict[str, str] | None = None,
) -> Split:
    """Load a data set and split it. "full" needs a given split (format lightgcn), and lightgcn
    files have no time order, so they support "full" only. `csv_columns` holds load_csv's
    user_col/item_col/ts_col overrides."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if (format == "lightgcn") != (protocol == "full"):
        raise ValueError(
            "protocol 'full' is for format 'lightgcn', and lightgcn supports only 'full'"
        )
    if format == "lightgcn":
        return split_full(*load_lightgcn(path))
    loaders: dict[str, Callable[[], Dataset]] = {
        "movielens": lambda: load_movielens(path),
        "csv": lambda: load_csv(path, **(csv_columns or {})),
        "beauty": lambda: load_beauty(path),
        "lastfm": lambda: load_lastfm(path),
        "diginetica": lambda: load_diginetica(path),
    }
    ds = loaders[format]()
    if protocol == "leave-last-out":
        return split_leave_last_out(ds)
    splitter = split_prequential if protocol == "prequential" else split_temporal
    return splitter(ds, test_fraction)


def sample_users(users: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A seeded sample of n users (sorted), or all of them when n is None or not smaller."""
    if n is None or n >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=n, replace=False))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rec eval", description="Offline evaluation of recommenders on a public data set."
    )
    p.add_argument("--data", required=True, help="Data file or folder.")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--k", default="10,20", help="Cut-offs, comma-separated (default 10,20).")
    p.add_argument(
        "--models", default="pop,itemknn,userknn,als,ease", help="Comma-separated model names."
    )
    p.add_argument("--json", type=Path, help="Write the result as JSON here.")
    p.add_argument("--report", type=Path, help="Write README.md and PNG plots to this folder.")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="Temporal/prequential test share."
    )
    p.add_argument("--user-col", default="user_id", help="CSV user column.")
    p.add_argument("--item-col", default="item_id", help="CSV item column.")
    p.add_argument("--ts-col", default="timestamp", help="CSV time column.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the --max-users sample.")
    p.add_argument("--max-users", type=int, help="Evaluate a seeded sample of this many users.")
    return p


def main(argv: list[str] | None = None) -> int:
    """`rec eval`: load, split, evaluate, print the table; optionally write JSON and a report."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
        if ks[0] < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--k must be comma-separated positive integers, got {args.k!r}")
    try:
        models = make_models([m.strip() for m in args.models.split(",") if m.strip()])
        columns = {"user_col": args.user_col, "item_col": args.item_col, "ts_col": args.ts_col}
        split = load_split(args.data, args.format, args.protocol, args.test_fraction, columns)
    except ValueError as e:
        print(f"rec eval: error: {e}", file=sys.stderr)
        return 2
    if args.protocol == "prequential":
        pool = np.unique(split.test.users[split.test.relevant()])
        result = run_prequential(
            split, models, ks, users=sample_users(pool, args.max_users, args.seed)
        )
    else:
        split = dataclasses.replace(
            split, test_users=sample_users(split.test_users, args.max_users, args.seed)
        )
        result = run(split, models, ks)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.report:
        print(f"report: {write_report([result], args.report)}")
    return 0
