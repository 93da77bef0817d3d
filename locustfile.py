"""Locust load test for flashclaim, for people who already run Locust.

    locust -f locustfile.py --host http://127.0.0.1:8080

Each simulated user claims the hot coupon once (with an Idempotency-Key, following a
202 to its final answer) and reads it now and then. ``flashclaim loadtest`` is the
built-in alternative, with open-loop arrival rates and invariant checks.
Settings (environment): FLASHCLAIM_LOCUST_COUPON (default LOCUST_HOT),
FLASHCLAIM_LOCUST_STOCK (default 1000).
"""

from __future__ import annotations

import os
import time
import uuid

from locust import HttpUser, between, events, task

COUPON = os.environ.get("FLASHCLAIM_LOCUST_COUPON", "LOCUST_HOT")
STOCK = int(os.environ.get("FLASHCLAIM_LOCUST_STOCK", "1000"))


@events.test_start.add_listener
def create_coupon(environment, **kwargs):  # type: ignore[no-untyped-def]
    import requests

    response = requests.post(
        f"{environment.host}/api/coupons", json={"name": COUPON, "amount": STOCK}, timeout=10
    )
    if response.status_code not in (201, 409):
        raise RuntimeError(f"cannot create {COUPON}: {response.status_code} {response.text}")


class Shopper(HttpUser):
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.user_id = f"locust_{uuid.uuid4().hex[:12]}"
        self.claimed = False

    @task(5)
    def claim(self) -> None:
        if self.claimed:
            return
        key = uuid.uuid4().hex
        with self.client.post(
            "/api/coupons/claim",
            name="claim",
            catch_response=True,
            json={"user_id": self.user_id, "coupon_name": COUPON},
            headers={"Idempotency-Key": key},
        ) as response:
            status = response.status_code
            if status == 202:
                location = response.headers["Location"]
                response.success()
                for _ in range(100):
                    time.sleep(0.2)
                    polled = self.client.get(location, name="claim result")
                    if polled.status_code != 202:
                        status = polled.status_code
                        break
            elif status in (200, 400, 409):
                response.success()
            else:
                response.failure(f"unexpected {status}")
        self.claimed = status in (200, 400, 409)

    @task(1)
    def read(self) -> None:
        self.client.get(f"/api/coupons/{COUPON}", name="read coupon")
