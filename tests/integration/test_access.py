"""Every route against every kind of key, through real HTTP: writes and administration need a
key with their scope (401 without one, 403 with another scope), reads are open, a key over
its rate gets 429 with Retry-After, and a refused destructive call changes nothing."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN, ADMIN_KEY, LIMITED_KEY, SCOPED_KEYS

# (method, path, JSON body, scope); "read" routes are open without a key by default
ROUTES = [
    ("POST", "/events", {"user_id": "acc-u", "item_id": "i1", "type": "click"}, "events"),
    ("GET", "/recommend?user_id=u1", None, "read"),
    ("POST", "/recommend", {"user_id": "u1"}, "read"),
    ("GET", "/similar?item_id=i1", None, "read"),
    ("GET", "/items/i1", None, "read"),
    ("GET", "/models", None, "read"),
    ("GET", "/users", None, "events"),
    ("POST", "/items", {"item_id": "acc-new", "category": "c01"}, "catalog"),
    ("DELETE", "/items/acc-new", None, "catalog"),
    ("DELETE", "/users/acc-gone", None, "admin"),
    ("POST", "/admin/retrain", None, "admin"),
]
ALLOWED_NOT_CALLED = {"/admin/retrain"}  # a retrain per call: the denials are checked alone


def call(client: httpx.Client, method: str, path: str, body, key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return client.request(method, path, json=body, headers=headers)


@pytest.fixture
def bare(stack):
    """A client that sends no key of its own."""
    with httpx.Client(base_url=str(stack["client"].base_url), timeout=30) as c:
        yield c


@pytest.mark.parametrize("method,path,body,scope", ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES])
def test_route_needs_its_scope(bare, method, path, body, scope):
    if scope == "read":
        assert call(bare, method, path, body, None).status_code == 200
    else:
        r = call(bare, method, path, body, None)
        assert r.status_code == 401 and scope in r.json()["detail"], r.text
    r = call(bare, method, path, body, "not-a-key-of-this-stack")
    assert r.status_code == 401, r.text
    for other, key in SCOPED_KEYS.items():
        if other == scope:
            continue
        r = call(bare, method, path, body, key)
        if scope == "read":  # open reads: any known key reads
            assert r.status_code == 200, (other, r.text)
        else:
            assert r.status_code == 403 and scope in r.json()["detail"], (other, r.text)
    if path in ALLOWED_NOT_CALLED:
        return
    own = SCOPED_KEYS.get(scope, ADMIN_KEY)
    for key in (own, ADMIN_KEY):
        r = call(bare, method, path, body, key)
        assert r.status_code == 200, (key, r.text)


def test_refused_destructive_calls_change_nothing(stack, bare):
    c = stack["client"]  # the admin's
    assert c.post(
        "/events", json={"user_id": "keep-me", "item_id": "i3", "type": "click"}
    ).is_success
    victim = c.get("/recommend", params={"user_id": "u2", "k": 1}).json()["items"][0]["item_id"]
    for key in (None, "wrong-key-0123456789", SCOPED_KEYS["events"], SCOPED_KEYS["read"]):
        assert call(bare, "DELETE", "/users/keep-me", None, key).status_code in (401, 403)
        assert call(bare, "DELETE", f"/items/{victim}", None, key).status_code in (401, 403)
        assert call(bare, "POST", "/items", {"item_id": "sneaky"}, key).status_code in (401, 403)
    assert c.get(f"/items/{victim}").json()["deleted"] is False
    assert c.get("/items/sneaky").status_code == 404
    r = c.delete("/users/keep-me")  # the admin's call deletes what the others could not
    assert r.status_code == 200 and r.json()["deleted_events"] == 1


def test_a_key_over_its_rate_gets_429_with_retry_after(bare):
    statuses = []
    for _ in range(6):
        r = call(bare, "GET", "/models", None, LIMITED_KEY)
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "limited" in r.json()["detail"]
    assert statuses[:2] == [200, 200] and 429 in statuses, statuses


def test_openapi_declares_the_key(bare):
    doc = bare.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        **doc["components"]["securitySchemes"]["ApiKey"],
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    paths = doc["paths"]
    assert paths["/events"]["post"]["security"] == [{"ApiKey": []}]
    assert paths["/users/{user_id}"]["delete"]["security"] == [{"ApiKey": []}]
    assert {} in paths["/recommend"]["get"]["security"]


# ---- fuzzing: schemathesis against the OpenAPI document ------------------------------------
# Bounded here (FUZZ_EXAMPLES per operation); `make fuzz` runs it longer. Every operation but
# the retrain (a Ray Train job per call) with the admin key: no 5xx, every answer's status,
# content type and body as the document declares.

FUZZ_EXAMPLES = int(os.environ.get("REC_FUZZ_EXAMPLES", "15"))
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_fuzzed_requests_get_no_5xx_and_match_the_schema(stack):
    base = str(stack["client"].base_url)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if not result.ok().path.startswith("/admin/")
    ]
    assert len(operations) >= 10
    sent: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for operation in operations:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate],
            database=None,
        )
        @given(case=operation.as_strategy())
        def run(case):
            label = f"{case.method.upper()} {case.path}"
            response = case.call_and_validate(base_url=base, headers=ADMIN, checks=FUZZ_CHECKS)
            sent[label] = sent.get(label, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        run()
    print(f"\n[fuzz] {sum(sent.values())} requests over {len(sent)} operations: {statuses}")
    assert len(sent) == len(operations)
    assert not any(code >= 500 for code in statuses)


def test_stateful_sequences_follow_the_links_with_no_5xx(stack):
    """schemathesis's stateful mode along the OpenAPI links: add an item, read it, act on it,
    ask for that user's recommendations, delete the item or forget the user, in sequences of
    up to 6 calls; every answer as the document declares, never a 5xx."""
    base = str(stack["client"].base_url)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    seen: dict[str, int] = {}

    class Sequences(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"base_url": base, "headers": ADMIN}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            label = f"{case.method.upper()} {case.operation.path} {response.status_code}"
            seen[label] = seen.get(label, 0) + 1
            case.validate_response(response, checks=FUZZ_CHECKS)

    Sequences.run(
        settings=settings(
            max_examples=max(FUZZ_EXAMPLES // 3, 3),
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )
    print(f"\n[stateful] {sum(seen.values())} calls: {dict(sorted(seen.items()))}")
    assert not any(label.endswith(tuple(f" 5{d:02d}" for d in range(100))) for label in seen)
    # the links were followed: an added item was read and acted on by its id
    assert seen.get("GET /items/{item_id} 200", 0) + seen.get("POST /events 200", 0) > 0
