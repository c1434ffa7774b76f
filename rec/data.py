"""Interaction data sets: a synthetic demo generator and loaders for public formats.

Every source ends up as a `Dataset`: an events table sorted by time and an items table (the
catalogue). `event_records()` / `item_records()` turn it into log records, so a data set can be
replayed into the serving log exactly as live traffic would arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from rec.events import EVENT_TYPES, ItemIn, event_record, item_record

EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("type", pa.string()),
        ("value", pa.float64()),
        ("ts", pa.float64()),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("title", pa.string()),
    ]
)
FORMATS = ("movielens", "lightgcn", "csv", "synthetic")

# MovieLens 100K genre order (u.genre), used when u.genre is not next to u.item.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# Column types of a MovieLens ratings file: user, item, rating, timestamp.
RATING_TYPES = (pa.string(), pa.string(), pa.float64(), pa.float64())


@dataclass(frozen=True)
class Dataset:
    """A named interaction data set: events sorted by `ts` (stable) plus its item catalogue.

    Tables are cast to `EVENTS_SCHEMA` / `ITEMS_SCHEMA` on construction (extra columns are
    dropped), so every consumer can rely on the same column names and types.
    """

    events: pa.Table
    items: pa.Table
    name: str
    # Whether ts orders each user's events in real (or sequence) time. False when ts is only a
    # position in a file whose order is not time (LightGCN lists are sorted by item id, Last.fm
    # by artist id): what comes "last" there says nothing about the future.
    ordered: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", _conform(self.events, EVENTS_SCHEMA, "events"))
        object.__setattr__(self, "items", _conform(self.items, ITEMS_SCHEMA, "items"))

    def event_records(self) -> list[dict]:
        """The events as `rec.events.event_record` dicts, in ts order."""
        cols = [self.events.column(name).to_pylist() for name in EVENTS_SCHEMA.names]
        return [
            event_record(user_id=u, item_id=i, type=t, value=v, ts=ts)
            for u, i, t, v, ts in zip(*cols, strict=True)
        ]

    def item_records(self) -> list[dict]:
        """One `rec.events.item_record` per catalogue item.

        All share ts = the earliest event ts (0 without events), so replaying items first and
        then events never shows an event before its item is known.
        """
        first = pc.min(self.events.column("ts")).as_py()
        ts = 0.0 if first is None else first
        return [item_record(ItemIn(**row), ts=ts) for row in self.items.to_pylist()]


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select and cast `table` to `schema`, with a clear error for a missing column."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{what} table lacks column(s) {missing}; has {table.column_names}")
    return table.select(schema.names).cast(schema)


def _make_dataset(
    name: str,
    user: pa.Array | pa.ChunkedArray,
    item: pa.Array | pa.ChunkedArray,
    type_: pa.Array | pa.ChunkedArray,
    value: pa.Array | pa.ChunkedArray,
    ts: pa.Array | pa.ChunkedArray,
    items: pa.Table | None = None,
    ordered: bool = True,
) -> Dataset:
    """Build a Dataset from event columns: sort by ts (stable) and complete the catalogue.

    Items that occur in events but not in `items` are appended with empty metadata, so every
    event refers to a known catalogue entry.
    """
    events = pa.table([user, item, type_, value, ts], schema=EVENTS_SCHEMA)
    events = events.take(pc.sort_indices(events, sort_keys=[("ts", "ascending")]))
    if items is None:
        items = ITEMS_SCHEMA.empty_table()
    items = _conform(items, ITEMS_SCHEMA, "items")
    seen = pc.unique(events.column("item_id"))
    extra = pc.filter(seen, pc.invert(pc.is_in(seen, value_set=items.column("item_id"))))
    if len(extra):
        items = pa.concat_tables([items, _bare_items(extra)])
    return Dataset(events=events, items=items, name=name, ordered=ordered)


def _bare_items(item_ids: pa.Array) -> pa.Table:
    """Catalogue rows with only an id (no category, tags or title)."""
    n = len(item_ids)
    return pa.table(
        [
            item_ids,
            pa.nulls(n, pa.string()),
            pa.array([[]] * n, pa.list_(pa.string())),
            pa.nulls(n, pa.string()),
        ],
        schema=ITEMS_SCHEMA,
    )


# ----------------------------------------------------------------------------------------------
# Synthetic demo data
# ----------------------------------------------------------------------------------------------

ZIPF_EXPONENT = 1.0  # item popularity ∝ rank^-1
USER_ZIPF_OFFSET = 5.0  # user activity ∝ (rank + offset)^-1: a few heavy users, a long light tail
MIN_USER_EVENTS = 3
TAGS_PER_CATEGORY = 5
ITEM_NOISE = 0.6  # spread of item vectors around their category centre
USER_NOISE = 0.5  # spread of user tastes around their favourite categories' mix
TEMPERATURE = 0.25  # lower = users stick closer to their taste
CONTINUE_PROB = 0.3  # chance the next item (same session) shares the previous item's category
SESSION_GAP_S = 1800.0  # a pause longer than this starts a new session
SESSION_MEAN_EVENTS = 6.0
IN_SESSION_GAP_S = 60.0  # mean pause between events in one session
TRENDING_SHARE = 0.05  # share of items whose popularity rises over time
TRENDING_GROWTH = 9.0  # trending items end up (1 + growth) times as popular as at the start
SKIP_Z = -1.0  # events this far below the user's mean taste score may become skips
SKIP_PROB = 0.35
# Funnel: most events are views; purchases are rare. Skips are assigned from taste afterwards.
BASE_TYPES = ("view", "click", "add_to_cart", "purchase", "rating")
BASE_TYPE_PROBS = (0.62, 0.18, 0.06, 0.03, 0.11)
SYNTH_TYPES = (*BASE_TYPES, "skip")


def generate(
    n_users: int = 2000,
    n_items: int = 1000,
    n_events: int = 100_000,
    n_categories: int = 20,
    dim: int = 16,
    seed: int = 0,
    start_ts: float = 1_700_000_000.0,
    days: float = 60.0,
) -> Dataset:
    """The synthetic demo data set, fully determined by its arguments.

    Built so that recommenders have something real to learn:
    - latent tastes: items sit near their category's centre, users near a mix of 1-3 favourite
      categories; an item is drawn with probability ∝ popularity × exp(taste·item / T);
    - Zipf-like item popularity and user activity (every user has at least 3 events);
    - session continuity: within a session, with probability `CONTINUE_PROB` the next item is
      drawn from the previous item's category, so recent items predict the next ones;
    - a funnel of types (view > click > add_to_cart > purchase), ratings 1-5 that follow the
      taste score, and skips on items far below the user's usual taste;
    - events in sessions over `days`, and a few trending items whose popularity rises with time.
    """
    if min(n_users, n_items, n_categories, dim) < 1 or days <= 0:
        raise ValueError("n_users, n_items, n_categories, dim and days must be positive")
    if n_events < MIN_USER_EVENTS * n_users:
        raise ValueError(f"n_events must be at least {MIN_USER_EVENTS} * n_users")
    rng = np.random.default_rng(seed)
    span = days * 86400.0

    # Catalogue: categories with centres and tag pools; items near their category centre.
    centres = rng.normal(size=(n_categories, dim)) / np.sqrt(dim)
    item_cat = rng.integers(n_categories, size=n_items)
    item_vec = centres[item_cat] + ITEM_NOISE * rng.normal(size=(n_items, dim)) / np.sqrt(dim)
    log_pop = np.log(_zipf_weights(n_items, 0.0, rng))
    trending = rng.choice(n_items, size=max(1, round(TRENDING_SHARE * n_items)), replace=False)
    items = _synthetic_items(item_cat, n_categories, rng)

    # Users: activity (≥ MIN_USER_EVENTS each) and a unit taste vector near favourite categories.
    counts = MIN_USER_EVENTS + rng.multinomial(
        n_events - MIN_USER_EVENTS * n_users, _zipf_weights(n_users, USER_ZIPF_OFFSET, rng)
    )
    tastes = np.empty((n_users, dim))
    for u in range(n_users):
        favourites = rng.choice(
            n_categories, size=min(rng.integers(1, 4), n_categories), replace=False
        )
        mix = rng.dirichlet(np.ones(len(favourites))) @ centres[favourites]
        tastes[u] = mix + USER_NOISE * rng.normal(size=dim) / np.sqrt(dim)
    tastes /= np.linalg.norm(tastes, axis=1, keepdims=True)

    # Items grouped by category, so "draw within category c" is a slice of one cumulative sum.
    order = np.argsort(item_cat, kind="stable")
    seg_lo = np.searchsorted(item_cat[order], np.arange(n_categories), side="left")
    seg_hi = np.searchsorted(item_cat[order], np.arange(n_categories), side="right")

    times, drawn, z_scores = [], [], []
    for u in range(n_users):
        t = _user_times(int(counts[u]), span, rng)
        logits = log_pop + item_vec @ tastes[u] / TEMPERATURE
        weights = np.exp(logits - logits.max())
        seq = _user_items(weights, t, span, order, seg_lo, seg_hi, item_cat, trending, rng)
        scores = item_vec[seq] @ tastes[u]
        times.append(t)
        drawn.append(seq)
        z_scores.append((scores - scores.mean()) / (scores.std() + 1e-9))
    t_all, item_all, z_all = np.concatenate(times), np.concatenate(drawn), np.concatenate(z_scores)
    user_all = np.repeat(np.arange(n_users), counts)

    # Types and values, vectorised over all events.
    type_idx = rng.choice(len(BASE_TYPES), size=n_events, p=BASE_TYPE_PROBS)
    type_idx[(z_all < SKIP_Z) & (rng.random(n_events) < SKIP_PROB)] = SYNTH_TYPES.index("skip")
    is_rating = type_idx == SYNTH_TYPES.index("rating")
    ratings = np.clip(np.rint(3.5 + 1.2 * z_all + rng.normal(0.0, 0.7, n_events)), 1, 5)

    user_ids = pa.array([f"u{n}" for n in range(n_users)], pa.string())
    return _make_dataset(
        "synthetic",
        user=user_ids.take(user_all),
        item=items.column("item_id").take(item_all),
        type_=pa.array(SYNTH_TYPES, pa.string()).take(type_idx),
        value=pa.array(ratings, pa.float64(), mask=~is_rating),
        ts=pa.array(np.round(start_ts + t_all, 3), pa.float64()),
        items=items,
    )


def _zipf_weights(n: int, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Normalised weights ∝ (rank + offset)^-ZIPF_EXPONENT, ranks randomly assigned to indices."""
    weights = np.empty(n)
    weights[rng.permutation(n)] = (np.arange(1, n + 1) + offset) ** -ZIPF_EXPONENT
    return weights / weights.sum()


def _synthetic_items(item_cat: np.ndarray, n_categories: int, rng: np.random.Generator) -> pa.Table:
    """Catalogue rows: id `i{n}`, category `cNN`, 1-3 tags from the category's pool, a title."""
    width = max(2, len(str(n_categories - 1)))
    cat_names = [f"c{c:0{width}d}" for c in range(n_categories)]
    n_tags = rng.integers(1, 4, size=len(item_cat))
    tags = [
        [
            f"{cat_names[c]}-t{k}"
            for k in sorted(rng.choice(TAGS_PER_CATEGORY, size=m, replace=False))
        ]
        for c, m in zip(item_cat, n_tags, strict=True)
    ]
    return pa.table(
        [
            [f"i{n}" for n in range(len(item_cat))],
            [cat_names[c] for c in item_cat],
            tags,
            [f"Item {n} ({cat_names[c]})" for n, c in enumerate(item_cat)],
        ],
        schema=ITEMS_SCHEMA,
    )


def _user_times(k: int, span: float, rng: np.random.Generator) -> np.ndarray:
    """k increasing event offsets in [0, span]: sessions of a few events, minutes apart."""
    new_session = rng.random(k) < 1.0 / SESSION_MEAN_EVENTS
    new_session[0] = True
    session = np.cumsum(new_session) - 1
    gaps = rng.exponential(IN_SESSION_GAP_S, size=k)
    gaps[new_session] = 0.0
    walked = np.cumsum(gaps)
    in_session = walked - walked[np.flatnonzero(new_session)][session]
    starts = rng.uniform(0.0, span, size=session[-1] + 1)
    return np.sort(np.minimum(starts[session] + in_session, span))


def _user_items(
    weights: np.ndarray,
    t: np.ndarray,
    span: float,
    order: np.ndarray,
    seg_lo: np.ndarray,
    seg_hi: np.ndarray,
    item_cat: np.ndarray,
    trending: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """One user's item sequence, given unnormalised item weights and event offsets `t`.

    Sampled by inverse CDF over one cumulative sum per user (items grouped by category):
    - a fresh draw picks from all items, or from the trending items with the probability that
      their growing popularity (1 + TRENDING_GROWTH · t/span) adds;
    - a continued draw (same session, prob. CONTINUE_PROB) stays in the category of the chain's
      fresh draw, i.e. of the previous item.
    """
    k = len(t)
    r_item, r_trend, r_cont = rng.random((3, k))
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    cum_trend = np.concatenate([[0.0], np.cumsum(weights[trending])])
    boost = TRENDING_GROWTH * (t / span) * cum_trend[-1] / cum[-1]
    use_trend = r_trend < boost / (1.0 + boost)

    same_session = np.concatenate([[False], np.diff(t) < SESSION_GAP_S])
    cont = same_session & (r_cont < CONTINUE_PROB)

    fresh = np.where(
        use_trend,
        trending[_inverse_cdf(cum_trend, 0, len(trending), r_item)],
        order[_inverse_cdf(cum, 0, len(order), r_item)],
    )
    anchor = np.maximum.accumulate(np.where(cont, 0, np.arange(k)))
    cat = item_cat[fresh[anchor]]
    within = order[_inverse_cdf(cum, seg_lo[cat], seg_hi[cat], r_item)]
    return np.where(cont, within, fresh)


def _inverse_cdf(
    cum: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int, r: np.ndarray
) -> np.ndarray:
    """Positions drawn ∝ weight within [lo, hi), where `cum` is [0, cumsum(weights)...]."""
    target = cum[lo] + r * (cum[hi] - cum[lo])
    return np.clip(np.searchsorted(cum, target, side="right") - 1, lo, np.asarray(hi) - 1)


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


def load_movielens(path: str | Path) -> Dataset:
    """MovieLens ratings: ml-100k `u.data` (tab-separated, no header) or ml-latest(-small)
    `ratings.csv` (header userId,movieId,rating,timestamp); `path` is the folder or the file.

    Events have type "rating" with the rating as value. The catalogue comes from `u.item` or
    `movies.csv` beside the ratings when present: category = first genre, tags = all genres.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "ratings.csv", path / "u.data"]
        ratings = next((p for p in candidates if p.is_file()), None)
        if ratings is None:
            raise ValueError(f"{path}: no MovieLens ratings file (u.data or ratings.csv) in it")
    elif path.is_file():
        ratings = path
    else:
        raise ValueError(f"{path}: no such file or directory")

    first_line = _first_line(ratings)
    if first_line.startswith("userId,"):
        cols = ["userId", "movieId", "rating", "timestamp"]
        table = _read_csv(ratings, column_types=dict(zip(cols, RATING_TYPES, strict=True)))
        catalogue = ratings.parent / "movies.csv"
        items = _movies_csv(catalogue) if catalogue.is_file() else None
    elif first_line.count("\t") == 3:
        cols = ["user", "item", "rating", "ts"]
        table = _read_csv(
            ratings,
            delimiter="\t",
            column_names=cols,
            column_types=dict(zip(cols, RATING_TYPES, strict=True)),
        )
        catalogue = ratings.parent / "u.item"
        items = _u_item(catalogue) if catalogue.is_file() else None
    else:
        raise ValueError(
            f"{ratings}: not a MovieLens ratings file (expected a 'userId,movieId,rating,"
            f"timestamp' header or 4 tab-separated columns); first line: {first_line[:80]!r}"
        )
    _check_columns(table, cols, ratings)
    _check_no_nulls(table, cols, ratings)
    user, item, rating, ts = (table.column(c) for c in cols)
    rating_type = pa.repeat(pa.scalar("rating"), len(table))
    return _make_dataset(ratings.parent.name, user, item, rating_type, rating, ts, items)


def _u_item(path: Path) -> pa.Table:
    """ml-100k `u.item` (latin-1, `|`-separated, 19 genre flags at the end) as catalogue rows."""
    genre_file = path.parent / "u.genre"
    genres = ML100K_GENRES
    if genre_file.is_file():
        pairs = [
            line.rsplit("|", 1) for line in genre_file.read_text("latin-1").splitlines() if line
        ]
        genres = tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
    rows = []
    for n, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line:
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(genres):
            raise ValueError(f"{path}:{n}: expected {5 + len(genres)} '|'-separated fields")
        tags = [g for g, flag in zip(genres, fields[5:], strict=True) if flag == "1"]
        rows.append((fields[0], tags, fields[1]))
    return _catalogue(rows)


def _movies_csv(path: Path) -> pa.Table:
    """ml-latest `movies.csv` (movieId,title,genres with `|`-joined genres) as catalogue rows."""
    cols = ["movieId", "title", "genres"]
    table = _read_csv(path, column_types=dict.fromkeys(cols, pa.string()))
    _check_columns(table, cols, path)
    rows = []
    for movie, title, genres in zip(*(table.column(c).to_pylist() for c in cols), strict=True):
        no_genres = not genres or genres == "(no genres listed)"
        rows.append((movie, [] if no_genres else genres.split("|"), title))
    return _catalogue(rows)


def _catalogue(rows: list[tuple[str, list[str], str]]) -> pa.Table:
    """Catalogue table from (item_id, genres, title); the category is the first genre."""
    return pa.table(
        [
            [r[0] for r in rows],
            [r[1][0] if r[1] else None for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
        ],
        schema=ITEMS_SCHEMA,
    )


def load_lightgcn(path: str | Path) -> tuple[Dataset, Dataset]:
    """LightGCN/NGCF split (`train.txt`, `test.txt`: "user item item ..." per line) as
    (train, test), with type "click".

    There are no timestamps, so ts is the position in file order: train events get 0, 1, 2, ...
    and test events continue after the last train event, so replaying train then test keeps
    time increasing. Each user's items are listed by id, not time, so the data are not
    `ordered`. Both data sets share one catalogue: every item in either file (ids only).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected one holding train.txt and test.txt)")
    parts = []
    for split in ("train", "test"):
        file = path / f"{split}.txt"
        if not file.is_file():
            raise ValueError(f"{path}: missing {split}.txt")
        parts.append(_user_item_lines(file))
    catalogue = _bare_items(pc.unique(pa.chunked_array([parts[0][1], parts[1][1]])))
    datasets = []
    start = 0
    for split, (users, items) in zip(("train", "test"), parts, strict=True):
        n = len(users)
        datasets.append(
            _make_dataset(
                f"{path.name}-{split}",
                users,
                items,
                pa.repeat(pa.scalar("click"), n),
                pa.nulls(n, pa.float64()),
                pa.array(np.arange(start, start + n, dtype=np.float64)),
                catalogue,
                ordered=False,
            )
        )
        start += n
    return datasets[0], datasets[1]


def _user_item_lines(path: Path) -> tuple[pa.Array, pa.Array]:
    """(users, items) string arrays from "user item item ..." lines; users may have no items."""
    users: list[str] = []
    items: list[str] = []
    with path.open() as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                users.extend([fields[0]] * (len(fields) - 1))
                items.extend(fields[1:])
    return pa.array(users, pa.string()), pa.array(items, pa.string())


def load_csv(
    path: str | Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    ts_col: str = "timestamp",
    type_col: str = "type",
    value_col: str = "value",
    default_type: str = "click",
) -> Dataset:
    """Events from a CSV (header required) or Parquet file, chosen by extension.

    User and item columns are required and cast to string. Optional columns fall back to
    defaults: no ts column -> row order (0, 1, 2, ...), no type column or an empty type ->
    `default_type`, no value column -> null. A ts column may be numeric (Unix seconds) or a
    timestamp type. Types must be ones `rec.events` accepts.
    """
    path = Path(path)
    if default_type not in EVENT_TYPES:
        raise ValueError(f"default_type {default_type!r} is not one of {EVENT_TYPES}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = _read_csv(path, column_types={user_col: pa.string(), item_col: pa.string()})
    elif suffix in (".parquet", ".pq"):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: cannot read Parquet: {e}") from e
    else:
        raise ValueError(f"{path}: unknown extension {suffix!r} (expected .csv, .parquet or .pq)")
    _check_columns(table, [user_col, item_col], path)
    _check_no_nulls(table, [user_col, item_col], path)
    n = table.num_rows
    names = table.column_names

    if ts_col in names:
        _check_no_nulls(table, [ts_col], path)
        ts = _seconds(table.column(ts_col), ts_col, path)
    else:
        ts = pa.array(np.arange(n, dtype=np.float64))
    if type_col in names:
        type_ = pc.fill_null(
            _cast(table.column(type_col), pa.string(), type_col, path), default_type
        )
        unknown = pc.unique(pc.filter(type_, pc.invert(pc.is_in(type_, pa.array(EVENT_TYPES)))))
        if len(unknown):
            raise ValueError(
                f"{path}: column {type_col!r} has unknown event type(s) {unknown.to_pylist()[:5]};"
                f" allowed: {EVENT_TYPES}"
            )
    else:
        type_ = pa.repeat(pa.scalar(default_type), n)
    value = (
        _cast(table.column(value_col), pa.float64(), value_col, path)
        if value_col in names
        else pa.nulls(n, pa.float64())
    )
    user = _cast(table.column(user_col), pa.string(), user_col, path)
    item = _cast(table.column(item_col), pa.string(), item_col, path)
    return _make_dataset(path.stem, user, item, type_, value, ts)


def load(path: str | Path | None, format: str) -> Dataset | tuple[Dataset, Dataset]:
    """Load a data set by format name: "movielens" | "lightgcn" | "csv" | "synthetic".

    "lightgcn" returns (train, test); "synthetic" ignores `path` and returns `generate()`.
    """
    if format == "synthetic":
        return generate()
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if path is None:
        raise ValueError(f"format {format!r} needs a path")
    loaders = {"movielens": load_movielens, "lightgcn": load_lightgcn, "csv": load_csv}
    return loaders[format](path)


def _first_line(path: Path) -> str:
    with path.open(encoding="latin-1") as f:
        return f.readline().rstrip("\r\n")


def _read_csv(
    path: Path,
    *,
    delimiter: str = ",",
    column_names: list[str] | None = None,
    column_types: dict[str, pa.DataType] | None = None,
    include_columns: list[str] | None = None,
) -> pa.Table:
    """pyarrow CSV read (empty strings and "NA" are null) with errors that name the file."""
    try:
        return pv.read_csv(
            path,
            read_options=pv.ReadOptions(column_names=column_names),
            parse_options=pv.ParseOptions(delimiter=delimiter),
            convert_options=pv.ConvertOptions(
                column_types=column_types or {},
                strings_can_be_null=True,
                include_columns=include_columns or [],
            ),
        )
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read CSV: {e}") from e


def _check_columns(table: pa.Table, required: Sequence[str], path: Path) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {table.column_names}")


def _check_no_nulls(table: pa.Table, cols: Sequence[str], path: Path) -> None:
    for c in cols:
        nulls = table.column(c).null_count
        if nulls:
            raise ValueError(f"{path}: column {c!r} has {nulls} empty value(s)")


def _cast(col: pa.ChunkedArray, to: pa.DataType, name: str, path: Path) -> pa.ChunkedArray:
    try:
        return col.cast(to)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: column {name!r} cannot be read as {to}: {e}") from e


def _seconds(col: pa.ChunkedArray, name: str, path: Path) -> pa.ChunkedArray:
    """A ts column as float64 Unix seconds (numeric as is; timestamp types converted)."""
    if pa.types.is_timestamp(col.type):
        per_second = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[col.type.unit]
        return pc.divide(col.cast(pa.int64()).cast(pa.float64()), per_second)
    return _cast(col, pa.float64(), name, path)
