"""Tests for rec.data: the synthetic generator's structure, the loaders, and log records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rec.data import (
    EVENTS_SCHEMA,
    ITEMS_SCHEMA,
    Dataset,
    generate,
    load,
    load_csv,
    load_lightgcn,
    load_movielens,
)
from rec.events import EVENT_TYPES, ItemIn, event_record, item_record, parse_payload

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DAY = 86400.0


@pytest.fixture(scope="module")
def demo() -> Dataset:
    """The default demo data set (generated once for the module)."""
    return generate()


@pytest.fixture(scope="module")
def small() -> Dataset:
    return generate(n_users=40, n_items=60, n_events=800, n_categories=5, seed=7, days=3)


def _rows(ds: Dataset) -> list[tuple]:
    return [tuple(r.values()) for r in ds.events.to_pylist()]


def _cat_of(ds: Dataset) -> dict[str, str]:
    return dict(zip(ds.items["item_id"].to_pylist(), ds.items["category"].to_pylist(), strict=True))


# ----------------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------------


def test_generate_is_deterministic() -> None:
    args = {"n_users": 30, "n_items": 50, "n_events": 500, "seed": 1}
    a, b = generate(**args), generate(**args)
    assert a.events.equals(b.events) and a.items.equals(b.items)
    assert a == b
    other = generate(**{**args, "seed": 2})
    assert not a.events.equals(other.events)


def test_generate_shapes_and_types(demo: Dataset) -> None:
    ev, items = demo.events, demo.items
    assert demo.name == "synthetic"
    assert ev.schema.equals(EVENTS_SCHEMA) and items.schema.equals(ITEMS_SCHEMA)
    assert ev.num_rows == 100_000 and items.num_rows == 1000
    assert items["item_id"].to_pylist() == [f"i{n}" for n in range(1000)]
    assert set(pc.unique(ev["user_id"]).to_pylist()) == {f"u{n}" for n in range(2000)}
    assert set(pc.unique(ev["item_id"]).to_pylist()) <= set(items["item_id"].to_pylist())
    assert set(pc.unique(ev["type"]).to_pylist()) <= set(EVENT_TYPES)

    ts = ev["ts"].to_numpy()
    assert np.all(np.diff(ts) >= 0)
    assert ts.min() >= 1_700_000_000.0 and ts.max() <= 1_700_000_000.0 + 60 * DAY
    assert ts.max() - ts.min() > 50 * DAY  # spread over the whole period

    categories = {f"c{c:02d}" for c in range(20)}
    for row in items.to_pylist():
        n = row["item_id"][1:]
        assert row["category"] in categories
        assert row["title"] == f"Item {n} ({row['category']})"
        assert 1 <= len(row["tags"]) <= 3 and len(set(row["tags"])) == len(row["tags"])
        assert all(t.startswith(row["category"] + "-t") for t in row["tags"])


def test_generate_item_popularity_is_power_law(demo: Dataset) -> None:
    counts = np.sort(pc.value_counts(demo.events["item_id"]).field("counts").to_numpy())[::-1]
    assert counts[:100].sum() > 0.35 * demo.events.num_rows  # top 10% of 1000 items


def test_generate_user_activity(demo: Dataset) -> None:
    counts = pc.value_counts(demo.events["user_id"]).field("counts").to_numpy()
    assert len(counts) == 2000 and counts.min() >= 3 and counts.sum() == 100_000
    assert counts.max() > 20 * np.median(counts)  # a few heavy users, many light ones


def test_generate_has_sequential_signal(demo: Dataset) -> None:
    """Consecutive events of one user share a category far more often than shuffled ones."""
    cat = _cat_of(demo)
    users = np.array(demo.events["user_id"].to_pylist())
    cats = np.array([cat[i] for i in demo.events["item_id"].to_pylist()])
    rng = np.random.default_rng(0)
    in_order = np.lexsort((np.arange(len(users)), users))  # per user, in ts order
    shuffled = np.lexsort((rng.random(len(users)), users))  # per user, independent order

    def same_category_rate(idx: np.ndarray) -> float:
        u, c = users[idx], cats[idx]
        pairs = u[1:] == u[:-1]
        return float((c[1:] == c[:-1])[pairs].mean())

    observed, independent = same_category_rate(in_order), same_category_rate(shuffled)
    assert observed > independent + 0.08, (observed, independent)


def test_generate_event_types_and_ratings(demo: Dataset) -> None:
    types = Counter(demo.events["type"].to_pylist())
    assert types["view"] > types["click"] > types["add_to_cart"] > types["purchase"] > 0
    assert 0 < types["skip"] < types["view"] / 5
    assert types["rating"] > 0

    is_rating = pc.equal(demo.events["type"], "rating")
    values = demo.events["value"]
    assert pc.all(pc.equal(pc.is_valid(values), is_rating)).as_py()  # value iff rating
    ratings = pc.filter(values, is_rating).to_numpy()
    assert set(np.unique(ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_generate_has_trending_items(demo: Dataset) -> None:
    """Some items gain far more than the typical item from the first to the last quarter."""
    ts = demo.events["ts"].to_numpy()
    items = np.array(demo.events["item_id"].to_pylist())
    first = Counter(items[ts < np.quantile(ts, 0.25)])
    last = Counter(items[ts > np.quantile(ts, 0.75)])
    gains = {i: (last[i] + 1) / (first[i] + 1) for i in set(items) if first[i] + last[i] >= 40}
    typical = np.median(list(gains.values()))
    rising = [i for i, gain in gains.items() if gain > 2.5 * typical and last[i] >= 30]
    assert len(rising) >= 5, (typical, rising)


def test_generate_rejects_too_few_events() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        generate(n_users=10, n_items=5, n_events=29)


# ----------------------------------------------------------------------------------------------
# Dataset and log records
# ----------------------------------------------------------------------------------------------


def test_event_records_match_rec_events(small: Dataset) -> None:
    records = small.event_records()
    assert len(records) == small.events.num_rows
    first = small.events.slice(0, 1).to_pylist()[0]
    assert records[0] == event_record(**first)
    assert all(r.keys() == records[0].keys() for r in records)
    assert [r["ts"] for r in records] == small.events["ts"].to_pylist()
    rating = next(r for r in records if r["type"] == "rating")
    assert rating["value"] in {1.0, 2.0, 3.0, 4.0, 5.0}
    assert all(r["value"] is None for r in records if r["type"] != "rating")


def test_item_records_match_rec_events(small: Dataset) -> None:
    records = small.item_records()
    first_ts = min(small.events["ts"].to_pylist())
    assert len(records) == small.items.num_rows
    for record, row in zip(records, small.items.to_pylist(), strict=True):
        assert record == item_record(ItemIn(**row), ts=first_ts)
        assert parse_payload(record) == {k: row[k] for k in ("category", "tags", "title")}


def test_item_records_without_events_use_ts_zero() -> None:
    ds = Dataset(
        events=EVENTS_SCHEMA.empty_table(),
        items=pa.table({"item_id": ["a"], "category": [None], "tags": [[]], "title": ["A"]}),
        name="empty",
    )
    assert [r["ts"] for r in ds.item_records()] == [0.0]
    assert json.loads(ds.item_records()[0]["payload"]) == {
        "category": None,
        "tags": [],
        "title": "A",
    }


def test_dataset_conforms_tables_and_names_missing_columns() -> None:
    events = pa.table(
        {"user_id": ["u"], "item_id": ["i"], "type": ["view"], "value": [None], "ts": [1],
         "extra": [0]}
    )  # fmt: skip
    items = pa.table({"item_id": ["i"], "category": ["c"], "tags": [["t"]], "title": [None]})
    ds = Dataset(events=events, items=items, name="x")
    assert ds.events.schema.equals(EVENTS_SCHEMA) and ds.items.schema.equals(ITEMS_SCHEMA)
    with pytest.raises(ValueError, match=r"events table lacks column\(s\) \['ts'\]"):
        Dataset(events=events.drop_columns(["ts"]), items=items, name="x")


# ----------------------------------------------------------------------------------------------
# MovieLens
# ----------------------------------------------------------------------------------------------

U_DATA = "1\t10\t4\t300\n2\t20\t5\t100\n1\t30\t1\t200\n3\t10\t3\t100\n"
U_ITEM_LINES = [
    "10|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join("0001100000000000000"),
    "20|Misérables, Les (1995)|01-Jan-1995||http://y|" + "|".join("0000000010000010000"),
    "40|Nothing (1990)|01-Jan-1990||http://z|" + "|".join("0000000000000000000"),
]


def _write_ml100k(folder: Path, with_items: bool = True) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text(U_DATA)
    if with_items:
        (folder / "u.item").write_bytes(("\n".join(U_ITEM_LINES) + "\n").encode("latin-1"))
    return folder


def test_load_movielens_100k(tmp_path: Path) -> None:
    folder = _write_ml100k(tmp_path / "ml-tiny")
    ds = load_movielens(folder)
    assert ds.name == "ml-tiny"
    assert _rows(ds) == [  # sorted by ts, ties in file order
        ("2", "20", "rating", 5.0, 100.0),
        ("3", "10", "rating", 3.0, 100.0),
        ("1", "30", "rating", 1.0, 200.0),
        ("1", "10", "rating", 4.0, 300.0),
    ]
    assert ds.items.to_pylist() == [
        {"item_id": "10", "category": "Animation", "tags": ["Animation", "Children's"],
         "title": "Toy Story (1995)"},
        {"item_id": "20", "category": "Drama", "tags": ["Drama", "Romance"],
         "title": "Misérables, Les (1995)"},
        {"item_id": "40", "category": None, "tags": [], "title": "Nothing (1990)"},
        {"item_id": "30", "category": None, "tags": [], "title": None},  # rated, not in u.item
    ]  # fmt: skip
    assert load_movielens(folder / "u.data") == ds  # the file itself works too


def test_load_movielens_100k_reads_genre_names_from_u_genre(tmp_path: Path) -> None:
    folder = _write_ml100k(tmp_path / "ml")
    genres = [f"G{n}" for n in range(19)]
    (folder / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(genres)) + "\n")
    assert load_movielens(folder).items["tags"].to_pylist()[:2] == [["G3", "G4"], ["G8", "G14"]]


def test_load_movielens_latest(tmp_path: Path) -> None:
    folder = tmp_path / "ml-latest-tiny"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n2,1,0.5,964982224\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation\n"
        '3,"American President, The (1995)",Comedy|Drama|Romance\n'
        "7,La cravate (1957),(no genres listed)\n"
    )
    ds = load_movielens(folder)
    assert _rows(ds) == [
        ("1", "3", "rating", 3.5, 964981247.0),
        ("2", "1", "rating", 0.5, 964982224.0),
        ("1", "1", "rating", 4.0, 964982703.0),
    ]
    assert ds.items.to_pylist() == [
        {"item_id": "1", "category": "Adventure", "tags": ["Adventure", "Animation"],
         "title": "Toy Story (1995)"},
        {"item_id": "3", "category": "Comedy", "tags": ["Comedy", "Drama", "Romance"],
         "title": "American President, The (1995)"},
        {"item_id": "7", "category": None, "tags": [], "title": "La cravate (1957)"},
    ]  # fmt: skip


def test_load_movielens_without_catalogue(tmp_path: Path) -> None:
    ds = load_movielens(_write_ml100k(tmp_path / "ml", with_items=False))
    assert ds.items.to_pylist() == [
        {"item_id": i, "category": None, "tags": [], "title": None} for i in ("20", "10", "30")
    ]


def test_load_movielens_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file or directory"):
        load_movielens(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no MovieLens ratings file \(u.data or ratings.csv\)"):
        load_movielens(tmp_path)
    bad = tmp_path / "u.data"
    bad.write_text("1\t10\t4\n")
    with pytest.raises(ValueError, match="not a MovieLens ratings file"):
        load_movielens(bad)
    bad.write_text("1\t10\tfour\t300\n")
    with pytest.raises(ValueError, match="u.data: cannot read CSV"):
        load_movielens(bad)
    bad.write_text("1\t10\t4\t300\n1\t\t4\t300\n")
    with pytest.raises(ValueError, match="column 'item' has 1 empty value"):
        load_movielens(bad)


# ----------------------------------------------------------------------------------------------
# LightGCN
# ----------------------------------------------------------------------------------------------


def test_load_lightgcn(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("0 5 1 2\n1 2\n2\n3 7 1\n")  # user 2 has no items
    (tmp_path / "test.txt").write_text("0 7\n1 5 1\n")
    train, test = load_lightgcn(tmp_path)
    assert train.name == f"{tmp_path.name}-train" and test.name == f"{tmp_path.name}-test"
    assert _rows(train) == [
        ("0", "5", "click", None, 0.0),
        ("0", "1", "click", None, 1.0),
        ("0", "2", "click", None, 2.0),
        ("1", "2", "click", None, 3.0),
        ("3", "7", "click", None, 4.0),
        ("3", "1", "click", None, 5.0),
    ]
    assert _rows(test) == [
        ("0", "7", "click", None, 6.0),
        ("1", "5", "click", None, 7.0),
        ("1", "1", "click", None, 8.0),
    ]
    assert train.items.equals(test.items)
    assert train.items.to_pylist() == [
        {"item_id": i, "category": None, "tags": [], "title": None} for i in ("5", "1", "2", "7")
    ]


def test_load_lightgcn_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_lightgcn(tmp_path / "train.txt")
    (tmp_path / "train.txt").write_text("0 1\n")
    with pytest.raises(ValueError, match=r"missing test\.txt"):
        load_lightgcn(tmp_path)


# ----------------------------------------------------------------------------------------------
# CSV / Parquet
# ----------------------------------------------------------------------------------------------


def test_load_csv_all_columns(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,type,value,timestamp,device\n"
        "7,a,view,,20,web\n"
        "8,b,rating,4.5,10,app\n"
        "7,b,,,30,web\n"  # empty type -> default
    )
    ds = load_csv(path)
    assert ds.name == "events"
    assert _rows(ds) == [
        ("8", "b", "rating", 4.5, 10.0),
        ("7", "a", "view", None, 20.0),
        ("7", "b", "click", None, 30.0),
    ]
    assert ds.items["item_id"].to_pylist() == ["b", "a"]


def test_load_csv_defaults_and_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("who,what\n1,x\n2,y\n1,y\n")
    ds = load_csv(path, user_col="who", item_col="what", default_type="purchase")
    assert _rows(ds) == [
        ("1", "x", "purchase", None, 0.0),
        ("2", "y", "purchase", None, 1.0),
        ("1", "y", "purchase", None, 2.0),
    ]


def test_load_parquet_with_int_ids_and_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    table = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "item_id": pa.array([10, 20], pa.int32()),
            "timestamp": pa.array([2_000_000, 1_000_000], pa.timestamp("ms")),
            "value": pa.array([1, None], pa.int64()),
        }
    )
    pq.write_table(table, path)
    assert _rows(load_csv(path)) == [
        ("2", "20", "click", None, 1000.0),
        ("1", "10", "click", 1.0, 2000.0),
    ]


def test_load_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("user,item_id\n1,a\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['user_id'\]"):
        load_csv(path)
    path.write_text("user_id,item_id,type\n1,a,watch\n")
    with pytest.raises(ValueError, match=r"unknown event type\(s\) \['watch'\]"):
        load_csv(path)
    path.write_text("user_id,item_id,timestamp\n1,a,yesterday\n")
    with pytest.raises(ValueError, match="column 'timestamp' cannot be read as double"):
        load_csv(path)
    path.write_text("user_id,item_id\n1,\n")
    with pytest.raises(ValueError, match="column 'item_id' has 1 empty value"):
        load_csv(path)
    path.write_text("")
    with pytest.raises(ValueError, match="e.csv: cannot read CSV"):
        load_csv(path)
    (tmp_path / "e.txt").write_text("user_id,item_id\n1,a\n")
    with pytest.raises(ValueError, match="unknown extension '.txt'"):
        load_csv(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="no such file"):
        load_csv(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="default_type 'watch'"):
        load_csv(path, default_type="watch")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="cannot read Parquet"):
        load_csv(tmp_path / "bad.parquet")


# ----------------------------------------------------------------------------------------------
# load()
# ----------------------------------------------------------------------------------------------


def test_load_dispatches_by_format(tmp_path: Path, demo: Dataset) -> None:
    folder = _write_ml100k(tmp_path / "ml")
    assert load(folder, "movielens") == load_movielens(folder)
    (tmp_path / "train.txt").write_text("0 1\n")
    (tmp_path / "test.txt").write_text("0 2\n")
    assert load(tmp_path, "lightgcn") == load_lightgcn(tmp_path)
    (tmp_path / "e.csv").write_text("user_id,item_id\n1,a\n")
    assert load(tmp_path / "e.csv", "csv") == load_csv(tmp_path / "e.csv")
    assert load(None, "synthetic") == demo
    with pytest.raises(ValueError, match="unknown data format 'json'"):
        load(tmp_path, "json")
    with pytest.raises(ValueError, match="needs a path"):
        load(None, "csv")


# ----------------------------------------------------------------------------------------------
# The real data sets in ../shared/data
# ----------------------------------------------------------------------------------------------


def _shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing")
    return folder


def _n_unique(col: pa.ChunkedArray) -> int:
    return len(pc.unique(col))


@pytest.mark.realdata
def test_real_ml_100k() -> None:
    ds = load_movielens(_shared("ml-100k"))
    lines = (SHARED / "ml-100k" / "u.data").read_text().splitlines()
    assert ds.events.num_rows == len(lines) == 100_000
    assert _n_unique(ds.events["user_id"]) == len({ln.split("\t")[0] for ln in lines}) == 943
    assert _n_unique(ds.events["item_id"]) == 1682 and ds.items.num_rows == 1682
    ratings = Counter(float(ln.split("\t")[2]) for ln in lines)
    assert Counter(ds.events["value"].to_pylist()) == ratings
    assert ds.items.slice(0, 1).to_pylist()[0]["title"] == "Toy Story (1995)"
    assert np.all(np.diff(ds.events["ts"].to_numpy()) >= 0)


@pytest.mark.realdata
def test_real_ml_latest_small() -> None:
    ds = load_movielens(_shared("ml-latest-small"))
    lines = (SHARED / "ml-latest-small" / "ratings.csv").read_text().splitlines()[1:]
    assert ds.events.num_rows == len(lines) == 100_836
    assert _n_unique(ds.events["user_id"]) == 610
    assert _n_unique(ds.events["item_id"]) == 9_724
    assert ds.items.num_rows == 9_742  # movies.csv also lists unrated movies
    assert set(pc.unique(ds.events["value"]).to_pylist()) == {x / 2 for x in range(1, 11)}


@pytest.mark.realdata
def test_real_gowalla_lightgcn() -> None:
    folder = _shared("gowalla-lightgcn")
    train, test = load_lightgcn(folder)
    for ds, split in ((train, "train"), (test, "test")):
        lines = [ln.split() for ln in (folder / f"{split}.txt").read_text().splitlines()]
        assert ds.events.num_rows == sum(len(f) - 1 for f in lines)
        assert _n_unique(ds.events["user_id"]) == sum(len(f) > 1 for f in lines)
        assert _n_unique(ds.events["item_id"]) == len({i for f in lines for i in f[1:]})
    assert train.events.num_rows == 810_128 and _n_unique(train.events["item_id"]) == 40_981
    assert train.items.num_rows == 40_981  # test items are all seen in train
    assert train.events["ts"][-1].as_py() + 1 == test.events["ts"][0].as_py()
