"""The log's head offset, shared through one small memory-mapped file next to the log, with
whom each recent record concerns.

Read-your-writes makes every request ask "is there a committed record I have not applied?".
Asking the EventLog actor costs an actor call (milliseconds of CPU on both ends); replicas on
the log's machine read the answer from this file instead, in nanoseconds, and read records
only when the head has moved past what they applied (from the records ring below).

The head published is the offset just past the newest record serving applies: a commit of
impressions alone (what answers showed, appended for training every 0.5 s by each replica)
does not move it, so it costs the followers no read; they read those records with the next
event's.

Read-your-writes is per user: a request must see its own user's acknowledged events and the
catalogue's changes, not every other user's latest click (those change it through shared
counts, which may lag by a moment). So the file also keeps, for the last RING offsets, whom
each record concerns (a user's key, EVERYONE for catalogue records, NOBODY for impressions):
a request whose user has nothing among the unapplied records does not wait for the log read.

The records themselves are shared too (`RECENT`, a byte ring of the newest committed batches,
pickled as the actor's `read` returns them): a replica on the log's machine applies what it has
not applied from there, with no actor call. With a call per follower per event, the log actor's
CPU grew with the number of replicas (about 1.4 ms per call here); a follower falls back to the
call only when the ring cannot serve the range (lapped, scrubbed by `forget_user`, another
machine, or a batch too large for it).

The actor writes a batch into the ring, marks its owners and then publishes the new head,
before acknowledging it, so a write that a client saw acknowledged is always visible here. The
head file holds [head, nonce, marked, ring...]: the nonce changes with every actor incarnation
and comes back over RPC too, so a replica maps the files only if they are the very files its
log writes (same machine), and falls back to the actor call when the nonce stops matching (the
actor restarted)."""

from __future__ import annotations

import os
import pickle
import secrets
import socket
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rec.events import KIND_EVENT, KIND_IMPRESSION, KIND_USER_DELETE

HEAD_FILE = "HEAD"
RECENT_FILE = "RECENT"
RECENT_BYTES = 16 << 20  # the records ring's data: about 100k events of ~150 bytes
RECENT_HEADER = 1  # written: bytes ever reserved, the end of the newest batch's entry
_ENTRY = struct.Struct("<qqq")  # a batch's first offset, its record count, its payload's bytes
PAGE = 4096
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
        self._recent = _RecentMaps(Path(log_dir) / RECENT_FILE, "r+")
        if self._recent.created:  # all zeros: no entry written yet
            self._recent.index[:] = -1
        else:  # nothing an earlier incarnation wrote stays readable, or in the file
            self.forget_recent()
        self._map[1] = self.nonce

    def remember(self, records: list[dict]) -> None:
        """Put a committed batch (the dicts `read` returns, offsets consecutive) in the records
        ring, before `publish` makes it visible. A batch over half the ring is left out: its
        offsets' slots are cleared, and followers read it from the actor."""
        first, count = records[0]["offset"], len(records)
        recent = self._recent
        payload = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
        size = _ENTRY.size + len(payload)
        slots = np.arange(first, first + count) % RING
        if size > RECENT_BYTES // 2 or count > RING:
            recent.index[slots] = -1
            return
        pos = int(recent.header[0])
        recent.header[0] = pos + size  # reserved first: a reader of older bytes sees them gone
        recent.put(pos, _ENTRY.pack(first, count, len(payload)) + payload)
        recent.index[slots] = pos

    def forget_recent(self) -> None:
        """Make every record in the ring unreadable and wipe it (a user was forgotten, or the
        actor restarted: their events must not stay in this file); followers read from the
        actor until new batches come."""
        recent = self._recent
        recent.header[0] = int(recent.header[0]) + RECENT_BYTES  # every entry counts as lapped
        recent.index[:] = -1
        recent.data[:] = 0

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
        self._recent = _RecentMaps(Path(info["path"]).with_name(RECENT_FILE), "r")

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

    def recent(self, start: int, head: int) -> list[dict] | None:
        """The committed records at offsets [start, head) from the records ring, as the actor's
        `read` returns them; None when the ring cannot serve them all (lapped, even while
        being copied here; left out; wiped): then ask the actor."""
        if head <= start:
            return []
        if head - start > RING:
            return None
        recent = self._recent
        out: list[dict] = []
        offset = start
        while offset < head:
            pos = int(recent.index[offset % RING])
            if pos < 0:
                return None
            first, count, nbytes = _ENTRY.unpack(recent.get(pos, _ENTRY.size))
            if not first <= offset < first + count or not 0 < nbytes <= RECENT_BYTES // 2:
                return None  # the slot belongs to another lap of the index
            payload = recent.get(pos + _ENTRY.size, nbytes)
            if int(recent.header[0]) - RECENT_BYTES > pos:
                return None  # overwritten (or wiped) while it was being copied
            out.extend(pickle.loads(payload)[offset - first :])
            offset = first + count
        return out


def _fault_in(*maps: np.memmap) -> None:
    """Map every page now: the ring's fixed size is in this process's resident memory from
    the start, not faulted in while the ring first fills (growth a long run cannot tell from
    a leak)."""
    for m in maps:
        m[:: PAGE // m.itemsize].sum()


class _RecentMaps:
    """The records ring's file: [written] and, per offset slot, the position of the
    entry holding it (int64), then RECENT_BYTES of entries `first | count | nbytes | payload`
    at position % RECENT_BYTES, wrapping around the end."""

    def __init__(self, path: Path, mode: str) -> None:
        words = RECENT_HEADER + RING
        size = 8 * words + RECENT_BYTES
        self.created = mode == "r+" and (not path.exists() or path.stat().st_size != size)
        if self.created:  # zeros, and sparse until written
            with open(path, "wb") as fh:  # never replaced afterwards: readers map this inode
                fh.truncate(size)
        words_map = np.memmap(path, np.int64, mode=mode, shape=(words,))
        self.header = words_map[:RECENT_HEADER]
        self.index = words_map[RECENT_HEADER:]
        self.data = np.memmap(path, np.uint8, mode=mode, offset=8 * words, shape=(RECENT_BYTES,))
        _fault_in(words_map, self.data)

    def put(self, pos: int, blob: bytes) -> None:
        start = pos % RECENT_BYTES
        head = min(len(blob), RECENT_BYTES - start)
        view = np.frombuffer(blob, np.uint8)
        self.data[start : start + head] = view[:head]
        self.data[: len(blob) - head] = view[head:]

    def get(self, pos: int, n: int) -> bytes:
        start = pos % RECENT_BYTES
        head = min(n, RECENT_BYTES - start)
        if head == n:
            return self.data[start : start + n].tobytes()
        return self.data[start:].tobytes() + self.data[: n - head].tobytes()
