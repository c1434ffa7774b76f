"""Locust users exercising the whole API with a realistic mix: most traffic asks for
recommendations (known users, cold users, users who just acted), some posts events (single and
batched), a little asks for similar items. For interactive exploration against a server started
with `make run`: `REC_API_KEY=$(cat var/api_key) locust -f loadtest/locustfile.py --host
http://127.0.0.1:8000` (the events need a key with the `events` scope). `make loadtest`
does not use it: loadtest/run.py drives its own asyncio client (see loadtest/client.py why)."""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

KNOWN_USERS = 2000  # the default generated data set: u0..u1999, i0..i999
ITEMS = 1000


class AppUser(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.client.headers["X-API-Key"] = os.environ.get("REC_API_KEY", "")
        self.rng = random.Random(id(self))
        self.me = f"u{self.rng.randrange(KNOWN_USERS)}"

    def _item(self) -> str:
        return f"i{min(int(self.rng.paretovariate(1.0)) - 1, ITEMS - 1)}"

    @task(60)
    def recommend_known(self) -> None:
        self.client.get(
            "/recommend",
            params={"user_id": f"u{self.rng.randrange(KNOWN_USERS)}", "k": 10},
            name="/recommend known",
        )

    @task(10)
    def recommend_cold(self) -> None:
        self.client.get(
            "/recommend",
            params={"user_id": f"cold-{self.rng.randrange(10**9)}", "k": 10},
            name="/recommend cold",
        )

    @task(20)
    def act_then_recommend(self) -> None:
        """The real-time loop: an event, then the answer that must already reflect it."""
        item = self._item()
        self.client.post(
            "/events",
            json={"user_id": self.me, "item_id": item, "type": "click"},
            name="/events single",
        )
        with self.client.get(
            "/recommend",
            params={"user_id": self.me, "k": 10},
            name="/recommend just-active",
            catch_response=True,
        ) as resp:
            if resp.ok and item in {i["item_id"] for i in resp.json()["items"]}:
                resp.failure(f"{item} was just clicked and is still recommended")

    @task(5)
    def events_batch(self) -> None:
        batch = [
            {
                "user_id": f"u{self.rng.randrange(KNOWN_USERS)}",
                "item_id": self._item(),
                "type": self.rng.choice(["view", "view", "click", "add_to_cart", "purchase"]),
            }
            for _ in range(100)
        ]
        self.client.post("/events", json={"events": batch}, name="/events batch100")

    @task(5)
    def similar(self) -> None:
        self.client.get("/similar", params={"item_id": self._item(), "k": 10}, name="/similar")
