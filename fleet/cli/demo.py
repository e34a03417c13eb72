"""``fleet demo``: the bundled code-review workflow, with live progress and a summary."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from ..demo import DEFAULT_LLM_CONCURRENCY, DemoReport, run_demo
from ..events import StepFinished, StepStarted
from ..executor import AgentExecutor
from ..local import LocalExecutor
from .app import app, console, settings

__all__ = ["Progress"]

DEFAULT_STEPS = 8
"""Steps at once by default."""


@dataclass
class Progress:
    """Counts step events and renders them (live on a terminal, plain lines otherwise)."""

    started: float = field(default_factory=time.monotonic)
    running: int = 0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    cost_usd: Decimal | None = None
    """What priced model calls cost; ``None`` while no step reported a cost."""
    last: str = ""
    live: Live | None = None
    _next_line: float = 0.0

    def __call__(self, event: Any) -> None:
        """Take one workflow event (this object is an ``EventSink``)."""
        if isinstance(event, StepStarted):
            self.running += 1
            self.last = event.task_id
        elif isinstance(event, StepFinished):
            self.running -= 1
            self.done += 1
            self.failed += not event.success
            self.tokens += event.total_tokens
            if event.cost_usd is not None:
                self.cost_usd = (self.cost_usd or Decimal(0)) + event.cost_usd
        if self.live is not None:
            self.live.update(self.render())
        elif time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + 1.0
            console.print(self.line(), highlight=False)

    def line(self) -> str:
        """One plain progress line."""
        return (
            f"[{time.monotonic() - self.started:6.2f}s] steps done {self.done} "
            f"(failed {self.failed}), running {self.running}, tokens {self.tokens}"
            + ("" if self.cost_usd is None else f", cost ${self.cost_usd}")
        )

    def render(self) -> Table:
        """The live progress panel."""
        table = Table.grid(padding=(0, 2))
        table.add_row("[bold]fleet demo[/]", f"{time.monotonic() - self.started:5.2f} s")
        table.add_row("steps", f"{self.done} done, {self.failed} failed, {self.running} running")
        table.add_row("tokens", str(self.tokens))
        if self.cost_usd is not None:
            table.add_row("cost", f"${self.cost_usd}")
        table.add_row("last", self.last)
        return table


def _summary(report: DemoReport, progress: Progress, wall_s: float) -> None:
    table = Table(title="review verdicts", title_justify="left")
    for column in ("file", "verdict", "score", "auto-fix rounds", "plan"):
        table.add_column(column)
    colours = {"approve": "green", "revise": "yellow", "reject": "red"}
    for path, verdict in report.verdicts.items():
        colour = colours.get(verdict["verdict"], "white")
        table.add_row(
            path,
            f"[{colour}]{verdict['verdict']}[/]",
            str(verdict["score"]),
            str(report.fixed_files.get(path, 0)),
            "\n".join(report.plans.get(path, [])) or "-",
        )
    for path, reason in report.incomplete.items():
        table.add_row(path, "[magenta]incomplete[/]", "-", "-", reason)
    console.print(table)
    console.print(
        f"[bold]{progress.done} steps[/]: {progress.done - progress.failed} succeeded, "
        f"{progress.failed} failed; {report.fix_rounds} fix round(s); "
        f"{progress.tokens} tokens; "
        + ("" if progress.cost_usd is None else f"cost ${progress.cost_usd}; ")
        + f"wall time {wall_s:.2f} s",
        highlight=False,
    )
    if report.incomplete:
        console.print(
            f"[bold red]{len(report.incomplete)} file(s) incomplete[/]: their reviews failed, "
            "so they have no verdict (a failed review is not a clean one)",
            highlight=False,
        )


def _exit_status(report: DemoReport, progress: Progress) -> None:
    """Exit non-zero when any step failed."""
    if progress.failed or report.failed:
        raise typer.Exit(1)


async def _run(executor: AgentExecutor, progress: Progress) -> DemoReport:
    return await run_demo(executor, events=progress)


def _demo_on_fleet(*, workers: int, concurrency: int) -> None:
    import tempfile
    from pathlib import Path

    from ..celery import CeleryExecutor
    from ..demo import DEMO_AGENT_TARGETS
    from ..localfleet import LocalFleet

    with tempfile.TemporaryDirectory(prefix="fleet-demo-") as directory:
        agents_file = Path(directory) / "agents.toml"
        agents_file.write_text(
            "".join(
                f'[agents.{name}]\nkind = "python"\ntarget = "{target}"\n\n'
                for name, target in DEMO_AGENT_TARGETS.items()
            ),
            encoding="utf-8",
        )
        base = settings(agents_file=agents_file, max_in_flight=concurrency * workers)
        console.print(f"starting a local fleet: Redis, {workers} worker(s), Flower ...")
        with LocalFleet(
            workers=workers, concurrency=concurrency, directory=Path(directory) / "fleet",
            settings=base,
        ) as local:  # fmt: skip
            console.print(
                f"local fleet ready: Redis {local.masked_redis_url}, workers "
                f"{', '.join(local.worker_names)}, Flower {local.flower_url} "
                f"(user {local.flower_user!r}, password {local.flower_password!r})",
                highlight=False,
            )
            executor = CeleryExecutor(settings=local.settings)
            progress = Progress()
            started = time.monotonic()
            report = asyncio.run(_run(executor, progress))
            console.print(progress.line(), highlight=False)
            _summary(report, progress, time.monotonic() - started)
            ran_on = sorted({o.worker or "?" for o in report.outcomes})
            console.print(f"steps ran on: {', '.join(ran_on)}", highlight=False)
        console.print("local fleet stopped")
    _exit_status(report, progress)


@app.command()
def demo(
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        "-c",
        min=1,
        help=f"Steps at once (default {DEFAULT_STEPS}). With --llm, also the most model calls "
        f"in flight to the server (default {DEFAULT_LLM_CONCURRENCY}, which a one-slot local "
        "server survives; fewer while the server slows down).",
    ),
    llm: str | None = typer.Option(
        None,
        "--llm",
        metavar="BASE_URL",
        help="Review with a chat model on this OpenAI-compatible server "
        "(e.g. http://127.0.0.1:8000/v1) instead of the offline reviewers.",
    ),
    model: str | None = typer.Option(None, "--model", help="The model name (with --llm)."),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="Environment variable holding the API key (with --llm)."
    ),
    fleet: bool = typer.Option(
        False,
        "--fleet",
        help="Run on a real local fleet: an embedded Redis, worker processes and Flower, "
        "started and stopped by this command.",
    ),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Worker processes (--fleet)."),
) -> None:
    """Run the bundled code-review workflow on the embedded default (no services needed).

    Exits with status 1 when any step failed; a file whose reviews failed is reported
    ``incomplete``, never judged as clean.
    """
    from ..demo import DEMO_AGENTS, llm_reviewers

    if fleet:
        if llm is not None:
            raise typer.BadParameter(
                "--llm runs in-process only; on a fleet, declare the model as an agent in the "
                "workers' agents file (see docs/AGENTS.md)"
            )
        _demo_on_fleet(workers=workers, concurrency=concurrency or DEFAULT_STEPS)
        return

    agents: dict[str, Any] = dict(DEMO_AGENTS)
    if llm is not None:
        if not model:
            raise typer.BadParameter("--llm needs --model NAME (the model the server knows)")
        agents.update(
            llm_reviewers(
                llm,
                model,
                api_key_env=api_key_env,
                max_concurrent=concurrency or DEFAULT_LLM_CONCURRENCY,
            )
        )
    elif model or api_key_env:
        raise typer.BadParameter("--model and --api-key-env only make sense with --llm BASE_URL")
    executor = LocalExecutor(agents=agents, max_concurrency=concurrency or DEFAULT_STEPS)
    progress = Progress()
    started = time.monotonic()
    console.print(
        f"reviewing the bundled sample project with {len(agents)} agents on {executor!r}",
        highlight=False,
    )
    if console.is_terminal:
        with Live(progress.render(), console=console, refresh_per_second=12) as live:
            progress.live = live
            report = asyncio.run(_run(executor, progress))
            progress.live = None
    else:
        report = asyncio.run(_run(executor, progress))
        console.print(progress.line(), highlight=False)
    _summary(report, progress, time.monotonic() - started)
    _exit_status(report, progress)
