"""User profiles (weights, sequence, decayed tags) and the item catalogue."""

from __future__ import annotations

import numpy as np
import pytest

from rec.catalog import Catalog, ItemMeta
from rec.config import ProfileConfig
from rec.events import event_record
from rec.profile import ProfileStore, event_weight

CONFIG = ProfileConfig()
HALF_LIFE = 1000.0
ITEMS = [f"i{n}" for n in range(6)]


def ev(
    item: str, type_: str = "view", ts: float = 0.0, value: float | None = None, user: str = "u"
) -> dict:
    return event_record(user_id=user, item_id=item, type=type_, ts=ts, value=value)


def store(**overrides) -> ProfileStore:
    return ProfileStore(ProfileConfig(tag_half_life_s=HALF_LIFE, **overrides))


def apply_all(
    s: ProfileStore,
    events: list[dict],
    meta: ItemMeta | None = None,
) -> None:
    for r in events:
        s.apply_event(r, meta)


# ---------------------------------------------------------------------------------------------
# event weights


@pytest.mark.parametrize(
    ("type_", "weight"),
    [
        ("view", 1.0),
        ("click", 2.0),
        ("add_to_cart", 3.0),
        ("purchase", 4.0),
        ("like", 3.0),
        ("share", 3.0),
        ("skip", -1.0),
        ("dislike", -2.0),
    ],
)
def test_event_weight_per_type(type_: str, weight: float) -> None:
    assert event_weight(type_, None, CONFIG) == weight


@pytest.mark.parametrize(
    ("value", "weight"),
    [
        (5, 2.0),
        (4, 1.0),
        (3, 0.25),
        (2, -1.0),
        (1, -2.0),
        (10, 2.0),
        (-4, -2.0),
        (None, 0.25),
        (3.5, 0.5),
    ],
)
def test_rating_weight_is_centred_and_clipped(value, weight: float) -> None:
    assert event_weight("rating", value, CONFIG) == pytest.approx(weight)


def test_unknown_type_weighs_one_and_config_overrides_apply() -> None:
    assert event_weight("bookmark", None, CONFIG) == 1.0
    custom = ProfileConfig(type_weights={"view": 0.5}, rating_center=2.0)
    assert event_weight("view", None, custom) == 0.5
    assert event_weight("click", None, custom) == 1.0
    assert event_weight("rating", 3, custom) == 1.0


# ---------------------------------------------------------------------------------------------
# sequence, items, counts


def test_recent_sequence_keeps_order_and_weights() -> None:
    s = store()
    apply_all(s, [ev("i0", "view", 1), ev("i1", "purchase", 2), ev("i0", "skip", 3)])
    view = s.view("u")
    assert view.known
    assert view.recent == (("i0", 1.0, 1.0), ("i1", 4.0, 2.0), ("i0", -1.0, 3.0))
    assert view.seen == frozenset({"i0", "i1"})
    assert view.last_ts == 3.0


def test_recent_is_capped_at_max_recent_newest_kept() -> None:
    s = store(max_recent=3)
    apply_all(s, [ev(f"x{n}", ts=n) for n in range(5)])
    view = s.view("u")
    assert [r[0] for r in view.recent] == ["x2", "x3", "x4"]
    assert view.seen == frozenset(f"x{n}" for n in range(5))  # every touched item stays seen
    assert [r[0] for r in s.view("u", n_recent=2).recent] == ["x3", "x4"]


def test_item_weights_accumulate() -> None:
    s = store()
    apply_all(
        s, [ev("i0", "view"), ev("i0", "click"), ev("i1", "dislike"), ev("i1", "rating", value=5)]
    )
    assert s.users.get("u").items == {"i0": 3.0, "i1": 0.0}


def test_counts_per_type() -> None:
    s = store()
    apply_all(
        s, [ev("i0", "view"), ev("i1", "view"), ev("i1", "click"), ev("i2", "rating", value=1)]
    )
    view = s.view("u")
    assert view.counts == {"view": 2, "click": 1, "rating": 1}
    assert view.n_events == 4


def test_last_ts_is_the_newest_even_out_of_order() -> None:
    s = store()
    apply_all(s, [ev("i0", ts=10), ev("i1", ts=5)])
    assert s.view("u").last_ts == 10.0


# ---------------------------------------------------------------------------------------------
# tags


def test_tag_weight_halves_after_one_half_life() -> None:
    s = store()
    apply_all(s, [ev("i0", "click", ts=100.0)], meta=ItemMeta(category="c", tags=("t",)))
    assert s.view("u").tags == {"c": 2.0, "t": 2.0}  # read at the last event
    at = s.view("u", now=100.0 + HALF_LIFE).tags
    assert at == pytest.approx({"c": 1.0, "t": 1.0}, rel=1e-12)
    at = s.view("u", now=100.0 + 3 * HALF_LIFE).tags
    assert at == pytest.approx({"c": 0.25, "t": 0.25}, rel=1e-12)


def test_tag_weight_decays_before_adding_new_events() -> None:
    s = store()
    meta = ItemMeta(category="c")
    apply_all(s, [ev("i0", "click", ts=0.0), ev("i1", "view", ts=HALF_LIFE)], meta=meta)
    assert s.view("u").tags == pytest.approx({"c": 2.0 / 2 + 1.0}, rel=1e-12)
    apply_all(s, [ev("i2", "dislike", ts=2 * HALF_LIFE)], meta=meta)
    assert s.view("u").tags == pytest.approx({"c": 2.0 / 4 + 0.5 - 2.0}, rel=1e-12)


def test_at_most_ten_tags_strongest_first() -> None:
    s = store()
    for n in range(12):
        meta = ItemMeta(category=f"c{n}")
        s.apply_event(ev(f"x{n}", "view", ts=0.0), meta)
        for _ in range(n):  # c<n> gets weight n + 1
            s.apply_event(ev(f"x{n}", "view", ts=0.0), meta)
    tags = s.view("u").tags
    assert list(tags) == [f"c{n}" for n in range(11, 1, -1)]
    assert tags["c11"] == 12.0


def test_items_without_meta_or_empty_tags_add_no_tags() -> None:
    s = store()
    s.apply_event(ev("i0"), None)
    s.apply_event(ev("i1"), ItemMeta(category=None, tags=("", "t")))
    assert s.view("u").tags == {"t": 1.0}


# ---------------------------------------------------------------------------------------------
# user vector


HISTORY = [
    ev("i0", "view"),
    ev("i1", "purchase"),
    ev("i2", "dislike"),
    ev("i3", "view"),
    ev("i3", "skip"),
    ev("i4", "view"),
    ev("i4", "view"),
    ev("i5", "rating", value=1),
    ev("unknown", "click"),
]
# i3 nets 0 (neither), i5 rated 1 is disliked.
LIKED, DISLIKED = {"i0", "i1", "i4", "unknown"}, {"i2", "i5"}


def test_view_splits_items_into_liked_and_disliked() -> None:
    """The recall stage folds the user vector in from these (+1 liked, -0.5 disliked)."""
    s = store()
    apply_all(s, HISTORY)
    view = s.view("u")
    assert view.liked == LIKED and view.disliked == DISLIKED
    assert view.seen == LIKED | DISLIKED | {"i3"}


def test_unknown_user_view() -> None:
    view = store().view("nobody")
    assert not view.known
    assert view.recent == () and view.seen == frozenset() and not view.liked
    assert view.tags == {} and view.counts == {} and view.n_events == 0


def test_forget_removes_only_that_user() -> None:
    s = store()
    apply_all(s, [ev("i0", user="a"), ev("i1", user="b")])
    assert len(s) == 2
    assert s.forget("a") is True
    assert s.forget("a") is False
    assert not s.view("a").known
    assert s.view("b").known and len(s) == 1


def test_profiles_are_a_pure_function_of_the_records() -> None:
    a, b = store(), store()
    apply_all(a, HISTORY, meta=ItemMeta(category="c"))
    apply_all(b, HISTORY, meta=ItemMeta(category="c"))
    va, vb = a.view("u"), b.view("u")
    assert va == vb


# ---------------------------------------------------------------------------------------------
# catalogue


def test_ensure_assigns_dense_indices_once() -> None:
    cat = Catalog()
    assert [cat.ensure(i) for i in ["a", "b", "a", "c", "b"]] == [0, 1, 0, 2, 1]
    assert cat.ids == ["a", "b", "c"]
    assert cat.index == {"a": 0, "b": 1, "c": 2}
    assert len(cat) == 3


def test_ensure_records_the_first_ts_only() -> None:
    cat = Catalog()
    cat.ensure("a")
    assert cat.meta["a"].first_ts is None
    cat.ensure("a", ts=5.0)
    cat.ensure("a", ts=9.0)
    assert cat.meta["a"].first_ts == 5.0


def test_from_ids_keeps_order() -> None:
    cat = Catalog.from_ids(["z", "y", "x"])
    assert cat.ids == ["z", "y", "x"] and cat.index["x"] == 2


def test_upsert_sets_metadata_and_undeletes() -> None:
    cat = Catalog.from_ids(["a"])
    assert cat.delete("a") == 0
    assert "a" in cat.deleted
    assert cat.upsert("a", "shoes", ["red"], "Red", ts=3.0) == 0
    assert "a" not in cat.deleted
    assert cat.meta["a"] == ItemMeta(category="shoes", tags=("red",), title="Red", first_ts=3.0)
    assert cat.category("a") == "shoes"
    assert cat.upsert("b", None, [], None, ts=4.0) == 1
    assert cat.category("b") is None


def test_delete_unknown_item_is_remembered() -> None:
    cat = Catalog()
    assert cat.delete("ghost") is None
    assert cat.deleted == {"ghost"}
    assert cat.category("ghost") is None
    assert cat.ensure("ghost") == 0
    assert "ghost" in cat.deleted  # ensure (a new event) does not resurrect it


def test_rebase_puts_model_ids_first_and_keeps_state() -> None:
    cat = Catalog()
    cat.upsert("new1", "c1", ["t"], "New", ts=1.0)
    cat.ensure("b", ts=2.0)
    cat.ensure("gone")
    cat.delete("gone")
    cat.ensure("new2")
    rebased = cat.rebase(["a", "b", "gone"])
    assert rebased.ids == ["a", "b", "gone", "new1", "new2"]
    assert rebased.index == {i: n for n, i in enumerate(rebased.ids)}
    assert rebased.meta["new1"] == ItemMeta("c1", ("t",), "New", 1.0)
    assert rebased.meta["b"].first_ts == 2.0
    assert rebased.meta["a"] == ItemMeta()
    assert rebased.deleted == {"gone"}
    # The old catalogue is untouched.
    assert cat.ids == ["new1", "b", "gone", "new2"]
    rebased.deleted.add("a")
    assert "a" not in cat.deleted


def test_metadata_arrays_follow_every_change() -> None:
    cat = Catalog.from_ids(["a", "b"])
    cat.upsert("a", "shoes", ["red", "sale", "red"], "A", ts=5.0)
    cat.ensure("c", ts=7.0)
    cat.upsert("b", "hats", ["sale"], None, ts=6.0)
    cat.upsert("b", "bags", [], None, ts=9.0)  # a repost replaces category and tags
    cat.set_category("c", "hats")
    idx = np.asarray([0, 1, 2, -1])  # -1: an item this catalogue lacks
    weights = {"red": 1.0, "sale": 0.5, "hats": 2.0, "bags": 0.25}
    np.testing.assert_array_equal(cat.tag_weights(idx, weights), [2.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(cat.category_weights(idx, weights), [0.0, 0.25, 2.0, 0.0])
    codes = cat.category_codes(idx)
    assert codes[2] == cat.code("hats") and codes[3] == cat.code(None) == cat.code("nope")
    np.testing.assert_array_equal(cat.first_seen(idx), [5.0, 6.0, 7.0, np.nan])
    rebased = cat.rebase(["c", "a"])
    np.testing.assert_array_equal(
        rebased.tag_weights(np.asarray([0, 1, 2]), weights), [0.0, 2.5, 0.0]
    )
    np.testing.assert_array_equal(
        rebased.category_codes(np.asarray([0, 1, 2])),
        [rebased.code("hats"), rebased.code("shoes"), rebased.code("bags")],
    )
    cat.upsert("d", None, ["sale", "x", "y", "z", "red"], None, ts=10.0)  # more tags than any
    np.testing.assert_array_equal(cat.tag_weights(np.asarray([3, 0, 1]), weights), [1.5, 2.5, 0.0])
