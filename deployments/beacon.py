"""The log's head offset, shared through one small memory-mapped file next to the log, with
whom each recent record concerns.

Read-your-writes makes every request ask "is there a committed record I have not applied?".
Asking the EventLog actor costs an actor call (milliseconds of CPU on both ends); replicas on
the log's machine read the answer from this file instead, in nanoseconds, and call the actor
only when the head has moved past what they applied.

The head published is the offset just past the newest record serving applies: a commit of
impressions alone (what answers showed, appended for training every 0.1 s by each replica)
does not move it, so it costs the followers no read; they read those records with the next
event's.

Read-your-writes is per user: a request must see its own user's acknowledged events and the
catalogue's changes, not every other user's latest click (those change it through shared
counts, which may lag by a moment). So the file also keeps, for the last RING offsets, whom
each record concerns (a user's key, EVERYONE for catalogue records, NOBODY for impressions):
a request whose user has nothing among the unapplied records does not wait for the log read.

The actor marks a batch's owners and then publishes the new head, before acknowledging it, so
a write that a client saw acknowledged is always visible here. The file holds [head, nonce,
marked, ring...]: the nonce changes with every actor incarnation and comes back over RPC too,
so a replica maps the file only if it is the very file its log writes (same machine), and
falls back to the actor call when the nonce stops matching (the actor restarted)."""

from __future__ import annotations

import os
import secrets
import socket
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rec.events import KIND_EVENT, KIND_IMPRESSION, KIND_USER_DELETE

HEAD_FILE = "HEAD"
RING = 1 << 16  # offsets whose owners are kept; a replica further behind than this just reads
HEADER = 3  # head, nonce, marked (the end of the newest batch whose owners are written)
NOBODY = 0  # an impression: serving applies nothing from it
EVERYONE = -1  # a catalogue record: every request must see it


def user_key(user_id: str) -> int:
    """A user's key in the ring, the same in every process (1 .. 2**32; collisions only make
    a request wait for a record that was not its user's)."""
    return zlib.crc32(user_id.encode()) + 1


def owner(record: dict) -> int:
    """Whom a log record concerns: its user (events, user deletions), nobody (impressions) or
    everyone (catalogue changes)."""
    kind = record["kind"]
    if kind in (KIND_EVENT, KIND_USER_DELETE):
        return user_key(record["user_id"])
    return NOBODY if kind == KIND_IMPRESSION else EVERYONE


def machine_id() -> str:
    """This machine (host name and kernel boot id): files are shared only within one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class HeadWriter:
    """The EventLog actor's side: owns the file, marks owners and publishes the head offset."""

    def __init__(self, log_dir: str | Path) -> None:
        self.path = Path(log_dir) / HEAD_FILE
        size = 8 * (HEADER + RING)
        if not self.path.exists() or self.path.stat().st_size != size:
            self.path.write_bytes(bytes(size))  # never replaced afterwards: readers map this inode
        self._map = np.memmap(self.path, np.int64, mode="r+", shape=(HEADER + RING,))
        self._ring = self._map[HEADER:]
        self.nonce = secrets.randbits(62)
        self._map[1] = self.nonce

    def mark(self, first: int, owners: Sequence[int]) -> None:
        """Record whom the records at offsets first, first + 1, ... concern (before `publish`
        makes them visible). `marked` moves first: a reader whose scan it overlapped knows its
        slots may have been overwritten meanwhile."""
        end = first + len(owners)
        self._map[2] = end
        keep = np.asarray(owners[-RING:], np.int64)
        self._ring[np.arange(end - len(keep), end) % RING] = keep

    def publish(self, head: int) -> None:
        self._map[0] = head  # one aligned 8-byte store; no fsync: this is a hint, not data

    def info(self) -> dict:
        return {
            "path": str(self.path),
            "nonce": self.nonce,
            "machine": machine_id(),
            "pid": os.getpid(),
        }


class HeadReader:
    """A replica's side: `head()` is the log's next offset, or None when this replica cannot
    see the file (another machine, or the actor restarted: ask the actor)."""

    def __init__(self, info: dict) -> None:
        self.nonce = int(info["nonce"])
        self._map = np.memmap(info["path"], np.int64, mode="r", shape=(HEADER + RING,))
        self._ring = self._map[HEADER:]
        if int(self._map[1]) != self.nonce:
            raise ValueError("the head file is not the one this log writes")

    @classmethod
    def open(cls, info: dict | None) -> HeadReader | None:
        if not info or info.get("machine") != machine_id():
            return None
        try:
            return cls(info)
        except (OSError, ValueError):
            return None

    def head(self) -> int | None:
        head, nonce = int(self._map[0]), int(self._map[1])
        return head if nonce == self.nonce else None

    def concerns(self, user_id: str, start: int, head: int) -> bool:
        """Whether any record at offsets [start, head) concerns `user_id` or everyone; True
        when the ring cannot tell (too far behind, overwritten meanwhile, actor restarted)."""
        if head - start > RING:
            return True
        slots = self._ring[np.arange(start, head) % RING]
        hit = bool(((slots == user_key(user_id)) | (slots == EVERYONE)).any())
        if int(self._map[2]) - start > RING or int(self._map[1]) != self.nonce:
            return True
        return hit
