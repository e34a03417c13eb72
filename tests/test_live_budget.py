"""The run log carries the budget while a long phase runs, not only at its end.

The dashboard's gauge reads the log's budget entries: with readings only at phase ends, a
phase of hour-long steps showed nothing spent until it ended.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from fleet import AgentStepSpec
from fleet.agents import AgentContext
from fleet.config import FleetSettings
from fleet.runlog import open_log_reader
from fleet.runsummary import summarize
from tests.celery_support import until
from tests.dashboard_support import run_phases, steps


def budget_entries(journal: Path, root_id: str) -> list[dict[str, str]]:
    """Every budget entry of the newest run of ``root_id``, in log order."""
    reader = open_log_reader(f"sqlite:{journal}")
    cursor = reader.last_start(root_id)
    if cursor is None:
        return []
    entries = []
    while page := reader.after(root_id, cursor, wait_s=0.0):
        for entry in page:
            cursor = entry.cursor
            if entry.fields.get("control") == "budget":
                entries.append(dict(entry.fields))
    return entries


async def test_the_budget_is_logged_while_a_phase_runs_and_counted_once(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    settings = FleetSettings(
        store=f"sqlite:{journal}", run_index=tmp_path / "runs.db", agents_file=tmp_path / "no.toml"
    )
    release = asyncio.Event()

    async def wait(spec: AgentStepSpec, ctx: AgentContext) -> str:
        await release.wait()
        return "done"

    root_id = f"live-{uuid.uuid4().hex[:8]}"
    phase = steps("spend", "spend", ["40"]) + steps("wait", "wait", ["-"])
    run = asyncio.create_task(
        run_phases(
            settings,
            root_id,
            [("long", phase)],
            executor="local",
            budget_tokens=10_000,
            agents={"spend": "tests.agents:spend", "wait": wait},
        )
    )

    def live_consumed() -> int | None:
        for entry in reversed(budget_entries(journal, root_id)):
            return int(json.loads(entry["snapshot"])["consumed_tokens"])
        return None

    try:
        # One step spent 40, the other still runs: the log says 40 before the phase ends.
        await until(lambda: live_consumed() == 40, 15.0, "a budget reading during the phase")
        assert not run.done(), run.result()
        entries = budget_entries(journal, root_id)
        assert entries[-1].get("live") == "1", entries
    finally:
        release.set()
    assert await run == "finished"
    summary = summarize(open_log_reader(f"sqlite:{journal}"), root_id)
    assert summary is not None
    assert summary.consumed_tokens == 40  # the live reading is not added to the step's tokens
