"""Settings: ``config/fleet.toml`` holds the defaults, ``FLEET_*`` environment variables win.

Read once at the edge (CLI, worker start, ``CeleryExecutor(redis_url=None)``) with
:func:`load_settings` and passed down; nothing in the library reads the environment
behind your back. A bad value fails at start with the key's name and expected type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .redis.sentinel import is_sentinel, parse_sentinel_url
from .urls import mask_url

__all__ = [
    "DEFAULT_AGENTS_FILE",
    "DEFAULT_CONFIG_FILE",
    "PACKAGED_AGENTS_FILE",
    "FleetSettings",
    "load_settings",
    "mask_url",
]

DEFAULT_CONFIG_FILE = Path("config/fleet.toml")
"""Where settings are read from unless ``FLEET_CONFIG`` names another file."""

DEFAULT_AGENTS_FILE = Path("config/agents.toml")
"""The agents file, relative to the current directory, unless a setting names another."""

PACKAGED_AGENTS_FILE = Path(__file__).resolve().parent / "agents" / "default.toml"
"""The agents file installed with fleet: used when no agents file is configured and the
current directory has no ``config/agents.toml`` (``fleet up`` run outside a checkout)."""


class FleetSettings(BaseSettings):
    """Every setting fleet reads, with its default."""

    model_config = SettingsConfigDict(
        env_prefix="FLEET_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Broker, result backend, journal and budget store of a fleet (``redis://``,
    ``rediss://`` or a Sentinel URL ``sentinel://h:p;sentinel://h:p/DB?master_name=NAME``;
    password in the URL)."""
    key_prefix: str = "fleet"
    """Prefix of every Redis key fleet writes."""
    agents_file: Path = DEFAULT_AGENTS_FILE
    """The agents file (TOML, ``[agents.NAME]`` tables). Unset, and with no
    ``config/agents.toml`` in the current directory: the one installed with fleet
    (:data:`PACKAGED_AGENTS_FILE`: the built-in agents only)."""
    store: str = "sqlite:.fleet/journal.db"
    """The journal: ``memory``, ``sqlite:PATH`` or a ``redis://`` / ``rediss://`` URL."""
    run_index: Path = Path(".fleet/runs.db")
    """Where ``fleet run`` notes the places of each root id (never a password), so a bare
    ``fleet status ROOT`` / ``fleet watch ROOT`` finds a run whatever journal it used."""
    default_reserve_tokens: int = Field(default=1000, ge=0)
    """Reservation for a step with no ``max_tokens`` whose agent names no default."""
    budget_lease_s: float = Field(default=30.0, gt=0)
    """A reservation's lease: a dead holder's tokens return to the budget after this."""
    queue: str = "fleet.steps"
    """The Celery queue steps are sent to."""
    max_in_flight: int = Field(default=64, ge=1)
    """Steps of one workflow queued or running at once on the fleet."""
    queue_high_water: int = Field(default=1000, ge=1)
    """Dispatch pauses while the step queue is deeper than this."""
    claim_timeout_s: float = Field(default=15.0, gt=0)
    """A step no worker has claimed or finished within this is re-sent under the same id."""
    step_lease_s: float = Field(default=10.0, gt=0)
    """A worker's claim on a step; renewed while the step runs."""
    result_expires_s: int = Field(default=3600, ge=60)
    """How long a step's result is kept when no host reads it (a host that reads it keeps it
    only :data:`~fleet.celery.protocol.RESULT_GRACE_S` more), and how long a round outside
    any workflow remembers its finished steps to refuse late duplicates: longer than the
    broker's visibility timeout (900 s), after which Redis redelivers an unacked message."""
    retention_s: int = Field(default=7 * 86400, ge=1)
    """How long Redis keeps an ended workflow's records (events, budget, run record,
    journals, done-markers): seven days, as Temporal's default namespace retention.
    ``FLEET_RETENTION_S``; see ``docs/SCALING.md``."""
    event_stream_maxlen: int = Field(default=10000, ge=100)
    """Events kept per workflow in its event log (Redis stream or SQLite table)."""
    flower_port: int = Field(default=5555, ge=1, le=65535)
    """Port Flower listens on (loopback)."""
    flower_user: str = "fleet"
    """Flower basic-auth user."""
    flower_password: str | None = None
    """Flower basic-auth password (``FLEET_FLOWER_PASSWORD``); Flower refuses to start
    without one."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """A worker serves Prometheus metrics at ``http://metrics_host:PORT/metrics`` (off when
    unset; ``fleet worker --metrics-port``)."""
    metrics_host: str = "127.0.0.1"
    """Address the worker's metrics endpoint binds (``0.0.0.0`` for a remote Prometheus)."""
    dashboard_port: int = Field(default=8080, ge=1, le=65535)
    """Port ``fleet dashboard`` listens on."""
    dashboard_user: str = "fleet"
    """Dashboard basic-auth user."""
    dashboard_password: str | None = None
    """Dashboard basic-auth password (``FLEET_DASHBOARD_PASSWORD``); the dashboard refuses
    to start without one."""
    dashboard_flower_url: str | None = None
    """Flower's address as a browser reaches it (``http://127.0.0.1:5555``); when set, each
    step on the dashboard links to its task in Flower."""
    dashboard_show_text: bool = False
    """Let the dashboard show step outputs (from the journal) and workflow log lines; off,
    it shows no prompt or output text at all."""
    dashboard_show_output: bool = False
    """Let the dashboard's step panel show a fleet run's live output (its output deltas,
    ``FLEET_DASHBOARD_SHOW_OUTPUT=1``); outputs can be sensitive, and prompts are never shown."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments, then ``FLEET_*`` variables, then the TOML file."""
        toml_file = Path(os.environ.get("FLEET_CONFIG", DEFAULT_CONFIG_FILE))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    @model_validator(mode="before")
    @classmethod
    def _packaged_agents_file(cls, data: Any) -> Any:
        """Outside a checkout, a worker still finds an agents file: the packaged one."""
        if isinstance(data, dict) and data.get("agents_file") is None:
            if not DEFAULT_AGENTS_FILE.is_file():
                return {**data, "agents_file": PACKAGED_AGENTS_FILE}
        return data

    @field_validator("redis_url")
    @classmethod
    def _sentinel_url_names_a_master(cls, url: str) -> str:
        if is_sentinel(url):
            parse_sentinel_url(url)  # ConfigError (a ValueError): names the fix
        return url

    def masked_redis_url(self) -> str:
        """The Redis URL with its password masked."""
        return mask_url(self.redis_url)


def load_settings(**overrides: Any) -> FleetSettings:
    """Read settings (``overrides`` > ``FLEET_*`` > ``config/fleet.toml`` > defaults).

    Raises:
        ConfigError: a value has the wrong type or the config file is not valid TOML;
            the message names the key and what it expects.
    """
    config = os.environ.get("FLEET_CONFIG")
    if config and not Path(config).is_file():
        raise ConfigError(
            f"FLEET_CONFIG names {config!r}, which does not exist; fix the path or unset it",
            key="FLEET_CONFIG",
        )
    try:
        return FleetSettings(**overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])} (FLEET_"
            f"{str(item['loc'][0]).upper()}): {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid fleet settings: {problems}") from None
    except ValueError as error:  # e.g. the TOML file does not parse
        raise ConfigError(f"cannot read fleet settings: {error}") from None
