"""`fleet dashboard`'s JSON API and pages over real run logs (Redis stream and SQLite file)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet import AgentExecutor, AgentStepSpec, StepOutcome, Workflow
from fleet.agents.echo import echo_usage
from fleet.config import FleetSettings
from fleet.dashboard.data import Catalog
from fleet.dashboard.metrics import MAX_LABEL_VALUES, render_metrics
from fleet.dashboard.views import WorkflowView, public_status
from fleet.events import EventSink, RateLimited, StepFinished, StepStarted, emit
from fleet.runner import open_run, plan_run
from fleet.stores import sqlite_path
from tests.dashboard_support import (
    Dashboard,
    dashboard_env,
    run_phases,
    running_dashboard,
    steps,
)

pytestmark = [pytest.mark.redis]

AGENTS = {
    "echo_secret": "fleet.agents.echo:echo",
    "spend": "tests.agents:spend",
    "fail": "tests.agents:fail",
    "sleep_prompt": "tests.agents:sleep_prompt",
}
SECRET = f"prompt-text-{uuid.uuid4().hex}"
WRITE = steps("write", "echo_secret", [f"{SECRET}-{i}" for i in range(2)])


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Path:
    return tmp_path_factory.mktemp("dashboard")


@pytest.fixture(scope="module")
def settings(place: Path, redis_url: str) -> FleetSettings:
    prefix = f"fleet-test-{uuid.uuid4().hex[:10]}"
    return FleetSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        store=f"sqlite:{place / 'journal.db'}",
        run_index=place / "runs.db",
        agents_file=place / "none.toml",
    )


@pytest.fixture(scope="module")
def local_run(settings: FleetSettings) -> str:
    """A finished local run logged in the journal's SQLite file: 3 done, 1 failed."""
    root_id = f"local-{uuid.uuid4().hex[:8]}"
    phases = [
        ("write", WRITE),
        ("check", steps("check", "spend", ["40"]) + steps("bad", "fail", ["x"])),
    ]
    ended = asyncio.run(
        run_phases(
            settings, root_id, phases, executor="local", budget_tokens=100_000, agents=AGENTS
        )
    )
    assert ended == "finished"
    return root_id


@pytest.fixture(scope="module")
def redis_run(settings: FleetSettings) -> str:
    """A finished run whose journal (and so its log) is the fleet's Redis."""
    root_id = f"redis-{uuid.uuid4().hex[:8]}"
    shared = settings.model_copy(update={"store": settings.redis_url})
    phases = [("only", steps("spend", "spend", ["7", "8"]))]
    ended = asyncio.run(run_phases(shared, root_id, phases, executor="local", agents=AGENTS))
    assert ended == "finished"
    return root_id


@pytest.fixture(scope="module")
def dashboard(
    settings: FleetSettings, place: Path, local_run: str, redis_run: str
) -> Iterator[Dashboard]:
    with running_dashboard(
        settings, place, FLEET_DASHBOARD_FLOWER_URL="http://127.0.0.1:5555"
    ) as running:
        yield running


def get(dashboard: Dashboard, path: str) -> httpx.Response:
    with dashboard.client() as client:
        return client.get(path)


def test_list_shows_runs_from_sqlite_and_redis_with_counts(
    dashboard: Dashboard, local_run: str, redis_run: str
) -> None:
    """/api/workflows lists both runs with status, step counts and tokens."""
    response = get(dashboard, "/api/workflows")
    assert response.status_code == 200
    rows = {row["root_id"]: row for row in response.json()}
    local, shared = rows[local_run], rows[redis_run]
    assert (local["status"], local["steps_done"], local["steps_failed"]) == ("finished", 3, 1)
    assert local["steps_in_flight"] == 0
    echoed = sum(echo_usage(spec).total_tokens for spec in WRITE)
    assert local["tokens"] == 40 + echoed
    assert local["budget"]["limit_tokens"] == 100_000
    assert local["source"].startswith("sqlite:")
    assert (shared["status"], shared["steps_done"], shared["tokens"]) == ("finished", 2, 15)
    assert shared["source"].startswith("redis://")
    finished = get(dashboard, "/api/workflows?status=finished").json()
    assert {local_run, redis_run} <= {row["root_id"] for row in finished}
    assert get(dashboard, "/api/workflows?status=running").json() == []


def test_workflow_detail_has_phases_in_order_with_steps(
    dashboard: Dashboard, local_run: str
) -> None:
    """/api/workflows/{id} gives each phase's steps: agent, status, worker, tokens, error."""
    body = get(dashboard, f"/api/workflows/{local_run}").json()
    assert [phase["name"] for phase in body["phases"]] == ["write", "check"]
    check = {step["task_id"]: step for step in body["phases"][1]["steps"]}
    assert check["check-1"]["tokens"] == 40
    assert check["check-1"]["status"] == "done"
    assert check["check-1"]["worker"] == "local"
    assert (check["bad-1"]["status"], check["bad-1"]["error"]) == ("failed", "failed")
    assert check["bad-1"]["agent"] == "fail"
    assert all(step["flower"] is None for step in check.values())  # in-process: no task
    assert body["logs"] is None  # text is off by default


def test_no_prompt_or_output_text_anywhere(
    dashboard: Dashboard, local_run: str, redis_run: str
) -> None:
    """The prompt (which the echo agent also returns as output) is on no page or API answer."""
    paths = ["/", f"/workflows/{local_run}", "/api/workflows", f"/api/workflows/{local_run}"]
    for path in paths:
        response = get(dashboard, path)
        assert response.status_code == 200, path
        assert SECRET not in response.text, path
        assert "dash-test-pw" not in response.text, path


def test_pages_render_the_workflow(dashboard: Dashboard, local_run: str) -> None:
    """The list and workflow pages are server-rendered HTML naming the run and its steps."""
    index = get(dashboard, "/")
    assert "text/html" in index.headers["content-type"]
    assert f'data-root-id="{local_run}"' in index.text
    page = get(dashboard, f"/workflows/{local_run}")
    assert 'data-task-id="bad-1"' in page.text and "Cancel workflow" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")


def test_wrong_or_missing_password_is_401(dashboard: Dashboard) -> None:
    """Basic auth guards pages and API alike; /healthz answers without it."""
    for auth in [None, ("fleet", "wrong"), ("other", "dash-test-pw")]:
        for path in ["/", "/api/workflows", "/static/workflow.js"]:
            response = httpx.get(dashboard.url + path, auth=auth, timeout=5)
            assert response.status_code == 401, (auth, path)
            assert response.headers["www-authenticate"].startswith("Basic")
    garbled = httpx.get(
        dashboard.url + "/api/workflows", headers={"Authorization": "Basic %%%"}, timeout=5
    )
    assert garbled.status_code == 401
    assert httpx.get(dashboard.url + "/healthz", timeout=5).text == "ok"


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/api/workflows/no-such-run", 404, "no workflow 'no-such-run'"),
        ("/api/workflows/%01bad", 400, "malformed root id"),
        ("/api/workflows/" + "x" * 300, 400, "malformed root id"),
        ("/api/workflows/%00/events", 400, "malformed root id"),
        ("/api/workflows/nope/events", 404, "no workflow"),
        ("/api/workflows?limit=" + "9" * 5000, 400, "limit must be a whole number"),
        ("/api/workflows?limit=0", 400, "limit must be"),
        ("/api/workflows?limit=-5", 400, "limit must be"),
        ("/api/workflows?limit=1e3", 400, "limit must be"),
        ("/api/workflows?status=" + "z" * 5000, 400, "status must be one of"),
        ("/api/nothing-here", 404, "Not Found"),
    ],
)
def test_bad_api_input_is_a_4xx_json_error(
    dashboard: Dashboard, path: str, status: int, words: str
) -> None:
    """Unknown and malformed ids and huge query values: 4xx JSON naming the problem."""
    response = get(dashboard, path)
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["error"]
    assert "Traceback" not in response.text and len(response.text) < 1000


def test_huge_url_is_refused_without_a_traceback(dashboard: Dashboard) -> None:
    """A request line far beyond any real one gets a 4xx from the server, not a crash."""
    response = get(dashboard, "/api/workflows?status=" + "q" * 60_000)
    assert 400 <= response.status_code < 500
    assert "Traceback" not in response.text
    assert get(dashboard, "/api/workflows").status_code == 200  # still serving


def test_cancel_refuses_forms_and_finished_runs(dashboard: Dashboard, local_run: str) -> None:
    """Cancel wants JSON (no cross-site form can send it) and a running workflow."""
    with dashboard.client() as client:
        form = client.post(f"/api/workflows/{local_run}/cancel", data={"reason": "x"})
        assert form.status_code == 415
        done = client.post(f"/api/workflows/{local_run}/cancel", json={})
        assert done.status_code == 409 and "not running" in done.json()["error"]
        bad = client.post(f"/api/workflows/{local_run}/cancel", json={"reason": 5})
        assert bad.status_code == 400
        missing = client.post("/api/workflows/never-ran/cancel", json={})
        assert missing.status_code == 404
        assert client.get(f"/api/workflows/{local_run}/cancel").status_code == 405


def test_cancel_stops_a_running_local_workflow(
    dashboard: Dashboard, settings: FleetSettings
) -> None:
    """POST cancel on a live local run (SQLite board): it ends cancelled, later steps never run."""
    root_id = f"long-{uuid.uuid4().hex[:8]}"
    phases = [("nap", steps("nap", "sleep_prompt", ["30"])), ("after", steps("a", "spend", ["1"]))]
    ended: list[str] = []
    runner = threading.Thread(
        target=lambda: ended.append(
            asyncio.run(run_phases(settings, root_id, phases, executor="local", agents=AGENTS))
        )
    )
    runner.start()
    try:
        with dashboard.client() as client:
            deadline = time.monotonic() + 30
            while client.get(f"/api/workflows/{root_id}").status_code != 200:
                assert time.monotonic() < deadline, "the run never appeared"
                time.sleep(0.1)
            while client.get(f"/api/workflows/{root_id}").json()["steps_in_flight"] != 1:
                assert time.monotonic() < deadline, "the step never started"
                time.sleep(0.1)
            answer = client.post(f"/api/workflows/{root_id}/cancel", json={"reason": "test"})
            assert answer.status_code == 202, answer.text
            runner.join(timeout=20)
            assert not runner.is_alive()
            body = client.get(f"/api/workflows/{root_id}").json()
    finally:
        runner.join(timeout=60)
    assert body["status"] == "cancelled"
    assert body["cancel_reason"] == "test"
    assert [phase["name"] for phase in body["phases"]] == ["nap"]
    assert body["phases"][0]["steps"][0]["status"] == "failed"
    assert ended and ended[0] != "finished"


def test_step_output_is_hidden_unless_turned_on(dashboard: Dashboard, local_run: str) -> None:
    """/api/workflows/{id}/steps/{task} gives the step; its output only with show_text."""
    body = get(dashboard, f"/api/workflows/{local_run}/steps/write-1").json()
    assert (body["task_id"], body["phase"], body["status"]) == ("write-1", "write", "done")
    assert body["output"] is None and "hidden" in body["output_note"]
    assert SECRET not in json.dumps(body)
    assert get(dashboard, f"/api/workflows/{local_run}/steps/nope").status_code == 404
    assert get(dashboard, f"/api/workflows/{local_run}/steps/%01").status_code == 400


def test_show_text_shows_journaled_outputs_and_logs(settings: FleetSettings, place: Path) -> None:
    """With dashboard_show_text on, a kept journal's outputs and the log lines are shown."""
    root_id = f"kept-{uuid.uuid4().hex[:8]}"

    async def closed_run() -> None:
        places = plan_run(settings, executor="local")
        async with open_run(settings, places, root_id=root_id, agents=AGENTS) as builder:
            workflow = builder.build()
            await workflow.phase("write", steps("w", "echo_secret", ["visible words"]))
            workflow.log("info", "wrote the draft")
            await workflow.close()  # not finished: the journal stays

    asyncio.run(closed_run())
    with running_dashboard(settings, place, FLEET_DASHBOARD_SHOW_TEXT="true") as shown:
        step = get(shown, f"/api/workflows/{root_id}/steps/w-1").json()
        assert step["output"] == "visible words"
        body = get(shown, f"/api/workflows/{root_id}").json()
        assert body["logs"] == [{"level": "info", "message": "wrote the draft", "fields": {}}]
        assert body["status"] == "finished" and body["ended_as"] == "closed"
        page = get(shown, f"/workflows/{root_id}").text
        assert 'data-show-text="on"' in page and 'id="logs"' in page


def test_metrics_have_bounded_labels(dashboard: Dashboard, local_run: str) -> None:
    """/metrics counts workflows by status and steps by agent and error kind."""
    text = get(dashboard, "/metrics").text
    assert 'fleet_workflows{status="cancelled"}' in text
    assert 'fleet_steps{agent="fail",status="failed"} 1' in text
    assert 'fleet_steps_failed{agent="fail",error="failed"} 1' in text
    assert 'fleet_step_tokens{agent="spend"}' in text
    assert SECRET not in text
    assert httpx.get(dashboard.url + "/metrics", timeout=5).status_code == 401


def test_metrics_fold_rare_label_values_into_other() -> None:
    """More agents than MAX_LABEL_VALUES: the rarest share the label value 'other'."""
    views = []
    for i in range(MAX_LABEL_VALUES + 5):
        view = fold(
            entries({"type": "step_finished", "task_id": "t", "agent": f"a{i}", "success": True})
        )
        views.append(view)
    text = render_metrics(views)
    agents = {
        line.split('agent="')[1].split('"')[0]
        for line in text.splitlines()
        if "fleet_steps{" in line
    }
    assert len(agents) == MAX_LABEL_VALUES + 1 and "other" in agents


def test_dashboard_without_a_password_refuses_to_start(
    settings: FleetSettings, place: Path
) -> None:
    """`fleet dashboard` with no password exits non-zero naming FLEET_DASHBOARD_PASSWORD."""
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "dashboard", "--port", "1"],
        env=dashboard_env(settings),
        cwd=place,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "FLEET_DASHBOARD_PASSWORD" in result.stderr


class _LimitedExecutor(AgentExecutor):
    """Runs every step at once; its model call waited 0.25 s for a provider limit."""

    async def execute_step(
        self, spec: AgentStepSpec, events: EventSink | None = None
    ) -> StepOutcome:
        emit(events, StepStarted(task_id=spec.task_id, agent=spec.agent))
        emit(events, RateLimited(limit="openai", wait_s=0.25, task_id=spec.task_id))
        outcome = StepOutcome(
            task_id=spec.task_id, session_id="s", agent=spec.agent, output="", success=True
        )
        emit(events, StepFinished.of(outcome))
        return outcome


def test_rate_limit_waits_reach_the_run_log_and_the_view(settings: FleetSettings) -> None:
    """A host's rate_limited event is logged with the run and shown on the step and workflow."""
    root_id = f"limited-{uuid.uuid4().hex[:8]}"

    async def limited_run() -> None:
        workflow = (
            Workflow.builder(_LimitedExecutor())
            .with_root_id(root_id)
            .with_event_stream(f"sqlite:{sqlite_path(settings.store)}")
            .build()
        )
        async with workflow:
            await workflow.phase("call", steps("c", "any", ["x", "y"]))

    asyncio.run(limited_run())
    catalog = Catalog(settings)
    try:
        view = catalog.refresh(root_id)
    finally:
        catalog.close()
    assert view is not None
    assert view.summary(now=0.0)["rate_limited"] == {"count": 2, "wait_s": 0.5}
    assert [step.rate_wait_s for step in view.steps()] == [0.25, 0.25]


# --- folding, without a server -----------------------------------------------------------


def entries(*events: dict[str, Any], end: str | None = None) -> list[dict[str, str]]:
    rows = [{"event": json.dumps(event)} for event in events]
    if end is not None:
        rows.append({"control": "end", "status": end, "at": "20.0"})
    return rows


def fold(rows: list[dict[str, str]]) -> WorkflowView:
    view = WorkflowView(root_id="r", source="test", run_id="x", started_at=10.0)
    for row in rows:
        view.fold(row, now=15.0)
    return view


def test_fold_counts_money_rate_limits_and_cancel() -> None:
    """Optional fields (cost_usd, rate_limited, workflow_cancelled) show when present."""
    view = fold(
        entries(
            {"type": "phase_start", "name": "p", "index": 0, "step_count": 2},
            {"type": "step_started", "task_id": "a", "agent": "w", "host_task_id": "fs-1"},
            {"type": "step_started", "task_id": "b", "agent": "w"},
            {"type": "rate_limited", "limit": "openai", "wait_s": 1.5, "task_id": "a"},
            {
                "type": "step_finished",
                "task_id": "a",
                "agent": "w",
                "success": True,
                "total_tokens": 12,
                "cost_usd": "0.000150",
                "worker": "w1@h",
            },
            {"type": "workflow_cancelled", "reason": "stop"},
            end="cancelled",
        )
    )
    summary = view.summary(now=30.0)
    assert summary["status"] == "cancelled" and summary["cancel_reason"] == "stop"
    assert (summary["steps_done"], summary["steps_failed"], summary["tokens"]) == (1, 1, 12)
    assert summary["cost_usd"] == "0.000150" and summary["duration_s"] == 10.0
    assert summary["rate_limited"] == {"count": 1, "wait_s": 1.5}
    detail = view.detail(now=30.0, flower_url="http://f:1/", show_text=False)
    a, b = detail["phases"][0]["steps"]
    assert a["flower"] == "http://f:1/task/fs-1" and a["rate_wait_s"] == 1.5
    assert (b["status"], b["error"], b["flower"]) == ("failed", "cancelled", None)


def test_fold_steps_outside_phases_and_journal_served_steps() -> None:
    """Steps outside phases group under one row; a finish without a start still counts."""
    view = fold(
        entries(
            {"type": "step_finished", "task_id": "j", "agent": "w", "success": True},
            {"type": "phase_start", "name": "p", "index": 0, "step_count": 1},
            {"type": "step_started", "task_id": "k", "agent": "w"},
            {"type": "phase_end", "name": "p", "index": 0, "succeeded": 0, "failed": 0},
        )
    )
    detail = view.detail(now=12.0, flower_url=None, show_text=True)
    assert [phase["name"] for phase in detail["phases"]] == ["(outside phases)", "p"]
    assert detail["status"] == "running" and detail["steps_in_flight"] == 1
    assert detail["logs"] == []


@pytest.mark.parametrize(
    ("ended_as", "cancelled", "failed", "expected"),
    [
        (None, False, 0, "running"),
        ("finished", False, 0, "finished"),
        ("closed", False, 0, "finished"),
        ("closed", False, 2, "failed"),
        ("failed", False, 0, "failed"),
        ("cancelled", False, 0, "cancelled"),
        (None, True, 0, "cancelled"),
    ],
)
def test_public_status(ended_as: str | None, cancelled: bool, failed: int, expected: str) -> None:
    """A run's end maps to one of running / finished / cancelled / failed."""
    assert public_status(ended_as, cancelled, failed) == expected


def test_a_running_step_shows_its_worker() -> None:
    """A step that started on a worker names it while it runs, not only once it ends."""
    view = fold(
        entries(
            {"type": "phase_start", "name": "p", "index": 0, "step_count": 1},
            {"type": "step_started", "task_id": "a", "agent": "w", "worker": "worker1@h"},
        )
    )
    (step,) = view.detail(now=12.0, flower_url=None, show_text=False)["phases"][0]["steps"]
    assert (step["status"], step["worker"]) == ("running", "worker1@h")


def test_the_page_says_what_is_limited_and_that_it_ran_out(
    settings: FleetSettings, dashboard: Dashboard
) -> None:
    """A dollar-only run that hit its limit: the gauge says so, in dollars, never 'no budget'."""
    root_id = f"dollars-{uuid.uuid4().hex[:8]}"
    phases = [("buy", steps("buy", "pay", ["2", "2", "2", "2"]))]
    ended = asyncio.run(
        run_phases(
            settings,
            root_id,
            phases,
            executor="local",
            agents={"pay": "tests.agents:pay"},
            budget_usd=Decimal(5),
        )
    )
    assert ended == "finished"
    body = get(dashboard, f"/api/workflows/{root_id}").json()
    assert body["budget"]["limit_usd"] == "5.000000" and body["budget"]["is_exhausted"]
    page = get(dashboard, f"/workflows/{root_id}").text
    gauge = page[page.index('id="gauge-text"') :].split("</span>")[0]
    assert "budget exhausted: $5.000000 of $5.000000" in gauge, gauge
    assert "no budget" not in gauge
    assert "4 / 4 steps finished" in page


def test_the_page_formats_long_durations_whole() -> None:
    """Past a minute a duration reads in whole seconds, rounded once: never '1 min 60 s'."""
    from jinja2 import Environment, FileSystemLoader

    templates = Path(__file__).resolve().parents[1] / "fleet" / "dashboard" / "templates"
    macros = Environment(loader=FileSystemLoader(templates)).get_template("macros.html").module
    shown = {s: str(macros.duration(s)) for s in (9.5, 59.97, 119.6, 3725.2)}  # type: ignore[attr-defined]
    assert shown == {9.5: "9.50 s", 59.97: "1 min 0 s", 119.6: "2 min 0 s", 3725.2: "1 h 2 min 5 s"}
