"""The log's head offset, shared through one small memory-mapped file next to the log.

Read-your-writes makes every request ask "is there a committed record I have not applied?".
Asking the EventLog actor costs an actor call (milliseconds of CPU on both ends); replicas on
the log's machine read the answer from this file instead, in nanoseconds, and call the actor
only when the head has moved past what they applied.

The head published is the offset just past the newest record serving applies: a commit of
impressions alone (what answers showed, appended for training every 0.1 s by each replica)
does not move it, so it costs the followers no read; they read those records with the next
event's.

The actor publishes the new head after a commit and before acknowledging it, so a write that a
client saw acknowledged is always visible here. The file holds [head, nonce]: the nonce changes
with every actor incarnation and comes back over RPC too, so a replica maps the file only if
it is the very file its log writes (same machine), and falls back to the actor call when the
nonce stops matching (the actor restarted)."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import numpy as np

HEAD_FILE = "HEAD"


def machine_id() -> str:
    """This machine (host name and kernel boot id): files are shared only within one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class HeadWriter:
    """The EventLog actor's side: owns the file, publishes the head offset."""

    def __init__(self, log_dir: str | Path) -> None:
        self.path = Path(log_dir) / HEAD_FILE
        if not self.path.exists() or self.path.stat().st_size != 16:
            self.path.write_bytes(bytes(16))  # never replaced afterwards: readers map this inode
        self._map = np.memmap(self.path, np.int64, mode="r+", shape=(2,))
        self.nonce = secrets.randbits(62)
        self._map[1] = self.nonce

    def publish(self, head: int) -> None:
        self._map[0] = head  # one aligned 8-byte store; no fsync: this is a hint, not data

    def info(self) -> dict:
        return {"path": str(self.path), "nonce": self.nonce, "machine": machine_id(),
                "pid": os.getpid()}


class HeadReader:
    """A replica's side: `head()` is the log's next offset, or None when this replica cannot
    see the file (another machine, or the actor restarted: ask the actor)."""

    def __init__(self, info: dict) -> None:
        self.nonce = int(info["nonce"])
        self._map = np.memmap(info["path"], np.int64, mode="r", shape=(2,))
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
