"""Tests for rec.evaluation: result shape, an oracle, exact prequential counting, report, CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from rec import evaluation
from rec.baselines import EASE, ItemKNN, Model, Popularity
from rec.data import EVENTS_SCHEMA, ITEMS_SCHEMA, Dataset
from rec.evaluation import (
    load_beauty,
    load_diginetica,
    load_lastfm,
    main,
    make_models,
    print_table,
    register,
    run,
    run_prequential,
    write_report,
)
from rec.splits import Interactions, Split, split_prequential, split_temporal

FAMILIES = ("recall", "precision", "ndcg", "hr", "coverage")


def dataset(rows: list[tuple]) -> Dataset:
    """A Dataset from (user, item, type, ts) rows given in ts order (no values)."""
    users, items, types, ts = (list(c) for c in zip(*rows, strict=True))
    events = pa.table([users, items, types, [None] * len(rows), ts], schema=EVENTS_SCHEMA)
    return Dataset(events=events, items=ITEMS_SCHEMA.empty_table(), name="tiny")


def random_split(seed: int = 0) -> Split:
    """A temporal split of 12 users × 8 items with random clicks."""
    rng = np.random.default_rng(seed)
    rows = [(f"u{rng.integers(12)}", f"i{rng.integers(8)}", "click", float(t)) for t in range(150)]
    return split_temporal(dataset(rows), test_fraction=0.3)


class Oracle(Model):
    """Knows the test set: scores each user's relevant test items 1, everything else 0."""

    name = "oracle"

    def __init__(self, split: Split) -> None:
        self.relevant = dict(zip(split.test_users.tolist(), split.relevant(), strict=True))

    def fit(self, train: Interactions) -> Oracle:
        self.n_items = train.n_items
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), self.n_items), dtype=np.float32)
        for row, user in enumerate(users.tolist()):
            out[row, list(self.relevant.get(user, ()))] = 1.0
        return out


class Fixed(Model):
    """Always prefers items in index order; records what it is told."""

    name = "fixed"

    def fit(self, train: Interactions) -> Fixed:
        self.n_items = train.n_items
        self.observed: list[tuple[int, int, float]] = []
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.tile(-np.arange(self.n_items, dtype=np.float32), (len(users), 1))

    def observe(self, user: int, item: int, ts: float) -> None:
        self.observed.append((user, item, ts))


def test_run_returns_the_documented_shape_with_every_k() -> None:
    split = random_split()
    result = run(split, [Popularity(), ItemKNN()], ks=[1, 3])
    assert result["dataset"] == "tiny" and result["protocol"] == "temporal"
    assert result["ks"] == [1, 3] and result["n_items"] == split.train.n_items
    assert result["n_test_users"] == len(split.test_users) > 0
    assert [r["model"] for r in result["results"]] == ["pop", "itemknn"]
    for r in result["results"]:
        assert set(r) == {"model", "metrics", "fit_seconds", "eval_seconds"}
        assert set(r["metrics"]) == {f"{f}@{k}" for f in FAMILIES for k in (1, 3)}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    json.dumps(result)


def test_oracle_gets_perfect_recall_and_ndcg() -> None:
    split = random_split()
    k = max(len(r) for r in split.relevant())
    metrics = run(split, [Oracle(split)], ks=[k])["results"][0]["metrics"]
    assert metrics[f"recall@{k}"] == pytest.approx(1.0)
    assert metrics[f"ndcg@{k}"] == pytest.approx(1.0)
    assert metrics[f"hr@{k}"] == pytest.approx(1.0)


def test_a_refusing_model_is_skipped_and_the_run_goes_on(monkeypatch) -> None:
    monkeypatch.setattr(EASE, "max_items", 2)
    result = run(random_split(), [EASE(), Popularity()], ks=[2])
    skipped, pop = result["results"]
    assert skipped["model"] == "ease" and "refusing above 2 items" in skipped["skipped"]
    assert "metrics" not in skipped and "recall@2" in pop["metrics"]


def stream_split() -> Split:
    """Train: a clicks x. Replay: the 7 events below, items x<y<z<w in the Fixed model's order."""
    rows = [
        ("a", "x", "click", 0.0),
        ("a", "y", "click", 1.0),  # a excludes {x}: top-1 y, hit
        ("a", "z", "click", 2.0),  # excludes {x, y}: top-1 z, hit
        ("b", "x", "click", 3.0),  # new user, excludes nothing: top-1 x, hit
        ("b", "w", "click", 4.0),  # excludes {x}: top-3 y z w, miss at 1, hit at 3
        ("a", "y", "click", 5.0),  # already seen: not counted
        ("b", "z", "skip", 6.0),  # not relevant: not counted, but seen from now on
        ("b", "z", "click", 7.0),  # already seen (skipped): not counted
    ]
    return split_prequential(dataset(rows), test_fraction=0.875)


def test_prequential_counts_hits_exactly_and_observes_every_event() -> None:
    split = stream_split()
    assert split.train.item_ids == ["x", "y", "z", "w"] and len(split.test) == 7
    model = Fixed()
    result = run_prequential(split, [model], ks=[1, 3], windows=2)
    (r,) = result["results"]
    assert result["protocol"] == "prequential" and result["n_test_events"] == 7
    assert r["events"] == 4
    assert r["metrics"] == {"hr@1": 0.75, "hr@3": 1.0}
    assert [(t["window"], t["events"], t["hr@1"]) for t in r["timeline"]] == [
        (0, 4, 0.75),
        (1, 0, None),
    ]
    assert (r["timeline"][0]["start_ts"], r["timeline"][1]["end_ts"]) == (1.0, 7.0)
    assert model.observed == [(0, 1, 1.0), (0, 2, 2.0), (1, 0, 3.0), (1, 3, 4.0),
                              (0, 1, 5.0), (1, 2, 6.0), (1, 2, 7.0)]  # fmt: skip
    json.dumps(result)


def test_prequential_restricted_to_some_users() -> None:
    result = run_prequential(stream_split(), [Fixed()], ks=[1], users=np.array([1]))
    assert result["results"][0]["metrics"] == {"hr@1": 0.5}


def test_print_table_aligns_models_and_skips(capsys, monkeypatch) -> None:
    monkeypatch.setattr(EASE, "max_items", 2)
    print_table(run(random_split(), [Popularity(), EASE()], ks=[2]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny — temporal"
    assert lines[1].split() == ["model", *(f"{f}@2" for f in FAMILIES), "fit", "s", "eval", "s"]
    assert lines[2].startswith("pop ") and lines[3].startswith("ease ") and "skipped" in lines[3]


def test_write_report_writes_markdown_and_plots(tmp_path) -> None:
    static = run(random_split(), [Popularity(), ItemKNN()], ks=[1, 3])
    replay = run_prequential(stream_split(), [Fixed()], ks=[1], windows=2)
    md = write_report([static, replay], tmp_path / "report")
    text = md.read_text()
    assert (
        md.name == "README.md" and "## tiny — temporal" in text and "## tiny — prequential" in text
    )
    pngs = sorted(p.name for p in md.parent.glob("*.png"))
    assert pngs == sorted(
        [f"tiny-temporal-{f}.png" for f in FAMILIES] + ["tiny-prequential-timeline-hr1.png"]
    )
    assert all(f"]({png})" in text for png in pngs)


def test_register_and_unknown_names(monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "MODELS", dict(evaluation.MODELS))
    register("fixed", Fixed)
    assert [m.name for m in make_models(["pop", "fixed"])] == ["pop", "fixed"]
    with pytest.raises(ValueError, match="unknown model.*'nope'.*available: als, ease, fixed"):
        make_models(["nope"])


def write_csv(path, n_events: int = 300) -> None:
    rng = np.random.default_rng(1)
    lines = ["user_id,item_id,timestamp"]
    lines += [f"u{rng.integers(20)},i{rng.integers(15)},{t}" for t in range(n_events)]
    path.write_text("\n".join(lines) + "\n")


def test_main_end_to_end_on_a_csv(tmp_path, capsys) -> None:
    data, out = tmp_path / "events.csv", tmp_path / "out" / "result.json"
    write_csv(data)
    argv = ["--data", str(data), "--format", "csv", "--protocol", "temporal", "--k", "2,1"]
    argv += ["--models", "pop,itemknn", "--json", str(out), "--report", str(tmp_path / "rep")]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "events" and result["ks"] == [1, 2]
    assert [r["model"] for r in result["results"]] == ["pop", "itemknn"]
    assert "recall@2" in result["results"][1]["metrics"]
    assert (tmp_path / "rep" / "README.md").is_file()
    assert "events — temporal" in capsys.readouterr().out


def test_main_prequential_with_a_user_sample(tmp_path) -> None:
    data, out = tmp_path / "events.csv", tmp_path / "result.json"
    write_csv(data)
    argv = ["--data", str(data), "--format", "csv", "--protocol", "prequential", "--k", "5"]
    assert main([*argv, "--models", "pop", "--max-users", "3", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["events"] > 0 and set(r["metrics"]) == {"hr@5"} and len(r["timeline"]) == 10


def test_main_reports_bad_input(tmp_path, capsys) -> None:
    data = tmp_path / "events.csv"
    write_csv(data)
    base = ["--data", str(data), "--format", "csv"]
    assert main([*base, "--protocol", "temporal", "--models", "pop,nosuch"]) == 2
    assert "unknown model(s) ['nosuch']; available:" in capsys.readouterr().err
    assert main([*base, "--protocol", "full"]) == 2
    assert "'full' is for format 'lightgcn'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--protocol", "temporal", "--k", "0"])


def test_load_beauty_orders_each_users_items(tmp_path) -> None:
    (tmp_path / "Beauty_S3Rec.txt").write_text("1 5 6 7\n2 6 5\n")
    ds = load_beauty(tmp_path)
    rows = list(zip(*(ds.events[c].to_pylist() for c in ("user_id", "item_id", "ts")), strict=True))
    assert rows == [("1", "5", 0), ("2", "6", 0), ("1", "6", 1), ("2", "5", 1), ("1", "7", 2)]
    assert set(ds.events["type"].to_pylist()) == {"click"}


def test_load_lastfm_reads_weights_in_file_order(tmp_path) -> None:
    (tmp_path / "user_artists.dat").write_bytes(
        b"userID\tartistID\tweight\r\n2\t51\t13883\r\n2\t52\t11690\r\n4\t51\t7\r\n"
    )
    ds = load_lastfm(tmp_path)
    assert ds.events["user_id"].to_pylist() == ["2", "2", "4"]
    assert ds.events["item_id"].to_pylist() == ["51", "52", "51"]
    assert ds.events["value"].to_pylist() == [13883.0, 11690.0, 7.0]
    assert ds.events["ts"].to_pylist() == [0.0, 1.0, 2.0]
    assert ds.name == tmp_path.name


def test_load_diginetica_names_anonymous_sessions_and_reads_categories(tmp_path) -> None:
    (tmp_path / "train-purchases.csv").write_text(
        "sessionId;userId;timeframe;eventdate;ordernumber;itemId\n"
        "150;18278;2000;2016-05-06;16421;25911\n"
        "151;NA;1000;2016-05-06;16290;175874\n"
        "152;18278;0;2016-01-02;1;7\n"
    )
    (tmp_path / "product-categories.csv").write_text("itemId;categoryId\n25911;9\n7;3\n99;1\n")
    ds = load_diginetica(tmp_path)
    rows = list(zip(*(ds.events[c].to_pylist() for c in ("user_id", "item_id", "ts")), strict=True))
    may6 = 1462492800.0  # 2016-05-06 00:00 UTC
    assert rows == [
        ("18278", "7", 1451692800.0),
        ("s151", "175874", may6 + 1.0),
        ("18278", "25911", may6 + 2.0),
    ]
    assert set(ds.events["type"].to_pylist()) == {"purchase"}
    categories = dict(
        zip(ds.items["item_id"].to_pylist(), ds.items["category"].to_pylist(), strict=True)
    )
    assert categories == {"25911": "9", "7": "3", "175874": None}


@pytest.mark.realdata
def test_itemknn_beats_popularity_on_ml100k(shared_data, tmp_path) -> None:
    """Leave-last-out, where 485 users are tested. (On the temporal split only 95 users are left
    and popularity wins there: ndcg@10 0.151 against 0.146.)"""
    out = tmp_path / "ml.json"
    argv = ["--data", str(shared_data / "ml-100k"), "--format", "movielens"]
    argv += ["--protocol", "leave-last-out", "--k", "10", "--models", "pop,itemknn"]
    assert main([*argv, "--max-users", "200", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_test_users"] == 200
    pop, itemknn = result["results"]
    assert itemknn["metrics"]["ndcg@10"] > pop["metrics"]["ndcg@10"]
