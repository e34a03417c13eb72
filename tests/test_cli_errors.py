"""What the `fleet` command says when the user's files or places are wrong: one line, exit != 0."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.config import PACKAGED_AGENTS_FILE, load_settings
from fleet.errors import BrokerError
from fleet.localfleet import LocalFleet
from fleet.processes import last_error
from fleet.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]


def fleet(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`fleet ARGS` run from ``tmp_path`` (outside the repository), FLEET_* settings cleared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(REPO), COLUMNS="120", **extra)
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr; fails when there is a traceback or more than one line."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_syntax_error_in_the_workflow_file_is_one_line_with_file_and_line(
    tmp_path: Path,
) -> None:
    """`fleet run bad.py:main` with a syntax error: file:line and the error, no traceback."""
    (tmp_path / "bad.py").write_text("async def main(workflow):\n    x = (\n")
    done = fleet(tmp_path, "run", "bad.py:main")
    assert done.returncode == 2
    line = one_line_error(done)
    assert line.startswith("error: bad.py:2: SyntaxError:"), line
    debug = fleet(tmp_path, "--debug", "run", "bad.py:main")
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "SyntaxError" in debug.stderr


def test_an_error_raised_while_importing_the_program_names_its_line(tmp_path: Path) -> None:
    """A module-level exception in the program is one line naming the file and line."""
    (tmp_path / "flow.py").write_text("import os\n\nVALUE = 1 / 0\n\nasync def main(w): ...\n")
    done = fleet(tmp_path, "run", "flow.py:main")
    assert done.returncode == 2
    assert one_line_error(done).startswith("error: flow.py:3: ZeroDivisionError:")


def test_fleet_worker_with_a_malformed_agents_file_is_one_line(tmp_path: Path) -> None:
    """Invalid TOML in the agents file: `fleet worker` names the file and line, starts nothing."""
    (tmp_path / "bad.toml").write_text('[agents.a]\nkind = "python"\ntarget = \n')
    done = fleet(tmp_path, "worker", FLEET_AGENTS_FILE="bad.toml")
    assert done.returncode == 2
    line = one_line_error(done)
    assert line.startswith("error: bad.toml:3: the agents file is not valid TOML"), line


def test_a_mistyped_key_keeps_the_table_name_and_its_line(tmp_path: Path) -> None:
    """A mistyped key in an [agents.NAME] table: the message shows the table and its line."""
    (tmp_path / "bad.toml").write_text(
        '[agents.parrot]\nkind = "python"\ntarget = "fleet.agents.echo:echo"\n\n'
        '[agents.writer]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'model = "m"\nmax_tokns = 10\n'
    )
    done = fleet(tmp_path, "worker", FLEET_AGENTS_FILE="bad.toml")
    assert done.returncode == 2
    line = one_line_error(done)
    assert line.startswith("error: bad.toml:9: [agents.writer] (kind 'openai') is invalid"), line
    assert "max_tokns" in line


def test_limits_show_without_limits_names_the_table_kind(tmp_path: Path) -> None:
    """`fleet limits show` with no limits says so (exit 0), "[limits.NAME]" as text, not markup."""
    (tmp_path / "agents.toml").write_text("# no limits\n")
    done = fleet(tmp_path, "limits", "show", FLEET_AGENTS_FILE="agents.toml")
    assert done.returncode == 0
    assert "no [limits.NAME] tables in 'agents.toml'" in done.stdout


def _help_pages() -> list[list[str]]:
    from fleet.cli.app import command

    pages: list[list[str]] = [[]]
    root = command()
    for name, sub in root.commands.items():
        pages.append([name])
        for inner in getattr(sub, "commands", {}):
            pages.append([name, inner])
    return pages


def _help(words: list[str]) -> str:
    """The help page of `fleet WORDS --help`, rendered in this process as `fleet` does."""
    from fleet.cli.app import command

    page = io.StringIO()
    with contextlib.redirect_stdout(page):
        code = command().main([*words, "--help"], prog_name="fleet", standalone_mode=False)
    assert code in (0, None), words
    return page.getvalue()


def test_help_pages_show_no_value_for_flags_and_one_argument_style(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No flag shows `<bool>`; every argument reads `{NAME}` or `[NAME]` in capitals."""
    monkeypatch.setenv("COLUMNS", "120")
    pages = _help_pages()
    assert len(pages) > 15
    for words in pages:
        text = _help(words)
        assert "<bool>" not in text, words
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        arguments = usage.split("[OPTIONS]", 1)[-1].replace("COMMAND [ARGS]...", "").split()
        for argument in arguments:
            assert re.fullmatch(r"\{[A-Z_]+\}|\[[A-Z_]+\]", argument), (words, usage)
    assert "--flower" in _help(["up"])  # the pages are really rendered


def test_help_pages_read_as_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reST quoting or swallowed markup: `[limits.NAME]` is shown, a sentence wraps once."""
    monkeypatch.setenv("COLUMNS", "200")
    for words in _help_pages():
        assert "``" not in _help(words), words
    assert "([limits.NAME] in the agents file" in _help(["limits"])
    cancel = " ".join(_help(["cancel"]).split())
    assert "1 when no run of ROOT_ID is going on" in cancel
    assert "(abandoned: no heartbeat)" in cancel


def test_outside_a_checkout_the_packaged_agents_file_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No agents file configured and none in ./config: the one installed with fleet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLEET_AGENTS_FILE", raising=False)
    monkeypatch.delenv("FLEET_CONFIG", raising=False)
    assert load_settings().agents_file == PACKAGED_AGENTS_FILE
    assert PACKAGED_AGENTS_FILE.is_file()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "agents.toml").write_text("")
    assert load_settings().agents_file == Path("config/agents.toml")
    monkeypatch.setenv("FLEET_AGENTS_FILE", "mine.toml")
    assert load_settings().agents_file == Path("mine.toml")


def test_a_part_that_dies_at_start_is_one_line_naming_why(tmp_path: Path) -> None:
    """A worker that cannot start: the fleet's error is its last error line, not a traceback."""
    bad = tmp_path / "agents.toml"
    bad.write_text('[agents.a]\nkind = "python"\ntarget = "no_such_module_here:agent"\n')
    settings = load_settings(agents_file=bad)
    local = LocalFleet(workers=1, flower=False, settings=settings, directory=tmp_path / "fleet")
    with pytest.raises(BrokerError) as caught:
        local.start()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert re.search(
        r"worker1@\S+ \(pid \d+\) exited with code \d+ at start: ConfigError: ", message
    )
    assert "no_such_module_here" in message
    assert 'File "' in (caught.value.detail or "")  # the log's end, for `fleet --debug`


def test_last_error_picks_the_exception_line() -> None:
    """The line that says why is a traceback's last line, without its module path."""
    log = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "    import packaging\nModuleNotFoundError: No module named 'packaging'\n\n"
    )
    assert last_error(log) == "ModuleNotFoundError: No module named 'packaging'"
    assert last_error("fleet.errors.ConfigError: bad\n") == "ConfigError: bad"
    assert last_error("just a line\n") == "just a line"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["run", "flow.py:main", "--store", "redis://:s3cret@127.0.0.1:{port}/0"], "--store"),
        (["run", "flow.py:main", "--executor", "celery"], "FLEET_REDIS_URL"),
        (["status", "r1", "--redis-url", "redis://:s3cret@127.0.0.1:{port}/0"], "--redis-url"),
        (["watch", "r1", "--executor", "celery"], "FLEET_REDIS_URL"),
        (["cancel", "r1", "--executor", "celery"], "FLEET_REDIS_URL"),
    ],
)
def test_an_unreachable_redis_is_one_line_at_once(
    tmp_path: Path, args: list[str], names: str
) -> None:
    """A Redis nobody listens on: found before any step, named (password masked), exit != 0."""
    (tmp_path / "flow.py").write_text(
        "from fleet import AgentStepSpec\n"
        "async def main(workflow):\n"
        "    await workflow.phase('p', [AgentStepSpec(task_id='a', agent='echo',"
        " description='', prompt='hi')])\n"
    )
    port = free_port()
    words = [word.replace("{port}", str(port)) for word in args]
    started = time.monotonic()
    done = fleet(tmp_path, *words, FLEET_REDIS_URL=f"redis://:s3cret@127.0.0.1:{port}/0")
    took = time.monotonic() - started
    assert done.returncode not in (0, None)
    output = done.stdout + done.stderr
    assert "s3cret" not in output
    line = (done.stderr or done.stdout).strip().splitlines()[-1]
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in line, output
    assert names in line
    assert "Traceback" not in output and "phase 0" not in output
    assert took <= 10.0, took  # the documented bound: found before the first step, within 10 s


def test_the_run_summary_counts_truly_and_the_exit_status_says_a_step_failed(
    tmp_path: Path,
) -> None:
    """An unknown agent and a duplicated task id: counted as failed, never as journaled."""
    (tmp_path / "flow.py").write_text(
        "from fleet import AgentStepSpec\n"
        "def spec(task, agent='echo'):\n"
        "    return AgentStepSpec(task_id=task, agent=agent, description='', prompt='hi')\n"
        "async def main(workflow):\n"
        "    await workflow.phase('one', [spec('a', agent='nobody')])\n"
        "    await workflow.phase('two', [spec('b'), spec('c'), spec('c')])\n"
        "    await workflow.agent(spec('d', agent='nobody'))\n"
    )
    done = fleet(tmp_path, "run", "flow.py:main", "--root-id", "counted")
    assert done.returncode == 1, done.stdout + done.stderr
    (summary,) = [line for line in done.stdout.splitlines() if "workflow counted finished" in line]
    assert "finished with 4 failed steps in" in summary, summary
    assert "2 phases, 3 steps run (2 failed), 2 refused before running, 0 served" in summary
    assert "phase 0 one: 1 step\n" in done.stdout


def test_debug_shows_the_traceback_of_a_program_that_raised(tmp_path: Path) -> None:
    """A program that raises: one line by default, its traceback with `fleet --debug`."""
    (tmp_path / "boom.py").write_text("async def main(workflow):\n    raise RuntimeError('boom')\n")
    plain = fleet(tmp_path, "run", "boom.py:main", "--store", "memory")
    assert plain.returncode == 1
    assert one_line_error(plain) == "RuntimeError: boom"
    debug = fleet(tmp_path, "--debug", "run", "boom.py:main", "--store", "memory")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and 'boom.py", line 2' in debug.stderr


@pytest.mark.redis
def test_status_with_executor_celery_names_the_journal_the_run_used(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """A run journaled in Redis: `fleet status --executor celery` reads that journal."""
    (tmp_path / "flow.py").write_text(
        "from fleet import AgentStepSpec\n"
        "async def main(workflow):\n"
        "    await workflow.phase('kept', [AgentStepSpec(task_id='a', agent='echo',"
        " description='', prompt='hi')])\n"
        "    raise RuntimeError('stop here, keep the journal')\n"
    )
    extra = {"FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": key_prefix}
    done = fleet(
        tmp_path, "run", "flow.py:main", "--root-id", "kept-1", "--store", redis_url, **extra
    )
    assert done.returncode == 1, done.stdout + done.stderr
    status = fleet(tmp_path, "status", "kept-1", "--executor", "celery", **extra)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == f"workflow kept-1 (journal {redis_url})"
    assert "phase kept: 1 step journaled" in status.stdout


@pytest.mark.parametrize("command", ["worker", "flower"])
def test_worker_and_flower_with_an_unreachable_broker_stop_at_once(
    tmp_path: Path, command: str
) -> None:
    """The installed `fleet worker`/`fleet flower` on a closed port: one line, exit != 0."""
    port = free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_REDIS_URL=url, FLEET_FLOWER_PASSWORD="pw", COLUMNS="120")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fleet"), command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode not in (0, None)
    line = one_line_error(done)
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in line, line
    assert "FLEET_REDIS_URL" in line and "s3cret" not in done.stdout + done.stderr


def test_a_failed_step_shows_the_message_that_names_the_fix(tmp_path: Path) -> None:
    """`fleet run` and `fleet watch` print why an unknown agent failed; never the prompt."""
    (tmp_path / "flow.py").write_text(
        "from fleet import AgentStepSpec\n"
        "async def main(workflow):\n"
        "    await workflow.phase('p', [AgentStepSpec(task_id='a', agent='revew',"
        " description='', prompt='the private prompt')])\n"
    )
    index = {"FLEET_RUN_INDEX": str(tmp_path / "runs.db")}
    done = fleet(tmp_path, "run", "flow.py:main", "--root-id", "typo-1", **index)
    assert done.returncode == 1, done.stdout + done.stderr
    watched = fleet(tmp_path, "watch", "typo-1", **index)
    for output in (done.stdout, watched.stdout):
        (line,) = [line for line in output.splitlines() if "step a [revew]" in line]
        assert "FAILED (unknown_agent): unknown agent 'revew'; registered agents: " in line
        assert "Register it in the agents file" in line
        assert "the private prompt" not in output
