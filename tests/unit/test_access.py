"""API keys: scopes, constant-time lookup, rate limits, and where `rec serve` gets its key."""

from __future__ import annotations

import os
import stat

import pytest

from rec.access import KEY_FILE, Access, AccessDenied, resolve_keys
from rec.config import AccessConfig, ApiKey

KEYS = [
    ApiKey(name="ops", key="o" * 20, scopes=["admin"]),
    ApiKey(name="app", key="a" * 20, scopes=["events", "read"]),
    ApiKey(name="sync", key="s" * 20, scopes=["catalog"]),
    ApiKey(name="slow", key="l" * 20, scopes=["read"], rate_per_s=2, burst=3),
]


def denied(access: Access, key: str | None, scope: str) -> AccessDenied:
    with pytest.raises(AccessDenied) as err:
        access.check(key, scope)
    return err.value


def test_each_scope_needs_its_key_and_admin_holds_every_scope() -> None:
    access = Access(AccessConfig(keys=KEYS))
    for scope in ("read", "events", "catalog", "admin"):
        assert access.check("o" * 20, scope) == "ops"
    assert access.check("a" * 20, "events") == "app"
    assert access.check("a" * 20, "read") == "app"
    assert access.check("s" * 20, "catalog") == "sync"
    for key, scope in (("a" * 20, "catalog"), ("a" * 20, "admin"), ("s" * 20, "events")):
        err = denied(access, key, scope)
        assert err.status == 403 and scope in err.detail
    for scope in ("events", "catalog", "admin"):
        assert denied(access, None, scope).status == 401
        assert denied(access, "", scope).status == 401
    assert denied(access, "x" * 20, "read").status == 401  # an unknown key is not a read key
    assert denied(access, "o" * 19, "admin").status == 401  # nor is a prefix of one
    with pytest.raises(ValueError):
        access.check("o" * 20, "write")


def test_reads_are_open_or_need_a_read_key_by_configuration() -> None:
    open_ = Access(AccessConfig(keys=KEYS))
    assert open_.check(None, "read") is None
    assert open_.check("s" * 20, "read") == "sync"  # any known key reads
    closed = Access(AccessConfig(keys=KEYS, open_reads=False))
    assert denied(closed, None, "read").status == 401
    assert closed.check("a" * 20, "read") == "app"
    assert denied(closed, "s" * 20, "read").status == 403


def test_a_key_over_its_rate_gets_429_with_the_wait(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("rec.access.time.monotonic", lambda: now[0])
    access = Access(AccessConfig(keys=KEYS))
    for _ in range(3):  # the burst
        assert access.check("l" * 20, "read") == "slow"
    err = denied(access, "l" * 20, "read")
    assert err.status == 429 and err.retry_after == pytest.approx(0.5)
    now[0] += 0.5  # one token back
    assert access.check("l" * 20, "read") == "slow"
    assert denied(access, "l" * 20, "read").status == 429
    assert access.check("o" * 20, "read") == "ops"  # another key has its own bucket (unlimited)
    limited = Access(AccessConfig(keys=KEYS[:1], rate_per_s=1, burst=1))
    assert limited.check("o" * 20, "admin") == "ops"
    assert denied(limited, "o" * 20, "admin").status == 429


def test_serve_takes_config_keys_then_the_environment_then_a_stored_key(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("REC_API_KEY", raising=False)
    configured = AccessConfig(keys=KEYS)
    assert resolve_keys(configured, tmp_path, "0.0.0.0") == (configured, "config")

    monkeypatch.setenv("REC_API_KEY", "e" * 24)
    got, source = resolve_keys(AccessConfig(), tmp_path, "0.0.0.0")
    assert source == "env" and [(k.key, k.scopes) for k in got.keys] == [("e" * 24, ["admin"])]
    assert not (tmp_path / KEY_FILE).exists()

    monkeypatch.delenv("REC_API_KEY")
    got, source = resolve_keys(AccessConfig(), tmp_path, "127.0.0.1")
    path = tmp_path / KEY_FILE
    assert source == f"generated {path}"
    key = got.keys[0].key
    assert len(key) >= 32 and got.keys[0].scopes == ["admin"]
    assert path.read_text().strip() == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the owner's alone
    again, source = resolve_keys(AccessConfig(), tmp_path, "127.0.0.1")
    assert source == f"stored {path}" and again.keys[0].key == key  # one key per data dir


def test_a_generated_key_serves_loopback_only(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("REC_API_KEY", raising=False)
    for host in ("0.0.0.0", "10.1.2.3"):
        with pytest.raises(ValueError, match="needs API keys"):
            resolve_keys(AccessConfig(), tmp_path, host)
    assert not (tmp_path / KEY_FILE).exists()
