"""Agents declared ``blocking = true`` in the agents file: plain functions run in a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fleet import AgentStepSpec, LocalExecutor, load_agents
from fleet.errors import ConfigError


def write(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(f'[agents.plain]\ntarget = "tests.worker_agents:thread_name"\n{table}')
    return path


async def test_plain_function_declared_blocking_runs_in_a_thread(tmp_path: Path) -> None:
    """A plain function with blocking = true runs, off the event loop's thread."""
    agents = load_agents(write(tmp_path, "blocking = true\n"))
    assert agents["plain"].blocking
    executor = LocalExecutor(agents=agents)
    spec = AgentStepSpec(task_id="a", agent="plain", description="d", prompt="p")
    outcome = await executor.execute_step(spec)
    assert outcome.success
    assert outcome.output != threading.current_thread().name


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("", "blocking = true"),
        ("blocking = 'yes'", "blocking must be true or false, got 'yes'"),
    ],
)
def test_plain_function_needs_blocking_true(tmp_path: Path, table: str, message: str) -> None:
    """Without blocking = true a plain function is refused; blocking must be a boolean."""
    with pytest.raises(ConfigError, match=message):
        load_agents(write(tmp_path, table))


def test_a_mistyped_key_of_a_python_agent_is_named_at_its_line(tmp_path: Path) -> None:
    """A typo in a python agent's table names the key, its line and the likely fix."""
    path = tmp_path / "agents.toml"
    path.write_text('[agents.plain]\ntraget = "tests.worker_agents:thread_name"\n')
    with pytest.raises(ConfigError) as raised:
        load_agents(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:2: [agents.plain] has unknown key 'traget'")
    assert "did you mean 'target'?" in message
