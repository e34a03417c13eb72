"""Running a fleet: ``fleet worker``, ``fleet flower`` and ``fleet up``.

``fleet worker`` and ``fleet flower`` replace themselves with the Celery process (so
signals and exit codes are Celery's own), configured from settings; ``fleet up`` runs a
whole :class:`~fleet.localfleet.LocalFleet` (with Flower and ``fleet dashboard``) on this
machine until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

from ..config import FleetSettings
from ..errors import ConfigError
from ..localfleet import LocalFleet
from ..processes import celery_command, settings_env
from ..redis.sentinel import check_redis
from ..runner import REDIS_SCHEMES
from .app import app, console, debugging, err_console, settings

__all__ = ["PoolChoice", "flower", "up", "worker"]


class PoolChoice(StrEnum):
    """The worker pools ``fleet worker`` and ``fleet up`` offer."""

    threads = "threads"
    """Threads in one process: the default; agents mostly wait on I/O."""
    prefork = "prefork"
    """One process per slot: for CPU-bound agents."""


def _exec(args: list[str], env: dict[str, str]) -> NoReturn:
    """Replace this process with ``args`` (flushing our output first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(args[0], args, env)


LLM_CONCURRENCY = 64
"""``fleet worker``'s default ``-c`` with the threads pool: model calls one process keeps
in flight (one shared event loop holds them; a waiting step costs an idle thread)."""

_CONCURRENCY_HELP = (
    "Steps this process runs at once. Default: 64 with --pool threads, the CPU count with "
    "prefork. For agents that wait on a model, -c is the model calls you want in flight per "
    "process: every step's coroutine runs on one shared event loop and a waiting step costs "
    "only an idle thread; an agent starts that wide (at most its max_concurrent, else "
    "256) and backs off when its server signals it takes fewer: timeouts, 429/503, "
    "latency that climbs; size it as "
    "(calls wanted in flight) / (worker processes), "
    "capped by what your model server or rate limit allows at once; add processes when "
    "one process's CPU (a few ms per step) becomes the limit. Agents declared "
    "blocking = true use one of these threads for their whole run. CPU-bound agents: "
    "--pool prefork with -c = cores."
)


@app.command()
def worker(
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", min=1, help=_CONCURRENCY_HELP, show_default=False
    ),
    pool: Annotated[PoolChoice, typer.Option("--pool", help="Worker pool.")] = PoolChoice.threads,
    queues: str | None = typer.Option(
        None, "--queues", "-Q", help="Comma-separated queues to consume (default: the app's)."
    ),
    hostname: str | None = typer.Option(
        None, "--hostname", "-n", help="Node name, e.g. 'worker1@%h' (default: Celery's)."
    ),
    loglevel: str = typer.Option("info", "--loglevel", "-l", help="Celery log level."),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve Prometheus metrics on this port (setting metrics_port).",
    ),
) -> None:
    """Run a Celery worker for the configured broker (FLEET_REDIS_URL / config/fleet.toml).

    Defaults suit agents that wait on a model: the threads pool with 64 steps at once, and
    no mingle or gossip at start (fleet needs neither; they cost every worker messages to
    every other).
    """
    config = settings()
    check_agents_file(config)
    check_broker(config)
    if concurrency is None:
        concurrency = LLM_CONCURRENCY if pool is PoolChoice.threads else os.cpu_count() or 1
    if metrics_port is not None:
        config = config.model_copy(update={"metrics_port": metrics_port})
    args = celery_command(
        "worker",
        f"--pool={pool.value}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--without-mingle",
        "--without-gossip",
    )
    if queues:
        args.append(f"--queues={queues}")
    if hostname:
        args.append(f"--hostname={hostname}")
    err_console.print(
        f"fleet worker: {pool.value} pool x{concurrency} on {config.masked_redis_url()}",
        highlight=False,
        markup=False,
    )
    _exec(args, {**os.environ, **settings_env(config)})


def check_agents_file(config: FleetSettings) -> None:
    """Read the workers' agents file here, so a mistake in it is one line naming it.

    A worker reads it again at start; failing there would print Celery's traceback.

    Raises:
        ConfigError: the file is missing or invalid (file and line named).
    """
    from ..agents import load_agents
    from ..celery import load_stages

    # The workers run `python -m celery` from this directory, so its modules are importable
    # there (as for `fleet run`); the check must find them the same way.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    load_agents(config.agents_file)
    load_stages(config.agents_file)


def check_broker(config: FleetSettings) -> None:
    """Prove the broker answers before Celery starts, or fail with one line naming it.

    Celery would print its banner and then retry an unreachable broker for minutes (a
    sentinel URL that reaches no master, for ever).

    Raises:
        BrokerError: nothing answers at the URL (password masked), with the fix.
        ConfigError: the URL is malformed.
    """
    if config.redis_url.strip().startswith(REDIS_SCHEMES):
        check_redis(config.redis_url)


def flower_auth(config: FleetSettings) -> str:
    """``user:password`` for Flower's basic auth, from settings.

    Raises:
        ConfigError: no password is configured, or the user or password cannot be
            passed to Flower (a ``:`` in the user, a ``,`` in either).
    """
    if not config.flower_password:
        raise ConfigError(
            "Flower needs a password and none is configured: set FLEET_FLOWER_PASSWORD "
            "(or flower_password in the config file); the user is "
            f"{config.flower_user!r} (flower_user)",
            key="flower_password",
        )
    if ":" in config.flower_user or "," in config.flower_user:
        raise ConfigError(
            f"flower_user {config.flower_user!r} may not contain ':' or ','", key="flower_user"
        )
    if "," in config.flower_password:
        raise ConfigError(
            "the Flower password may not contain ',' (Flower splits on it)", key="flower_password"
        )
    return f"{config.flower_user}:{config.flower_password}"


@app.command()
def flower(
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (default: flower_port, 5555)."
    ),
    address: str = typer.Option(
        "127.0.0.1", "--address", help="Address to listen on (0.0.0.0 in a container)."
    ),
) -> None:
    """Run Flower for the configured broker, with basic auth from settings."""
    config = settings()
    auth = flower_auth(config)
    check_broker(config)
    chosen = port or config.flower_port
    args = celery_command("flower", f"--address={address}", f"--port={chosen}")
    err_console.print(
        f"fleet flower: http://{address}:{chosen} for {config.masked_redis_url()} "
        f"(user {config.flower_user!r}, password from flower_password)",
        highlight=False,
        markup=False,
    )
    # The credentials go in the environment, never on a command line `ps` shows.
    _exec(args, {**os.environ, **settings_env(config), "FLOWER_BASIC_AUTH": auth})


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command()
def up(
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Worker processes."),
    concurrency: int = typer.Option(4, "--concurrency", "-c", min=1, help="Steps per worker."),
    pool: Annotated[PoolChoice, typer.Option("--pool", help="Worker pool.")] = PoolChoice.threads,
    with_flower: bool = typer.Option(True, "--flower/--no-flower", help="Also start Flower."),
    flower_port: int | None = typer.Option(
        None, "--flower-port", min=0, max=65535, help="Flower's port (0: any free port)."
    ),
    with_dashboard: bool = typer.Option(
        True, "--dashboard/--no-dashboard", help="Also start the workflow dashboard."
    ),
    dashboard_port: int | None = typer.Option(
        None, "--dashboard-port", min=0, max=65535, help="Dashboard's port (0: any free port)."
    ),
    directory: Annotated[
        Path | None,
        typer.Option(help="Keep Redis data and logs here (default: a temporary dir)."),
    ] = None,
    pidfile: Annotated[
        Path | None, typer.Option(help="Write the PIDs of everything started here (JSON).")
    ] = None,
    ha: bool = typer.Option(
        False,
        "--ha",
        help="A Sentinel-managed Redis instead of one server: 1 master, 1 replica, "
        "3 sentinels on loopback (AOF on both data nodes); prints the sentinel URL.",
    ),
) -> None:
    """Run a local fleet (embedded Redis, workers, Flower, dashboard) until Ctrl-C, then stop it."""
    config = settings()
    check_agents_file(config)
    local = LocalFleet(
        workers=workers,
        concurrency=concurrency,
        pool=pool.value,
        flower=with_flower,
        directory=directory,
        settings=config,
        flower_port=config.flower_port if flower_port is None else flower_port,
        dashboard=with_dashboard,
        dashboard_port=config.dashboard_port if dashboard_port is None else dashboard_port,
        ha=ha,
    )
    # Ctrl-C and SIGTERM both stop the fleet (SIGINT even where a shell started us
    # in the background with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    redis_kind = "a Sentinel group (1 master, 1 replica, 3 sentinels)" if ha else "Redis"
    noun = "worker" if workers == 1 else "workers"
    console.print(f"starting a local fleet: {redis_kind}, {workers} {noun} ...", highlight=False)
    local.start()
    code = 0
    try:
        if pidfile is not None:  # before the "is up" line, so a reader of it finds the file
            _write_pidfile(pidfile, local)
        _announce(local)
        code = _watch(local)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not leave half the fleet running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("stopping the local fleet ...", highlight=False)
        local.stop()
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
        console.print("stopped.", highlight=False)
    raise typer.Exit(code)


def _say(text: str) -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _announce(local: LocalFleet) -> None:
    by_name = {process.name: process.pid for process in local.processes}
    if local.ha:
        redis_pids = ", ".join(
            f"{p.name} pid {p.pid}" for p in local.processes if p.role == "redis"
        )
        _say(f"redis   {local.masked_redis_url}  ({redis_pids})")
    else:
        _say(f"redis   {local.masked_redis_url}  (pid {by_name['redis']})")
    # Quoted: a sentinel URL's ';' would end the command pasted into a shell.
    _say(f"        export FLEET_REDIS_URL={shlex.quote(local.masked_redis_url)}")
    for name in local.worker_names:
        _say(f"worker  {name}  (pid {by_name[name]}, {local.pool} x{local.concurrency})")
    if local.flower_url is not None:
        if local.flower_password_generated:
            hint = (
                f"user {local.flower_user!r}, password {local.flower_password!r} "
                "(made up for this run; set FLEET_FLOWER_PASSWORD to choose one)"
            )
        else:
            hint = f"user {local.flower_user!r}, password from FLEET_FLOWER_PASSWORD"
        _say(f"flower  {local.flower_url}  (pid {by_name['flower']}; {hint})")
    if local.dashboard_url is not None:
        if local.dashboard_password_generated:
            hint = (
                f"user {local.dashboard_user!r}, password {local.dashboard_password!r} "
                "(made up for this run; set FLEET_DASHBOARD_PASSWORD to choose one)"
            )
        else:
            hint = f"user {local.dashboard_user!r}, password from FLEET_DASHBOARD_PASSWORD"
        _say(f"dashboard  {local.dashboard_url}  (pid {by_name['dashboard']}; {hint})")
    _say("fleet is up; press Ctrl-C to stop.")


def _write_pidfile(path: Path, local: LocalFleet) -> None:
    record = {
        "pid": os.getpid(),
        "redis_url": local.masked_redis_url,
        "flower_url": local.flower_url,
        "dashboard_url": local.dashboard_url,
        "processes": [
            {"role": process.role, "name": process.name, "pid": process.pid}
            for process in local.processes
        ],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _watch(local: LocalFleet) -> int:
    """Wait for Ctrl-C; 1 if a part of the fleet dies on its own meanwhile."""
    while True:
        time.sleep(0.5)
        for process, code in local.exited():
            err_console.print(
                f"{process.name} (pid {process.pid}) exited with code {code}: "
                f"{process.last_error()}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            if debugging():
                err_console.print(process.tail(), highlight=False, markup=False)
            return 1
