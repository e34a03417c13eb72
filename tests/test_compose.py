"""docker-compose.yml and Dockerfile refer to real modules, commands and config files.

There is no Docker daemon in the test environment, so the compose file is parsed and
every piece it names is checked against the repository: each ``fleet ...`` command is
parsed by the real CLI, each ``-A`` app and ``python -c`` snippet is imported/compiled,
each mounted path exists, the settings the services get load, and the Redis
configuration is run by a real ``redis-server``.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import typer.main
import yaml

from fleet.cli import app as cli_app
from fleet.config import FleetSettings, load_settings
from fleet.redis_server import find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {"REDIS_PASSWORD": "s3cret-for-test", "FLOWER_PASSWORD": "flower-pw"}
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::([?-])([^}]*))?\}|\$(\w+)")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        found = env.get(name, "")
        if match.group(2) == "?" and not found:
            raise MissingVariable(f"{name}: {match.group(3)}")
        if match.group(2) == "-" and not found:
            return match.group(3)
        return found

    return _VARIABLE.sub(substitute, value)


def load_compose(env: Mapping[str, str] = ENV) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {key: value for key, value in interpolate(raw, env).items() if not key.startswith("x-")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def container_to_host(path: str, service: dict[str, Any]) -> Path:
    """The repository path a container path maps to through the service's bind mounts."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(".") and (path == target or path.startswith(target + "/")):
            return ROOT / source / path[len(target) :].lstrip("/")
    raise AssertionError(f"{path} is not mounted from the repository in {service}")


def parse_fleet_command(argv: list[str]) -> Any:
    """Parse ``fleet ...`` with the real CLI (unknown commands or options fail)."""
    assert argv[0] == "fleet"
    group = typer.main.get_command(cli_app)
    name, *rest = argv[1:]
    commands: dict[str, Any] = getattr(group, "commands", {})
    assert name in commands, f"`fleet {name}` is not a fleet command"
    return commands[name].make_context(name, list(rest))


def test_services_and_scaling(compose: dict[str, Any]) -> None:
    """Redis, worker and flower exist; the worker can be scaled (no fixed name, no host port)."""
    services = compose["services"]
    assert {"redis", "worker", "flower"} <= set(services)
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    for name in ("worker", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    # Flower is published on loopback only.
    assert all(port.startswith("127.0.0.1:") for port in services["flower"]["ports"])


def test_passwords_come_from_the_environment() -> None:
    """Without REDIS_PASSWORD or FLOWER_PASSWORD the compose file refuses to render."""
    for missing in ENV:
        with pytest.raises(MissingVariable, match=missing):
            load_compose({key: value for key, value in ENV.items() if key != missing})
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ENV.values():
        assert secret not in text


def test_fleet_commands_parse_with_the_real_cli(compose: dict[str, Any]) -> None:
    """Each service command is a fleet command the CLI accepts, with the options given."""
    worker = parse_fleet_command(compose["services"]["worker"]["command"])
    assert worker.params["pool"].value == "threads"
    assert worker.params["hostname"] == "worker@%h"
    flower = parse_fleet_command(compose["services"]["flower"]["command"])
    assert flower.params["address"] == "0.0.0.0"
    assert flower.params["port"] == 5555


def test_flower_has_basic_auth(compose: dict[str, Any]) -> None:
    """Flower gets its user and password from settings, which `fleet flower` requires."""
    from fleet.cli.fleetops import flower_auth

    service = compose["services"]["flower"]
    env = service["environment"]
    assert env["FLEET_FLOWER_PASSWORD"] == ENV["FLOWER_PASSWORD"]
    config = load_settings(
        flower_user=env["FLEET_FLOWER_USER"], flower_password=env["FLEET_FLOWER_PASSWORD"]
    )
    assert flower_auth(config) == f"fleet:{ENV['FLOWER_PASSWORD']}"
    compile(service["healthcheck"]["test"][-1], "<flower healthcheck>", "exec")


def service_settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> FleetSettings:
    """The settings a service's process reads: its FLEET_* variables, files via its mounts."""
    for name in FleetSettings.model_fields:
        monkeypatch.delenv(f"FLEET_{name.upper()}", raising=False)
    env = dict(service["environment"])
    for key in ("FLEET_CONFIG", "FLEET_AGENTS_FILE"):
        host_path = container_to_host(env[key], service)
        assert host_path.is_file(), f"{key}={env[key]} maps to missing {host_path}"
        env[key] = str(host_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_services_are_configured_from_config_dir(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers and Flower read config/fleet.toml and config/agents.toml, and both load."""
    from fleet.agents import load_agents

    for name in ("worker", "flower"):
        config = service_settings(compose["services"][name], monkeypatch)
        assert config.redis_url == f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/0"
        assert config.store.startswith("redis://")
        assert load_agents(config.agents_file), "the agents file defines no agents"


def test_worker_app_is_json_only(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The app the worker (and its healthcheck) loads accepts JSON and nothing else."""
    service = compose["services"]["worker"]
    config = service_settings(service, monkeypatch)
    app_module = re.search(r"-A (\S+)", service["healthcheck"]["test"][-1])
    assert app_module is not None
    module = importlib.import_module(app_module.group(1))
    celery_app = module.create_app(config)
    conf = celery_app.conf
    assert list(conf.accept_content) == ["json"]
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.result_accept_content or conf.accept_content) == ["json"]
    assert "fleet.run_step" in celery_app.tasks


def test_dockerfile_copies_real_paths_and_runs_fleet() -> None:
    """Every COPY source exists; the image's default command is a fleet command."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    cmd = next(line for line in lines if line.startswith("CMD "))
    parse_fleet_command(yaml.safe_load(cmd.removeprefix("CMD ")))


def test_fleet_toml_names_only_real_settings() -> None:
    """config/fleet.toml has no key that FleetSettings would silently ignore."""
    keys = set(tomllib.loads((ROOT / "config" / "fleet.toml").read_text()))
    assert keys <= set(FleetSettings.model_fields)
    assert "flower_password" not in keys  # secrets stay out of the repository


@pytest.fixture
def compose_redis(tmp_path: Path, compose: dict[str, Any]) -> Iterator[redis.Redis]:
    """A real redis-server run with the compose service's config file and password flag."""
    service = compose["services"]["redis"]
    script = service["command"][-1]
    argv = shlex.split(script.replace('"$REDIS_PASSWORD"', shlex.quote(ENV["REDIS_PASSWORD"])))
    assert argv[:2] == ["exec", "redis-server"]
    conf = container_to_host(argv[2], service)
    port = free_port()
    process = subprocess.Popen(
        [find_redis_server(), str(conf), *argv[3:]]
        + ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=ENV["REDIS_PASSWORD"], decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, "redis-server rejected config/redis.conf"
                assert time.monotonic() < deadline
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def test_redis_has_aof_and_a_password(compose_redis: redis.Redis) -> None:
    """Redis as compose runs it: AOF on with fsync every second, no eviction, auth required."""
    config = compose_redis.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["protected-mode"] == "yes"
    port = compose_redis.connection_pool.connection_kwargs["port"]
    anonymous = redis.Redis(port=port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
