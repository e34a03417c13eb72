"""The dashboard answers asks: the JSON API (locally and on a fleet) and Approve in Chromium."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests import asks_support
from tests.asks_support import Backend, local_backend, wait, waiting_for_answer
from tests.dashboard_support import PASSWORD, Dashboard, running_dashboard

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

backend = asks_support.backend  # the fixtures: each test runs locally and on a fleet
fleet_backend = asks_support.fleet_backend


@pytest.fixture
def dashboard(backend: Backend) -> Iterator[Dashboard]:
    with running_dashboard(backend.settings, backend.directory) as running:
        yield running


def post(client: httpx.Client, root: str, body: str, name: str = "publish") -> httpx.Response:
    return client.post(
        f"/api/workflows/{root}/asks/{name}",
        content=body,
        headers={"Content-Type": "application/json"},
    )


def test_the_api_lists_and_answers_an_ask(backend: Backend, dashboard: Dashboard) -> None:
    """GET /api/asks lists it; POST answers: 415, 422 (field), 404, 200 as the user, 409."""
    root = f"api-{backend.name}"
    run = backend.start(root)
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
        with dashboard.client() as client:
            listing = client.get("/api/asks")
            assert listing.status_code == 200, listing.text
            (item,) = [i for i in listing.json()["items"] if i["root_id"] == root]
            assert {"root_id", "name", "question", "schema", "asked_at", "deadline"} <= set(item)
            assert item["name"] == "publish" and item["question"] == "Publish the 3 drafts?"
            assert item["schema"]["properties"]["approved"]["type"] == "boolean"
            assert item["deadline"] > item["asked_at"]

            plain = client.post(f"/api/workflows/{root}/asks/publish", content="true")
            assert plain.status_code == 415
            wrong = post(client, root, '{"approved": "sure"}')
            assert wrong.status_code == 422, wrong.text
            assert wrong.json()["field"] == "approved" and "approved" in wrong.json()["error"]
            assert post(client, "nobody-ran-this", "true").status_code == 404
            taken = post(client, root, '{"approved": true, "note": "from the dashboard"}')
            assert taken.status_code == 200, taken.text
            assert taken.json()["by"] == "fleet" and taken.json()["state"] == "answered"
            again = post(client, root, '{"approved": false}')
            assert again.status_code == 409 and "already answered" in again.json()["error"]
            assert root not in {i["root_id"] for i in client.get("/api/asks").json()["items"]}
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert "'publish' answered by fleet" in stdout
    assert backend.out()["note"] == "from the dashboard"
    assert [backend.runs(root, f"publish{i}") for i in range(2)] == [1, 1]


def test_the_api_refuses_an_answer_past_the_deadline(
    backend: Backend, dashboard: Dashboard
) -> None:
    """The host died waiting; after the deadline the dashboard answers 409 and lists nothing."""
    root = f"api-late-{backend.name}"
    run = backend.start(root, FLOW_TIMEOUT_S="3")
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
    finally:
        run.kill()
        run.communicate()
    record = backend.ask(root)
    assert record is not None and record.deadline is not None
    time.sleep(max(record.deadline - time.time(), 0) + 0.1)
    with dashboard.client() as client:
        assert root not in {i["root_id"] for i in client.get("/api/asks").json()["items"]}
        late = post(client, root, '{"approved": true}')
    assert late.status_code == 409 and late.json()["kind"] == "expired", late.text


def test_the_api_keeps_an_early_answer(backend: Backend, dashboard: Dashboard) -> None:
    """Answered before the program asks: kept (200, "early"), then taken when it asks."""
    root = f"api-early-{backend.name}"
    gate = backend.directory / "gate"
    gate.touch()
    run = backend.start(root, FLOW_GATE=str(gate))
    try:
        wait(lambda: backend.started(root), run, "the run to start")
        with dashboard.client() as client:
            deadline = time.monotonic() + 30
            while (early := post(client, root, '{"approved": true}')).status_code == 404:
                assert time.monotonic() < deadline, "the dashboard never saw the run"
                time.sleep(0.2)  # the dashboard reads the run's log once a second
            assert early.status_code == 200, early.text
            assert early.json()["state"] == "early"
            gate.unlink()
            stdout, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stdout + stderr
            finished = post(client, root, '{"approved": true}')
            assert finished.status_code == 404 and "finished" in finished.json()["error"]
    finally:
        run.kill()
    assert "waiting for an answer" not in stdout
    assert backend.out()["approved"] is True


GATED_ASK = """
import asyncio, json, os
from pathlib import Path


async def main(workflow):
    gate = Path(os.environ["FLOW_GATE"])
    while gate.exists():
        await asyncio.sleep(0.05)
    answer = await workflow.ask(
        "publish", question="Publish?", schema={"type": "boolean"}, timeout_s=600
    )
    Path(os.environ["FLOW_OUT"]).write_text(json.dumps({"answer": answer}))
"""


def with_password(redis_url: str) -> str:
    """``redis_url`` as a user with a password (an ACL user on the session's server)."""
    with redis.Redis.from_url(redis_url) as client:
        client.acl_setuser(
            "asker", enabled=True, passwords=["+s3cret"], keys=["*"], channels=["*"],
            commands=["+@all"],
        )  # fmt: skip
    return redis_url.replace("redis://", "redis://asker:s3cret@", 1)


@pytest.mark.parametrize("password", [False, True])
def test_an_early_answer_reaches_a_celery_run_with_a_sqlite_journal(
    tmp_path: Path, redis_url: str, password: bool
) -> None:
    """The run logs to Redis but journals (and asks) in SQLite: the early answer goes there.

    With a password on the Redis URL the run index masks it; the dashboard still finds the
    journal (its own settings name it).
    """
    url = with_password(redis_url) if password else redis_url
    local = local_backend(tmp_path, url)  # the default journal: a SQLite file
    options = ["--executor", "celery"]
    backend = Backend("celery-sqlite", local.settings, options, local.counters, tmp_path)
    (tmp_path / "gated.py").write_text(GATED_ASK)
    gate = tmp_path / "gate"
    gate.touch()
    root = f"api-early-celery-sqlite-{password}"
    run = backend.start(root, f"{tmp_path / 'gated.py'}:main", FLOW_GATE=str(gate))
    try:
        with running_dashboard(backend.settings, tmp_path) as dashboard, dashboard.client() as c:
            deadline = time.monotonic() + 30
            while (early := post(c, root, "true")).status_code == 404:
                assert run.poll() is None, run.communicate()
                assert time.monotonic() < deadline, "the dashboard never saw the run"
                time.sleep(0.2)  # the dashboard reads the run's log once a second
            assert early.status_code == 200 and early.json()["state"] == "early", early.text
        kept = backend.ask(root)  # read from the run's SQLite journal, where its host looks
        assert kept is not None and kept.state == "early" and kept.answer is True
        gate.unlink()
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert backend.out() == {"answer": True}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium / chromedriver missing: run scripts/install-browser"
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def ask_form(browser: WebDriver, root: str, what: str, note: str = "") -> WebElement:
    """The question's form on the page once it shows (with ``note`` in its note line)."""
    selector = f"form.ask[data-root-id='{root}']:not(.answered)"

    def shown(b: WebDriver) -> WebElement | bool:
        forms = b.find_elements(By.CSS_SELECTOR, selector)
        return forms[0] if forms and note in forms[0].text else False

    found: WebElement = WebDriverWait(browser, 30, poll_frequency=0.1).until(shown, message=what)
    return found


def approve(browser: WebDriver, form: WebElement, note: str) -> None:
    """Type the note and press Approve; wait until the page says the answer was taken."""
    field = form.find_element(By.NAME, "note")
    field.clear()
    field.send_keys(note)
    form.find_element(By.CSS_SELECTOR, "button[data-choice='true']").click()
    WebDriverWait(browser, 30, poll_frequency=0.1).until(
        lambda b: "answered by fleet" in form.find_element(By.CLASS_NAME, "ask-note").text,
        message="the answer taken",
    )


@pytest.mark.slow
def test_the_approve_button_answers(
    backend: Backend, dashboard: Dashboard, browser: WebDriver
) -> None:
    """Both pages show the question's form; Approve answers; a model's refusal shows why.

    The list page and the workflow's own page show it with a form from its schema; an
    answer the program's model refuses brings the question back with the reason.
    """
    root = f"page-{backend.name}"
    run = backend.start(root)
    base = dashboard.url.replace("http://", f"http://fleet:{PASSWORD}@")
    try:
        wait(waiting_for_answer(backend, root), run, "the ask")
        browser.get(base + "/")
        form = ask_form(browser, root, "the question listed")
        assert "Publish the 3 drafts?" in form.find_element(By.CLASS_NAME, "question").text
        labels = [b.text for b in form.find_elements(By.TAG_NAME, "button")]
        assert labels == ["Approve", "Reject"]

        browser.get(base + f"/workflows/{root}")  # the workflow's own page has the form too
        form = ask_form(browser, root, "the question on the workflow page")
        assert "Publish the 3 drafts?" in form.find_element(By.CLASS_NAME, "question").text
        assert [b.text for b in form.find_elements(By.TAG_NAME, "button")] == labels
        approve(browser, form, "TODO")  # fits the JSON Schema; the program's model refuses it
        taken = form.find_element(By.CLASS_NAME, "ask-note").text
        assert "checks it with its model Approval" in taken
        again = ask_form(browser, root, "the question back", note="not TODO")
        assert "the answer by fleet was not taken" in again.text

        browser.get(base + "/")
        form = ask_form(browser, root, "the question listed again", note="not TODO")
        approve(browser, form, "looks good")
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stdout + stderr
    assert "'publish' answered by fleet" in stdout
    assert backend.out()["approved"] is True and backend.out()["note"] == "looks good"
    assert [backend.runs(root, f"publish{i}") for i in range(2)] == [1, 1]
