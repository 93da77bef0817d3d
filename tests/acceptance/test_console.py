"""The operators' console, driven in a real headless browser (Debian's chromium and
chromium-driver, through selenium): signing in, reading the dead letters, a dry run then
a replay, a purge with its typed confirmation, a claim's story; and the refusals of a
request without the session or the CSRF token; a sale watched live while it sells. Each
test saves screenshots to reports/console/."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from flashclaim.core.settings import Settings
from tests.acceptance.conftest import LOGS, Services, free_port
from tests.acceptance.test_dlq import Letters, depth, letters  # noqa: F401 (a fixture)
from tests.conftest import defuse

SHOTS = Path(__file__).resolve().parents[2] / "reports" / "console"
TOKEN = "c" * 40


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.fail("chromium-driver is not installed (deploy/install-deps.sh installs it)")
    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    chromium = shutil.which("chromium")
    if chromium:
        options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.implicitly_wait(5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[str]:
    """The admin API's console, with its own instance id (its log holds the audit)."""
    admin = Services(settings)
    port = free_port()
    await admin.start_admin(port, admin_token=TOKEN, instance_id="console")
    yield f"http://127.0.0.1:{port}/console"
    admin.stop()


def shot(browser: WebDriver, name: str) -> None:
    browser.save_screenshot(str(SHOTS / f"{name}.png"))


def sign_in(browser: WebDriver, console: str, name: str, token: str) -> None:
    browser.get(f"{console}/login")
    browser.find_element(By.ID, "operator-name").send_keys(name)
    browser.find_element(By.ID, "token").send_keys(token)
    # The click returns before the answer's page is loaded: wait for it to replace this
    # one. A mark on this page's window goes with it. (Waiting for the button to go stale
    # races the load: chromedriver can answer "unknown error" for a node of a document
    # being replaced, instead of "stale element".)
    browser.execute_script("window.flashclaimLeaving = true")
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 15, ignored_exceptions=(WebDriverException,)).until(
        lambda b: b.execute_script(
            "return !window.flashclaimLeaving && document.readyState === 'complete'"
        )
    )


def text(browser: WebDriver, element_id: str) -> str:
    return str(browser.find_element(By.ID, element_id).text)


async def test_sign_in_refuses_a_wrong_token_and_every_post_needs_the_session_and_its_csrf(
    browser: WebDriver,
    console: str,
    settings: Settings,
    letters: Letters,  # noqa: F811
) -> None:
    browser.get(f"{console}/dlq")
    assert browser.current_url.endswith("/console/login")
    sign_in(browser, console, "ops-mallory", "not-the-token")
    assert text(browser, "error") == "Wrong token."
    shot(browser, "01-wrong-token")
    browser.get(f"{console}/dlq")
    assert browser.current_url.endswith("/console/login")

    sign_in(browser, console, "ops-alice", TOKEN)
    assert browser.current_url.endswith("/console/dlq")
    cookie = browser.get_cookie("flashclaim_console")
    assert cookie is not None
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")
    assert csrf
    purge = {"action": "purge", "id": letters.poison, "confirmation": "purge 1"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{console}/dlq", allow_redirects=False) as r:
            assert r.status == 303
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        # No session, then the session without the token, then with another token.
        for cookies, form in (
            ({}, {**purge, "csrf": csrf}),
            ({"flashclaim_console": cookie["value"]}, purge),
            ({"flashclaim_console": cookie["value"]}, {**purge, "csrf": "forged"}),
        ):
            async with http.post(
                f"{console}/dlq/apply", data=form, cookies=cookies, allow_redirects=False
            ) as r:
                assert r.status == 403
                assert "Sign in first" in await r.text() or "CSRF" in await r.text()
    assert await depth(settings) == 3
    shot(browser, "02-signed-in")


async def test_an_operator_reads_a_poison_claim_replays_a_fixed_one_and_purges_another(
    browser: WebDriver,
    console: str,
    settings: Settings,
    letters: Letters,  # noqa: F811
    exploding_user: str,
) -> None:
    sign_in(browser, console, "ops-alice", TOKEN)
    assert text(browser, "depth") == "3"
    reasons = text(browser, "by-reason")
    assert "poison 1" in reasons and "failed 1" in reasons
    shot(browser, "03-dead-letters")

    # The poison claim, in full.
    browser.find_element(By.LINK_TEXT, letters.poison).click()
    assert text(browser, "reason") == "poison"
    assert '"user_id": ' in text(browser, "body")
    shot(browser, "04-poison-claim")

    # The failed claim, once its cause is fixed: a dry run, a wrong confirmation, then
    # the replay, and the claim is applied.
    defuse(settings, exploding_user)
    browser.get(f"{console}/dlq?reason=failed")
    browser.find_element(By.ID, f"pick-{letters.failed}").click()
    browser.find_element(By.ID, "replay").click()
    assert text(browser, "phrase") == "replay 1"
    assert letters.failed in text(browser, "dry-run")
    shot(browser, "05-replay-dry-run")
    browser.find_element(By.ID, "confirmation").send_keys("replay 2")
    browser.find_element(By.ID, "confirm").click()
    assert "nothing was done" in text(browser, "error")
    assert await depth(settings) == 3
    browser.find_element(By.ID, "confirmation").send_keys("replay 1")
    browser.find_element(By.ID, "confirm").click()
    assert text(browser, "done") == "Replayed 1"
    shot(browser, "06-replayed")
    browser.find_element(By.LINK_TEXT, letters.failed).click()
    deadline = time.monotonic() + 30
    while text(browser, "verdict") != "granted" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        browser.refresh()
    assert text(browser, "verdict") == "granted"
    assert "status=PROCESSED" in text(browser, "part-inbox")
    shot(browser, "07-claim-story")

    # The poison claim purged, once the confirmation is typed right.
    browser.get(f"{console}/dlq?reason=poison")
    browser.find_element(By.ID, f"pick-{letters.poison}").click()
    browser.find_element(By.ID, "purge").click()
    browser.find_element(By.ID, "confirmation").send_keys("purge")
    browser.find_element(By.ID, "confirm").click()
    assert "nothing was done" in text(browser, "error")
    shot(browser, "08-purge-refused")
    assert await depth(settings) == 2
    browser.find_element(By.ID, "confirmation").send_keys("purge 1")
    browser.find_element(By.ID, "confirm").click()
    assert text(browser, "done") == "Purged 1"
    assert await depth(settings) == 1
    shot(browser, "09-purged")

    log = (LOGS / f"{settings.namespace}-console.log").read_text()
    audit = [json.loads(line) for line in log.splitlines() if '"audit"' in line]
    assert [(a["action"], a["message_ids"]) for a in audit] == [
        ("replay", [letters.failed]),
        ("purge", [letters.poison]),
    ]
    assert all(
        re.fullmatch(r"ops-alice via console from 127\.0\.0\.1", a["operator"]) for a in audit
    )


async def test_an_operator_retries_a_failed_event_of_the_outbox(
    browser: WebDriver, console: str, settings: Settings
) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO outbox (aggregate, event_type, payload, status, attempts, last_error)"
            " VALUES ('CONSOLE', 'coupon.created', '{\"amount\": 1, \"remaining_amount\": 1}',"
            " 'FAILED', 8, 'refused by the broker') RETURNING id"
        ).fetchone()
    assert row is not None
    event_id = str(row[0])
    sign_in(browser, console, "ops-alice", TOKEN)
    # No consumer has run in this namespace yet: the dead letters are there, and none.
    assert text(browser, "depth") == "0"
    browser.find_element(By.LINK_TEXT, "Outbox").click()
    assert text(browser, "failed") == "1"
    assert "refused by the broker" in text(browser, "failed-events")
    shot(browser, "10-outbox-failed")
    browser.find_element(By.ID, f"pick-{event_id}").click()
    browser.find_element(By.ID, "retry").click()
    assert text(browser, "message") == "1 failed event(s) pending again."
    assert text(browser, "failed") == "0"
    shot(browser, "11-outbox-retried")
    with psycopg.connect(settings.database_url) as conn:
        status = conn.execute(
            "SELECT status, attempts FROM outbox WHERE id = %s", (event_id,)
        ).fetchone()
    assert status == ("PENDING", 0)
    log = (LOGS / f"{settings.namespace}-console.log").read_text()
    (audit,) = [json.loads(line) for line in log.splitlines() if '"audit"' in line]
    assert audit["action"] == "outbox retry" and audit["event_ids"] == [event_id]
    assert audit["operator"] == "ops-alice via console from 127.0.0.1"


def until_shown(
    browser: WebDriver, element_id: str, wanted: Callable[[str], bool], timeout: float = 20
) -> str:
    """The text of ``element_id`` once ``wanted`` holds of it, on a page that reloads
    itself (no refresh from here): the last text seen if it never does."""
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            seen = text(browser, element_id)
        except WebDriverException:  # between two loads of the page
            seen = ""
        if wanted(seen):
            return seen
        time.sleep(0.2)
    return seen


def number(shown: str) -> float | None:
    return None if shown == "-" else float(shown.replace(",", ""))


async def test_an_operator_watches_a_sale_live_from_the_services_own_figures(
    browser: WebDriver, settings: Settings, http: aiohttp.ClientSession
) -> None:
    services = Services(settings)
    services.start_consumer()
    await services.start_gateway()
    away = f"http://127.0.0.1:{free_port()}/metrics"  # a gateway that is not running
    port = free_port()
    await services.start_admin(
        port,
        admin_token=TOKEN,
        instance_id="console",
        console_metrics_urls=f"{services.base_url}/metrics, {away}",
        console_refresh_seconds=1,
    )
    console = f"http://127.0.0.1:{port}/console"
    coupon = f"LIVE_{uuid.uuid4().hex[:8]}"
    try:
        await services.create_coupons(http, 300, coupon)
        sign_in(browser, console, "ops-alice", TOKEN)
        browser.find_element(By.LINK_TEXT, "Sale").click()
        assert coupon in text(browser, "recent")
        browser.find_element(By.LINK_TEXT, coupon).click()
        assert text(browser, "remaining") == "300"
        assert text(browser, "claimed") == "0"
        # The page names the source it could not read and shows the others.
        assert f"{away} not read" in text(browser, "failures")
        queues = text(browser, "queues")
        for name in settings.topology().claims_queues:
            assert re.search(rf"{re.escape(name)} \d+ 1\b", queues), queues
        shot(browser, "12-sale-before")

        async def claim(i: int) -> int:
            async with http.post(
                f"{services.base_url}/api/coupons/claim",
                json={"user_id": f"u{i}", "coupon_name": coupon},
            ) as r:
                return r.status

        assert await asyncio.gather(*(claim(i) for i in range(200))) == [200] * 200
        # Seen by the page as it reloads itself: the stock fell, at a rate.
        assert until_shown(browser, "remaining", lambda t: t == "100") == "100"
        assert text(browser, "claimed") == "200"
        rate = until_shown(browser, "coupon-rate", lambda t: (number(t) or 0) > 0)
        assert (number(rate) or 0) > 0, rate
        answered = until_shown(browser, "answered-rate", lambda t: (number(t) or 0) > 0)
        assert (number(answered) or 0) > 0, answered
        assert number(text(browser, "held")) is not None  # read from the gateway
        assert number(text(browser, "overloaded-rate")) == 0
        shot(browser, "13-sale-selling")

        browser.get(f"{console}/sale?coupon=NO_SUCH_{coupon}")
        assert "No coupon named" in text(browser, "error")
    finally:
        services.stop()
