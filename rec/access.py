"""Who may call what: API keys with scopes, compared in constant time, and a token bucket per
key. The ingress asks `Access.check(key, scope)` on every route that needs one; the answer is
the key's name or an `AccessDenied` carrying the HTTP status (401 no or unknown key, 403 the
key lacks the scope, 429 over its rate, with the seconds to wait).

Scopes: `read` (recommendations, similar items, an item, model versions), `events` (POST
/events, for apps), `catalog` (POST and DELETE /items), `admin` (DELETE /users, retrains,
everything under /admin). An `admin` key holds every scope. Reads need no key (or take any
known one) unless `access.open_reads` is false; an unknown key is refused everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from rec.config import AccessConfig, ApiKey

SCOPES = ("read", "events", "catalog", "admin")
ENV_KEY = "REC_API_KEY"  # sets the admin key (tests, scripts) instead of a generated one
KEY_FILE = "api_key"  # under data_dir, the generated admin key, readable by its owner only
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AccessDenied(Exception):
    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _Bucket:
    """A token bucket: `rate` tokens a second up to `burst`; one request takes one."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Access:
    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self.keys = [(digest(k.key), k) for k in config.keys]
        self.buckets: dict[str, _Bucket] = {}

    def check(self, key: str | None, scope: str) -> str | None:
        """The name of the key allowed `scope` (None: an open read without a key)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        if not key:
            if scope == "read" and self.config.open_reads:
                return None
            raise AccessDenied(401, f"this route needs an X-API-Key header with scope {scope!r}")
        found = self._find(key)
        if found is None:
            raise AccessDenied(401, "X-API-Key is not a known key")
        open_read = scope == "read" and self.config.open_reads  # any known key reads too
        if not open_read and scope not in found.scopes and "admin" not in found.scopes:
            raise AccessDenied(403, f"key {found.name!r} lacks scope {scope!r}")
        self._limit(found)
        return found.name

    def _find(self, key: str) -> ApiKey | None:
        """Every configured key is compared (hmac.compare_digest on SHA-256 digests): how long
        this takes does not tell which key, or how much of one, matched."""
        got, found = digest(key), None
        for want, spec in self.keys:
            if hmac.compare_digest(got, want):
                found = spec
        return found

    def _limit(self, spec: ApiKey) -> None:
        rate = spec.rate_per_s if spec.rate_per_s is not None else self.config.rate_per_s
        if rate is None:
            return
        burst = spec.burst if spec.burst is not None else self.config.burst
        now = time.monotonic()
        bucket = self.buckets.get(spec.name)
        if bucket is None:
            size = max(burst, 1.0)
            bucket = self.buckets[spec.name] = _Bucket(rate, size, size, now)
        wait = bucket.take(now)
        if wait > 0:
            raise AccessDenied(429, f"key {spec.name!r} is over {rate:g} requests/s", wait)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def resolve_keys(config: AccessConfig, data_dir: Path, host: str) -> tuple[AccessConfig, str]:
    """The keys `rec serve` runs with, and where the admin key came from ('config', 'env',
    'generated <path>', 'stored <path>'). Keys in the config win; else REC_API_KEY is the
    admin key; else an admin key generated at first start and kept in data_dir/api_key (mode
    0600). A generated or stored key serves loopback only: binding another address without
    configured keys raises ValueError with what to do."""
    if config.keys:
        return config, "config"
    env = os.environ.get(ENV_KEY)
    if env:
        return config.with_admin(env), "env"
    if host not in LOOPBACK:
        raise ValueError(
            f"serving on {host} needs API keys: set access.keys in the config or {ENV_KEY} in "
            "the environment (a generated key serves loopback only)"
        )
    path = Path(data_dir) / KEY_FILE
    if path.exists():
        return config.with_admin(path.read_text().strip()), f"stored {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return config.with_admin(key), f"generated {path}"
