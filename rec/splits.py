"""Train/test splits of a `Dataset` for offline evaluation, in dense user and item indices.

Four protocols: the given split (`split_full`, LightGCN's train/test files), a global temporal
cut (`split_temporal`), leave-last-out per user (`split_leave_last_out`) and the prequential
replay stream (`split_prequential`). Every split shares one user and one item vocabulary between
its train and test side, so index `u` means the same user on both sides.

Two notions of a "good" event:
- positive: `event_weight > 0` under the default `ProfileConfig` (what the rec profile folds in);
  train matrices are built from positive events;
- relevant: what a test set counts as a hit. Positive, except ratings, which are relevant only
  at `value >= RELEVANT_RATING` (3.5, the usual MovieLens threshold: a 3 is lukewarm even though
  its event weight is slightly positive).
A test pair the user already interacted with in train is never relevant: the evaluated models
exclude train items from their lists, so such a pair could not be hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from rec.config import ProfileConfig
from rec.data import Dataset
from rec.events import event_record
from rec.profile import event_weight

RELEVANT_RATING = 3.5


@dataclass
class Interactions:
    """One side of a split: events in ts order, ids replaced by indices into shared vocabularies."""

    user_ids: list[str]
    item_ids: list[str]
    users: np.ndarray  # int64 index into user_ids
    items: np.ndarray  # int64 index into item_ids
    ts: np.ndarray  # float64
    types: list[str] | np.ndarray
    values: np.ndarray  # float64, nan when the event has no value
    ordered: bool = True  # ts is time (see `rec.data.Dataset.ordered`)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def weights(self) -> np.ndarray:
        """`event_weight` of every event, evaluated once per distinct (type, value)."""
        types = np.asarray(self.types, dtype=object)
        out = np.empty(len(types))
        config = ProfileConfig()
        for type_ in set(types.tolist()):
            mask = types == type_
            distinct, inverse = np.unique(self.values[mask], return_inverse=True)
            per_value = [
                event_weight(type_, None if np.isnan(v) else float(v), config) for v in distinct
            ]
            out[mask] = np.asarray(per_value)[inverse]
        return out

    def positive(self) -> np.ndarray:
        """Mask of the positive events (event weight > 0)."""
        return self.weights > 0

    def relevant(self) -> np.ndarray:
        """Mask of the relevant events: positive, and ratings only at >= RELEVANT_RATING."""
        is_rating = np.asarray(self.types, dtype=object) == "rating"
        return np.where(is_rating, self.values >= RELEVANT_RATING, self.positive())

    def matrix(self, binary: bool = True) -> sp.csr_matrix:
        """Users × items float32 matrix of the positive events: 1 where any (binary), else the
        summed event weights."""
        pos = self.positive()
        data = np.ones(pos.sum(), np.float32) if binary else self.weights[pos].astype(np.float32)
        m = _csr(data, self.users[pos], self.items[pos], (self.n_users, self.n_items))
        if binary:
            m.data[:] = 1.0
        return m

    def seen(self) -> sp.csr_matrix:
        """Users × items binary matrix of every interaction, positive or not: what a model must
        not recommend again."""
        m = _csr(
            np.ones(len(self), np.float32), self.users, self.items, (self.n_users, self.n_items)
        )
        m.data[:] = 1.0
        return m

    def to_records(self) -> list[dict]:
        """The events as `rec.events.event_record` dicts with string ids, in ts order."""
        return [
            event_record(
                user_id=self.user_ids[u],
                item_id=self.item_ids[i],
                type=t,
                value=None if np.isnan(v) else float(v),
                ts=ts,
            )
            for u, i, t, v, ts in zip(
                self.users.tolist(),
                self.items.tolist(),
                list(self.types),
                self.values.tolist(),
                self.ts.tolist(),
                strict=True,
            )
        ]


@dataclass
class Split:
    """A train and a test side over shared vocabularies, and the users to evaluate."""

    name: str
    protocol: str
    train: Interactions
    test: Interactions
    test_users: np.ndarray  # users with >= 1 relevant test item and >= 1 train interaction

    def relevant(self) -> list[set[int]]:
        """The relevant test items of each test user (aligned with `test_users`)."""
        users, items = _relevant_pairs(self.train, self.test)
        lo = np.searchsorted(users, self.test_users, side="left")
        hi = np.searchsorted(users, self.test_users, side="right")
        return [set(items[a:b].tolist()) for a, b in zip(lo, hi, strict=True)]


def split_full(train: Dataset, test: Dataset) -> Split:
    """The given split (LightGCN's train.txt/test.txt). Vocabularies cover both sides, so test
    items never seen in train stay in the catalogue and in the relevant sets (as misses)."""
    users = _vocab(train.events["user_id"], test.events["user_id"])
    items = _vocab(train.events["item_id"], test.events["item_id"])
    name = train.name.removesuffix("-train")
    return _split(
        name,
        "full",
        *_pair(train.events, test.events, users, items, train.ordered and test.ordered),
    )


def split_temporal(ds: Dataset, test_fraction: float = 0.2) -> Split:
    """Global time cut at the (1 - f) quantile of ts: train = events at or before it, test =
    events after it whose user and item occur in train (the vocabularies are train's)."""
    train, test = _cut(ds.events, test_fraction)
    users, items = _vocab(train["user_id"]), _vocab(train["item_id"])
    return _split(ds.name, "temporal", *_pair(train, test, users, items, ds.ordered))


def split_leave_last_out(ds: Dataset) -> Split:
    """Each user's last event (max ts; ties: the last in file order) is the test event; users
    with fewer than 2 events keep their one event in train and are not tested. Test events on
    items unknown to train are dropped."""
    events = ds.events  # sorted by ts, stable: the last row of a user is their last event
    codes = pc.index_in(events["user_id"], value_set=_vocab(events["user_id"])).to_numpy()
    n_rows = len(codes)
    _, first_from_end, counts = np.unique(codes[::-1], return_index=True, return_counts=True)
    last = n_rows - 1 - first_from_end[counts >= 2]
    is_test = np.zeros(n_rows, dtype=bool)
    is_test[last] = True
    train, test = events.filter(pa.array(~is_test)), events.filter(pa.array(is_test))
    users, items = _vocab(train["user_id"]), _vocab(train["item_id"])
    return _split(ds.name, "leave-last-out", *_pair(train, test, users, items, ds.ordered))


def split_prequential(ds: Dataset, test_fraction: float = 0.2) -> Split:
    """The temporal cut, but test keeps every event after it, in time order: the stream to
    replay. Vocabularies extend past train's (train ids first) to cover new users and items."""
    train, test = _cut(ds.events, test_fraction)
    users = _vocab(train["user_id"], test["user_id"])
    items = _vocab(train["item_id"], test["item_id"])
    return _split(ds.name, "prequential", *_pair(train, test, users, items, ds.ordered))


def _cut(events: pa.Table, test_fraction: float) -> tuple[pa.Table, pa.Table]:
    """(events with ts <= the (1 - f) ts quantile, events after it)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if events.num_rows == 0:
        raise ValueError("cannot split a data set without events")
    ts = events["ts"].to_numpy()
    after = ts > np.quantile(ts, 1.0 - test_fraction)
    return events.filter(pa.array(~after)), events.filter(pa.array(after))


def _vocab(*columns: pa.ChunkedArray) -> pa.Array:
    """Distinct ids in order of first appearance, earlier columns first."""
    chunks = [chunk for col in columns for chunk in col.chunks]
    return pc.unique(pa.chunked_array(chunks, pa.string()))


def _pair(
    train: pa.Table, test: pa.Table, users: pa.Array, items: pa.Array, ordered: bool
) -> tuple[Interactions, Interactions]:
    """Both sides encoded against the same vocabularies (the same list objects)."""
    user_ids, item_ids = users.to_pylist(), items.to_pylist()
    return (
        _encode(train, users, items, user_ids, item_ids, ordered),
        _encode(test, users, items, user_ids, item_ids, ordered),
    )


def _encode(
    table: pa.Table,
    users: pa.Array,
    items: pa.Array,
    user_ids: list[str],
    item_ids: list[str],
    ordered: bool,
) -> Interactions:
    """Interactions of the rows whose user and item are in the vocabularies (others dropped)."""
    u = pc.index_in(table["user_id"], value_set=users)
    i = pc.index_in(table["item_id"], value_set=items)
    known = pc.and_(pc.is_valid(u), pc.is_valid(i))
    table, u, i = table.filter(known), u.filter(known), i.filter(known)
    return Interactions(
        user_ids=user_ids,
        item_ids=item_ids,
        users=u.to_numpy().astype(np.int64),
        items=i.to_numpy().astype(np.int64),
        ts=table["ts"].to_numpy().astype(np.float64),
        types=table["type"].to_numpy(),
        values=pc.fill_null(table["value"], np.nan).to_numpy().astype(np.float64),
        ordered=ordered,
    )


def _csr(
    data: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """CSR with duplicates summed and indices sorted."""
    m = sp.csr_matrix((data, (rows, cols)), shape=shape)
    m.sum_duplicates()
    return m


def _relevant_pairs(train: Interactions, test: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """Distinct relevant (user, item) test pairs, sorted by user then item: the pair is not
    in train and the user has at least one train interaction."""
    n_items = test.n_items
    rel = test.relevant()
    keys = np.unique(test.users[rel] * n_items + test.items[rel])
    train_keys = np.unique(train.users * n_items + train.items)
    has_train = np.bincount(train.users, minlength=train.n_users) > 0
    keys = keys[~np.isin(keys, train_keys, assume_unique=True) & has_train[keys // n_items]]
    return keys // n_items, keys % n_items


def _split(name: str, protocol: str, train: Interactions, test: Interactions) -> Split:
    users, _ = _relevant_pairs(train, test)
    return Split(name, protocol, train, test, test_users=np.unique(users))
