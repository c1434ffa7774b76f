"""Per-user state, updated on every event: the recent sequence, every item touched with its
summed weight, interest tags with time decay and counts per type.

A profile is a pure view of the log: replaying the same records gives the same profiles. It
holds nothing of a model: the user vector is folded in by the recall stage against the item
factors of the model version the request is served with.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from rec.catalog import ItemMeta
from rec.config import ProfileConfig
from rec.rows import LazyRows


def event_weight(type_: str, value: float | None, config: ProfileConfig) -> float:
    """Interaction strength of one event; ratings are centred so a low rating is negative."""
    if type_ == "rating":
        v = 3.0 if value is None else float(value)
        return max(-2.0, min(2.0, v - config.rating_center)) or 0.25
    return config.type_weights.get(type_, 1.0)


@dataclass
class UserProfile:
    user_id: str
    recent: deque = field(default_factory=deque)  # (item_id, weight, ts), newest last
    items: dict[str, float] = field(default_factory=dict)  # every item touched -> summed weight
    tags: dict[str, tuple[float, float]] = field(default_factory=dict)  # tag -> (weight, at ts)
    counts: dict[str, int] = field(default_factory=dict)
    last_ts: float = 0.0


@dataclass(frozen=True)
class ProfileView:
    """What one request needs of a profile: small, immutable, cheap to send between stages."""

    user_id: str
    known: bool
    recent: tuple[tuple[str, float, float], ...]
    seen: frozenset[str]
    liked: frozenset[str]  # items whose summed weight is positive
    disliked: frozenset[str]  # items whose summed weight is negative
    tags: dict[str, float]
    counts: dict[str, int]
    last_ts: float

    @property
    def n_events(self) -> int:
        return sum(self.counts.values())


class ProfileStore:
    """All profiles of the users this process serves (those in a checkpoint built from its
    arrays when read, `rec.rows.LazyRows`), and the log offset they are at.

    Profiles depend on no model version, so a replica keeps one store across its swaps: the
    state it serves and the next version's warming state share it, and each log record
    reaches it once, through whichever state applies it first (`LiveState.apply`)."""

    def __init__(self, config: ProfileConfig) -> None:
        self.config = config
        self.users: LazyRows[UserProfile] = LazyRows()
        self.offset = 0  # next log offset to apply

    def __len__(self) -> int:
        return len(self.users)

    def apply_event(self, record: dict, meta: ItemMeta | None) -> None:
        """Fold one behaviour record into its user's profile."""
        user_id, item_id, ts = record["user_id"], record["item_id"], float(record["ts"])
        p = self.users.writable(user_id)
        if p is None:
            p = self.users.put(user_id, UserProfile(user_id, deque(maxlen=self.config.max_recent)))
        w = event_weight(record["type"], record.get("value"), self.config)
        p.recent.append((item_id, w, ts))
        p.items[item_id] = p.items.get(item_id, 0.0) + w
        p.counts[record["type"]] = p.counts.get(record["type"], 0) + 1
        p.last_ts = max(p.last_ts, ts)
        if meta is not None:
            for tag in (meta.category, *meta.tags):
                if tag:
                    prev_w, prev_ts = p.tags.get(tag, (0.0, ts))
                    p.tags[tag] = (self._decay(prev_w, ts - prev_ts) + w, max(ts, prev_ts))

    def forget(self, user_id: str) -> bool:
        return self.users.pop(user_id)

    def view(self, user_id: str, now: float | None = None, n_recent: int = 50) -> ProfileView:
        """A snapshot of the user's profile."""
        p = self.users.get(user_id)
        if p is None:
            empty = frozenset()
            return ProfileView(user_id, False, (), empty, empty, empty, {}, {}, 0.0)
        at = p.last_ts if now is None else now
        tags = {t: self._decay(w, at - ts) for t, (w, ts) in p.tags.items()}
        top = dict(sorted(tags.items(), key=lambda kv: -kv[1])[:10])
        recent = tuple(list(p.recent)[-n_recent:])
        liked = frozenset(i for i, w in p.items.items() if w > 0)
        disliked = frozenset(i for i, w in p.items.items() if w < 0)
        return ProfileView(
            user_id,
            True,
            recent,
            frozenset(p.items),
            liked,
            disliked,
            top,
            dict(p.counts),
            p.last_ts,
        )

    def _decay(self, weight: float, dt: float) -> float:
        return weight * math.pow(0.5, max(dt, 0.0) / self.config.tag_half_life_s)
