"""The dashboard in a real headless Chromium, over Redis, two Celery workers and live runs.

Chromium, chromedriver and selenium come from ``scripts/install-browser`` (run by
``scripts/setup``); when they are missing this module fails, it never skips. Set
``FLEET_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to refresh the README's screenshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from fleet import AgentStepSpec
from fleet.config import FleetSettings
from tests.celery_support import CeleryWorkers, fleet_settings, running_workers
from tests.dashboard_support import PASSWORD, Dashboard, run_phases, running_dashboard

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

FLOWER = "http://127.0.0.1:5555"


def spec(task_id: str, agent: str, prompt: str, max_tokens: int) -> AgentStepSpec:
    return AgentStepSpec(
        task_id=task_id, agent=agent, description=task_id, prompt=prompt, max_tokens=max_tokens
    )


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def settings(redis_url: str, place: Path) -> FleetSettings:
    return fleet_settings(
        redis_url, store=f"sqlite:{place / 'journal.db'}", run_index=place / "runs.db"
    )


@pytest.fixture(scope="module")
def workers(settings: FleetSettings, place: Path) -> Iterator[CeleryWorkers]:
    with running_workers(settings, place, "worker1", "worker2", concurrency=2) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def dashboard(settings: FleetSettings, place: Path) -> Iterator[Dashboard]:
    with running_dashboard(settings, place, FLEET_DASHBOARD_FLOWER_URL=FLOWER) as running:
        yield running


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """The test's runs; each is waited for before the workers and Redis stop."""
    started: list[Run] = []
    yield started
    for run in started:
        run.thread.join(timeout=90)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium / chromedriver missing: run scripts/install-browser"
    profile = tmp_path / "chromium-profile"
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        # a closed network refuses Chromium's own background connections, many at a time
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", "--no-first-run", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


class Run:
    """A workflow run in a thread of its own (the browser drives the test's thread)."""

    def __init__(
        self,
        runs: list[Run],
        settings: FleetSettings,
        root_id: str,
        phases: Any,
        budget: int | None,
        budget_usd: Decimal | None = None,
    ) -> None:
        self.root_id = root_id
        self.ended: list[str] = []
        self.thread = threading.Thread(
            daemon=True,
            target=lambda: self.ended.append(
                asyncio.run(
                    run_phases(
                        settings,
                        root_id,
                        phases,
                        executor="celery",
                        budget_tokens=budget,
                        budget_usd=budget_usd,
                    )
                )
            ),
        )
        self.thread.start()
        runs.append(self)

    def join(self) -> str:
        self.thread.join(timeout=90)
        assert not self.thread.is_alive(), f"run {self.root_id} did not end"
        return self.ended[0]


def wait(
    browser: WebDriver, what: str, check: Callable[[WebDriver], Any], timeout: float = 60
) -> Any:
    # A live page redraws under the check: an element it held may go stale; look again.
    return WebDriverWait(
        browser, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(check, message=what)


def step_states(browser: WebDriver, prefix: str) -> list[str]:
    """The status cells of the steps whose task id starts with ``prefix``, in page order."""
    script = (
        "return Array.from(document.querySelectorAll('tr.step'))"
        ".filter((row) => row.dataset.taskId.startsWith(arguments[0]))"
        ".map((row) => row.querySelector('.st').textContent);"
    )
    return list(browser.execute_script(script, prefix))


def open_from_list(browser: WebDriver, root_id: str) -> None:
    """On the list page: see the workflow's row appear without a reload, then open it."""
    browser.execute_script("window.__notReloaded = 'list'")
    link = wait(
        browser,
        f"{root_id} listed",
        lambda b: b.find_elements(By.CSS_SELECTOR, f"tr[data-root-id='{root_id}'] a"),
    )
    assert browser.execute_script("return window.__notReloaded") == "list"  # the list is live
    link[0].click()
    wait(
        browser,
        "workflow page",
        lambda b: b.find_element(By.TAG_NAME, "h1").text.startswith(root_id),
    )


@pytest.mark.timeout(300)
def test_live_workflow_page_in_a_real_browser(
    browser: WebDriver,
    dashboard: Dashboard,
    workers: CeleryWorkers,
    settings: FleetSettings,
    place: Path,
    runs: list[Run],
) -> None:
    """Log in, see a run appear and its steps turn done live, open a step, cancel a long run."""
    base = dashboard.url.replace("http://", f"http://fleet:{PASSWORD}@")
    browser.get(base + "/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Workflows"

    root_id = f"nightly-{uuid.uuid4().hex[:6]}"
    phases = [
        # one slow step: the page sees steps done while another still runs
        ("draft", [spec(f"draft-{i}", "sleep_prompt", nap, 10) for i, nap in enumerate("1238", 1)]),
        (
            "review",
            [spec(f"review-{i}", "spend", str(150 * i), 600) for i in range(1, 4)]
            + [spec("review-strict", "fail", "x", 10)],
        ),
        ("publish", [spec("publish-1", "spend", "80", 100)]),
    ]
    run = Run(runs, settings, root_id, phases, budget=2000)
    open_from_list(browser, root_id)
    browser.execute_script("window.__notReloaded = 'workflow'")

    wait(browser, "a draft step running", lambda b: "running" in step_states(b, "draft-"))
    wait(
        browser,
        "every draft step done",
        lambda b: step_states(b, "draft-") == ["done"] * 4,
    )
    wait(browser, "status finished", lambda b: b.find_element(By.ID, "status").text == "finished")
    assert browser.execute_script("return window.__notReloaded") == "workflow"  # updated live
    assert run.join() == "finished"
    assert sorted(step_states(browser, "review-")) == ["done", "done", "done", "failed"]
    assert browser.find_element(By.ID, "steps-done").text == "8"
    assert browser.find_element(By.ID, "steps-failed").text == "1"
    assert browser.find_element(By.ID, "tokens").text == "980 / 2000"
    assert "980 of 2000 tokens" in browser.find_element(By.ID, "gauge-text").text
    assert not browser.find_element(By.ID, "cancel").is_enabled()

    browser.find_element(By.CSS_SELECTOR, "tr.step[data-task-id='review-strict']").click()
    detail = wait(browser, "step detail", lambda b: b.find_element(By.ID, "step-detail"))
    wait(browser, "step detail shown", lambda b: detail.is_displayed())
    text = detail.text
    assert "review-strict" in text and "fail" in text and "failed" in text
    assert any(f"{name}@" in text for name in ("worker1", "worker2")), text
    flower = detail.find_element(By.ID, "flower-link").get_attribute("href")
    assert flower is not None and flower.startswith(f"{FLOWER}/task/fs-")
    shot = place / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FLEET_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FLEET_DASHBOARD_SCREENSHOT"])

    long_id = f"long-{uuid.uuid4().hex[:6]}"
    naps = [("nap", [spec(f"nap-{i}", "sleep_prompt", "20", 10) for i in range(1, 5)])]
    long_run = Run(runs, settings, long_id, naps, budget=1000)
    browser.get(base + "/")
    open_from_list(browser, long_id)
    wait(browser, "a nap step running", lambda b: "running" in step_states(b, "nap-"))
    cancel = browser.find_element(By.ID, "cancel")
    assert cancel.is_enabled()
    cancel.click()
    alert = wait(browser, "confirm dialog", lambda b: b.switch_to.alert)
    assert long_id in alert.text
    alert.accept()
    try:
        wait(
            browser,
            "status cancelled",
            lambda b: b.find_element(By.ID, "status").text == "cancelled",
        )
    except TimeoutException:
        note = browser.find_element(By.ID, "cancel-note").text
        with dashboard.client() as client:
            body = client.get(f"/api/workflows/{long_id}").text
        raise AssertionError(f"not cancelled; page note {note!r}; API {body[:2000]}") from None
    assert "cancelled from the dashboard" in browser.find_element(By.ID, "notes").text
    long_run.join()  # a cancelled phase returns its outcomes: the program may end normally
    assert "done" not in step_states(browser, "nap-")
    wait(browser, "nap steps failed", lambda b: step_states(b, "nap-") == ["failed"] * 4)


@pytest.mark.timeout(300)
def test_the_workflow_page_tells_the_whole_truth(
    browser: WebDriver,
    dashboard: Dashboard,
    workers: CeleryWorkers,
    settings: FleetSettings,
    place: Path,
    runs: list[Run],
) -> None:
    """Durations, a phase's running steps and their workers, the budget's unit and its end."""
    base = dashboard.url.replace("http://", f"http://fleet:{PASSWORD}@")
    browser.get(base + "/")
    durations = browser.execute_script("return [fmtDuration(119.6), fmtDuration(3725.2)]")
    assert durations == ["2 min 0 s", "1 h 2 min 5 s"]

    # Dollars only, and spent: the gauge says what is limited and that it ran out.
    paid_id = f"paid-{uuid.uuid4().hex[:6]}"
    buys = [("buy", [spec(f"buy-{i}", "pay", "2", 10) for i in range(1, 5)])]
    assert Run(runs, settings, paid_id, buys, None, Decimal(5)).join() == "finished"
    browser.get(base + f"/workflows/{paid_id}")
    gauge = wait(
        browser,
        "the dollar gauge",
        lambda b: (
            "$5.000000 of $5.000000" in b.find_element(By.ID, "gauge-text").text
            and b.find_element(By.ID, "gauge-text")
        ),
    )
    assert gauge.text.startswith("budget exhausted"), gauge.text
    assert "exhausted" in browser.find_element(By.ID, "gauge").get_attribute("class")
    # The notes are drawn by the page's script, after the first paint the gauge came from.
    wait(
        browser,
        "the exhausted note",
        lambda b: "budget exhausted" in b.find_element(By.ID, "notes").text,
    )

    # Two steps still run while the others are done: the phase and the rows say so.
    mixed_id = f"mixed-{uuid.uuid4().hex[:6]}"
    mix = [spec(f"quick-{i}", "sleep_prompt", "0", 10) for i in range(1, 5)]
    mix += [spec(f"slow-{i}", "sleep_prompt", "30", 100) for i in range(1, 3)]
    Run(runs, settings, mixed_id, [("mix", mix)], 1000)
    browser.get(base + "/")
    open_from_list(browser, mixed_id)
    try:
        wait(
            browser,
            "quick steps done, slow ones running",
            lambda b: (
                step_states(b, "quick-") == ["done"] * 4
                and step_states(b, "slow-") == ["running"] * 2
            ),
        )
    except TimeoutException:
        states = step_states(browser, "quick-"), step_states(browser, "slow-")
        raise AssertionError(f"steps {states}; page {browser.page_source[:3000]}") from None
    # The page redraws as the run's log grows (events, live budget readings): read each
    # piece in one script call rather than through element handles a redraw makes stale.
    heading = browser.execute_script(
        "return document.querySelector('section.phase h2 small').textContent"
    )
    assert heading == "4 / 6 steps finished, 2 running", heading
    workers = browser.execute_script(
        "return [...document.querySelectorAll(\"tr.step[data-task-id^='slow-']\")]"
        ".map(row => row.querySelectorAll('td')[3].textContent)"
    )
    assert len(workers) == 2, workers
    for worker in workers:
        assert worker.startswith(("worker1@", "worker2@")), worker
    gauge = browser.execute_script("return document.getElementById('gauge-text').textContent")
    assert gauge.startswith("0 of 1000 tokens"), gauge
    width = browser.execute_script("return document.getElementById('gauge').offsetWidth")
    assert width >= 900  # the bar spans the page, not a sliver beside it
    shot = place / "dashboard-truth.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("FLEET_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FLEET_DASHBOARD_SCREENSHOT"])

    with dashboard.client() as client:
        sent = client.post(f"/api/workflows/{mixed_id}/cancel", json={"reason": "enough"})
    assert sent.status_code == 202, sent.text
    wait(browser, "cancelled", lambda b: b.find_element(By.ID, "status").text == "cancelled")
    wait(browser, "slow steps ended", lambda b: "running" not in step_states(b, "slow-"))
    gauge = browser.find_element(By.ID, "gauge-text").text
    assert "reserved" not in gauge, gauge  # an ended run holds nothing


def test_wrong_password_in_the_browser_is_refused(browser: WebDriver, dashboard: Dashboard) -> None:
    """The browser's request with a wrong password is answered 401 and shows no dashboard."""
    browser.get(dashboard.url.replace("http://", "http://fleet:wrong@") + "/api/workflows")
    statuses = [
        message["params"]["response"]["status"]
        for entry in browser.get_log("performance")
        for message in [json.loads(entry["message"])["message"]]
        if message["method"] == "Network.responseReceived"
        and message["params"]["response"]["url"].endswith("/api/workflows")
    ]
    assert statuses and set(statuses) == {401}, statuses
    assert "root_id" not in browser.page_source
