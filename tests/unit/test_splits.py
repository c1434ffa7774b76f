"""Tests for rec.splits: exact train/test contents, vocabularies and relevant sets per protocol."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rec.data import EVENTS_SCHEMA, ITEMS_SCHEMA, Dataset, load_lightgcn
from rec.events import event_record
from rec.splits import (
    split_full,
    split_leave_last_out,
    split_prequential,
    split_temporal,
)


def dataset(rows: list[tuple]) -> Dataset:
    """A Dataset from (user, item, type, value, ts) rows, given in ts order."""
    columns = list(zip(*rows, strict=True))
    return Dataset(
        events=pa.table([list(c) for c in columns], schema=EVENTS_SCHEMA),
        items=ITEMS_SCHEMA.empty_table(),
        name="tiny",
    )


def timeline(b_rating: float = 3.0) -> Dataset:
    """Ten events at ts 1..10; a 0.5 split cuts between ts 5 and 6."""
    return dataset(
        [
            ("a", "x", "click", None, 1.0),
            ("a", "y", "rating", 4.0, 2.0),
            ("b", "x", "view", None, 3.0),
            ("b", "y", "rating", 2.0, 4.0),  # negative: seen, but not in the train matrix
            ("c", "z", "click", None, 5.0),
            ("a", "z", "rating", 5.0, 6.0),  # relevant
            ("b", "z", "rating", b_rating, 7.0),  # relevant only at >= 3.5
            ("d", "x", "click", None, 8.0),  # user unknown to train
            ("a", "w", "click", None, 9.0),  # item unknown to train
            ("b", "y", "click", None, 10.0),  # pair already in train
        ]
    )


def test_temporal_cuts_at_the_time_quantile_and_keeps_train_vocabularies() -> None:
    split = split_temporal(timeline(), test_fraction=0.5)
    train, test = split.train, split.test
    assert (split.name, split.protocol) == ("tiny", "temporal")
    assert train.user_ids == ["a", "b", "c"] and train.item_ids == ["x", "y", "z"]
    assert test.user_ids is train.user_ids and test.item_ids is train.item_ids
    assert train.users.tolist() == [0, 0, 1, 1, 2] and train.items.tolist() == [0, 1, 0, 1, 2]
    assert train.ts.tolist() == [1, 2, 3, 4, 5]
    # d's event and the event on w are dropped; the rest of the test side stays, in ts order.
    assert test.users.tolist() == [0, 1, 1] and test.items.tolist() == [2, 2, 1]
    assert test.ts.tolist() == [6, 7, 10]
    assert split.test_users.tolist() == [0]
    assert split.relevant() == [{2}]


def test_rating_relevance_threshold_is_3_5() -> None:
    split = split_temporal(timeline(b_rating=3.5), test_fraction=0.5)
    assert split.test_users.tolist() == [0, 1]
    assert split.relevant() == [{2}, {2}]


def test_matrices_positive_binary_weighted_and_seen() -> None:
    train = split_temporal(timeline(), test_fraction=0.5).train
    assert train.matrix().toarray().tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    # Weights: click 2, rating 4 -> 4 - 3 = 1, view 1; the rating of 2 is negative.
    assert train.matrix(binary=False).toarray().tolist() == [[2, 1, 0], [1, 0, 0], [0, 0, 2]]
    assert train.seen().toarray().tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_to_records_are_event_records_in_ts_order() -> None:
    records = split_temporal(timeline(), test_fraction=0.5).train.to_records()
    assert [r["ts"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0] == event_record(user_id="a", item_id="x", type="click", ts=1.0)
    assert records[1] == event_record(user_id="a", item_id="y", type="rating", value=4.0, ts=2.0)


def test_leave_last_out_takes_each_users_last_event_with_ties_to_file_order() -> None:
    split = split_leave_last_out(
        dataset(
            [
                ("a", "x", "click", None, 1.0),
                ("a", "y", "click", None, 2.0),
                ("d", "x", "click", None, 2.0),
                ("a", "z", "click", None, 3.0),  # a's last
                ("b", "x", "click", None, 4.0),
                ("b", "y", "click", None, 5.0),
                ("b", "z", "click", None, 5.0),  # b's last: same ts, later in the file
                ("c", "z", "click", None, 6.0),  # c's only event stays in train
                ("d", "w", "click", None, 7.0),  # d's last, on an item unknown to train
            ]
        )
    )
    train, test = split.train, split.test
    assert split.protocol == "leave-last-out"
    assert train.user_ids == ["a", "d", "b", "c"] and train.item_ids == ["x", "y", "z"]
    pairs = list(zip(train.users.tolist(), train.items.tolist(), strict=True))
    assert pairs == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 2)]
    assert test.users.tolist() == [0, 2] and test.items.tolist() == [2, 2]
    assert split.test_users.tolist() == [0, 2]
    assert split.relevant() == [{2}, {2}]


def test_prequential_keeps_every_later_event_and_extends_vocabularies() -> None:
    split = split_prequential(timeline(), test_fraction=0.5)
    train, test = split.train, split.test
    assert split.protocol == "prequential"
    assert train.user_ids == ["a", "b", "c", "d"] and train.item_ids == ["x", "y", "z", "w"]
    assert test.user_ids is train.user_ids and train.n_items == 4
    assert train.users.tolist() == [0, 0, 1, 1, 2]
    assert test.users.tolist() == [0, 1, 3, 0, 1] and test.items.tolist() == [2, 2, 0, 3, 1]
    assert test.ts.tolist() == [6, 7, 8, 9, 10]
    assert train.matrix().shape == (4, 4)
    # d has no train history; b's events are a 3-star rating and a pair seen in train.
    assert split.test_users.tolist() == [0]
    assert split.relevant() == [{2, 3}]


def test_full_split_from_lightgcn_files(tmp_path) -> None:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "train.txt").write_text("0 0 1\n1 1 2\n")
    (folder / "test.txt").write_text("0 2\n1 0\n2 1\n")  # user 2 has no train history
    split = split_full(*load_lightgcn(folder))
    assert (split.name, split.protocol) == ("toy", "full")
    assert split.train.user_ids == ["0", "1", "2"] and split.train.item_ids == ["0", "1", "2"]
    assert split.test.user_ids is split.train.user_ids
    assert split.test_users.tolist() == [0, 1]
    assert split.relevant() == [{2}, {0}]
    # each line lists items by id, not time: training must not treat "last" as "latest"
    assert not split.train.ordered and not split.test.ordered
    assert split_temporal(timeline()).train.ordered


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        split_temporal(timeline(), fraction)


def test_relevant_follows_a_sampled_test_user_order() -> None:
    split = split_temporal(timeline(b_rating=4.0), test_fraction=0.5)
    split.test_users = np.array([1])
    assert split.relevant() == [{2}]
