"""The dashboard's live output of a step: SSE resumable by Last-Event-ID, and in a real browser.

Over Redis, a real Celery worker running streaming steps, and ``fleet dashboard``
subprocesses with and without ``FLEET_DASHBOARD_SHOW_OUTPUT=1``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from fleet import AgentStepSpec
from fleet.config import FleetSettings
from tests.celery_support import CeleryWorkers, fleet_settings, running_workers
from tests.dashboard_support import PASSWORD, Dashboard, run_phases, running_dashboard
from tests.test_dashboard_browser import browser, open_from_list, step_states, wait
from tests.test_deltastream import log_skewed_runs

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(300)]

__all__ = ["browser"]  # the fixture, shared with the dashboard's other browser test

WORDS = " ".join(f"w{i}" for i in range(40))


def spec(task_id: str, prompt: str) -> AgentStepSpec:
    return AgentStepSpec(task_id=task_id, agent="stream_words", description="d", prompt=prompt)


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("live")


@pytest.fixture(scope="module")
def settings(redis_url: str, place: Path) -> FleetSettings:
    return fleet_settings(
        redis_url, store=f"sqlite:{place / 'journal.db'}", run_index=place / "runs.db"
    )


@pytest.fixture(scope="module")
def workers(settings: FleetSettings, place: Path) -> Iterator[CeleryWorkers]:
    with running_workers(settings, place, "worker1", concurrency=4) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def dashboard(settings: FleetSettings, place: Path) -> Iterator[Dashboard]:
    with running_dashboard(settings, place, FLEET_DASHBOARD_SHOW_OUTPUT="1") as running:
        yield running


def run(settings: FleetSettings, root_id: str, prompt: str) -> threading.Thread:
    phases = [("talk", [spec("s1", prompt), spec("s2", "quiet one")])]
    thread = threading.Thread(
        target=lambda: asyncio.run(run_phases(settings, root_id, phases, executor="celery")),
        daemon=True,
    )
    thread.start()
    return thread


def sse(
    dashboard: Dashboard, path: str, *, last_id: str | None = None, limit: int | None = None
) -> list[tuple[str, str, Any]]:
    """``(id, event, data)`` of the SSE events at ``path`` (the first ``limit`` deltas)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events: list[tuple[str, str, Any]] = []
    with dashboard.client() as client, client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, response.read()
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
                continue
            if "data" in fields:
                events.append(
                    (fields.get("id", ""), fields.get("event", ""), json.loads(fields["data"]))
                )
                if events[-1][1] == "end" or (limit and len(events) >= limit):
                    break
            fields = {}
    return events


def test_live_output_resumes_from_last_event_id_without_gaps_or_repeats(
    dashboard: Dashboard, workers: CeleryWorkers, settings: FleetSettings, place: Path
) -> None:
    """A reader that reconnects with its last id gets the rest, and the whole joins to the text."""
    root_id = f"live-{uuid.uuid4().hex[:6]}"
    run(settings, root_id, "40/0.03").join(timeout=60)
    path = f"/api/workflows/{root_id}/steps/s1/live"
    whole = sse(dashboard, path)
    assert whole[-1][1] == "end"
    deltas = [event for event in whole if event[1] == "delta"]
    assert "".join(data["text"] for _, _, data in deltas) == WORDS
    first = sse(dashboard, path, limit=3)
    rest = sse(dashboard, path, last_id=first[-1][0])
    resumed = [event for event in first + rest if event[1] == "delta"]
    assert [event[0] for event in resumed] == [event[0] for event in deltas]
    assert "quiet" not in json.dumps(whole)  # another step's text is not in this one's


def test_live_output_starts_on_redis_clock_not_the_hosts(
    dashboard: Dashboard, settings: FleetSettings
) -> None:
    """A run whose host clock is 2 minutes ahead shows all its text; an earlier run's none."""
    root_id = f"skewed-{uuid.uuid4().hex[:6]}"
    log_skewed_runs(settings.redis_url, settings.key_prefix, root_id)
    events = sse(dashboard, f"/api/workflows/{root_id}/steps/s/live")
    assert events[-1][1] == "end"
    text = "".join(data["text"] for _, kind, data in events if kind == "delta")
    assert text == "the new run's whole text"


def test_live_output_is_refused_unless_the_operator_turns_it_on(
    workers: CeleryWorkers, settings: FleetSettings, place: Path
) -> None:
    """Without FLEET_DASHBOARD_SHOW_OUTPUT the live route answers 403 and the page has no box."""
    root_id = f"hidden-{uuid.uuid4().hex[:6]}"
    run(settings, root_id, "5/0.01").join(timeout=60)
    with running_dashboard(settings, place) as hidden, hidden.client() as client:
        answer = client.get(f"/api/workflows/{root_id}/steps/s1/live")
        assert answer.status_code == 403
        assert "FLEET_DASHBOARD_SHOW_OUTPUT" in answer.json()["error"]
        assert 'data-show-output="off"' in client.get(f"/workflows/{root_id}").text


def live_text(browser: WebDriver) -> str:
    """The step panel's live-output box as shown (it is redrawn on every update)."""
    script = "const box = document.getElementById('step-live'); return box ? box.innerText : '';"
    return str(browser.execute_script(script))


def test_the_step_panel_shows_live_text_in_a_real_browser(
    browser: WebDriver, dashboard: Dashboard, workers: CeleryWorkers, settings: FleetSettings
) -> None:
    """Open a streaming step's panel: its text grows while it runs and ends as its output."""
    base = dashboard.url.replace("http://", f"http://fleet:{PASSWORD}@")
    browser.get(base + "/")
    root_id = f"page-{uuid.uuid4().hex[:6]}"
    thread = run(settings, root_id, "40/0.15")
    open_from_list(browser, root_id)
    wait(browser, "s1 running", lambda b: step_states(b, "s1") == ["running"])
    # One script: the table is redrawn on every update, so a found row can go stale.
    browser.execute_script("document.querySelector(\"tr.step[data-task-id='s1']\").click()")
    wait(browser, "some live text", lambda b: "w3" in live_text(b))
    assert step_states(browser, "s1") == ["running"]  # seen while the step still ran
    thread.join(timeout=60)
    wait(browser, "the whole text", lambda b: live_text(b) == WORDS)
