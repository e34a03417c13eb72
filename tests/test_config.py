"""Settings: config/fleet.toml < FLEET_* environment < explicit overrides; clear errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleet.config import FleetSettings, load_settings, mask_url
from fleet.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_file_matches_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """config/fleet.toml documents exactly the built-in defaults, key for key."""
    monkeypatch.setenv("FLEET_CONFIG", str(ROOT / "config" / "fleet.toml"))
    for name in FleetSettings.model_fields:
        monkeypatch.delenv(f"FLEET_{name.upper()}", raising=False)
    from_file = load_settings()
    defaults = FleetSettings.model_construct()
    for name in FleetSettings.model_fields:
        assert getattr(from_file, name) == getattr(defaults, name), name


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEET_* variables override the TOML file; explicit overrides win over both."""
    config = tmp_path / "fleet.toml"
    config.write_text('redis_url = "redis://file:6379/0"\nmax_in_flight = 7\n')
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    monkeypatch.setenv("FLEET_MAX_IN_FLIGHT", "9")
    loaded = load_settings()
    assert loaded.redis_url == "redis://file:6379/0"
    assert loaded.max_in_flight == 9
    assert load_settings(max_in_flight=3).max_in_flight == 3


def test_bad_values_name_the_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value of the wrong type fails at start, naming the key and its FLEET_ variable."""
    monkeypatch.setenv("FLEET_MAX_IN_FLIGHT", "lots")
    with pytest.raises(ConfigError, match=r"max_in_flight \(FLEET_MAX_IN_FLIGHT\)"):
        load_settings()


def test_missing_config_file_named_by_fleet_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEET_CONFIG naming a missing file is an error that says so."""
    monkeypatch.setenv("FLEET_CONFIG", "/nonexistent/fleet.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_masked_url_hides_the_password() -> None:
    """Passwords never appear in URLs fleet prints."""
    assert mask_url("redis://:s3cret@host:6380/1") == "redis://:***@host:6380/1"
    assert mask_url("rediss://user:s3cret@host/0") == "rediss://user:***@host/0"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=12)
positive_s = st.floats(0.001, 1e6, allow_nan=False)
bad_scalars = st.sampled_from(["lots", [1, 2], {"a": 1}])

VALID: dict[str, st.SearchStrategy[Any]] = {
    "redis_url": st.sampled_from(["redis://10.0.0.1:6380/2", "rediss://u:pw@cache/0"]),
    "key_prefix": names,
    "agents_file": st.sampled_from(["agents.toml", "/etc/fleet/agents.toml"]),
    "store": st.sampled_from(["memory", "sqlite:j.db", "redis://h/0"]),
    "run_index": st.sampled_from(["runs.db", "/var/lib/fleet/runs.db"]),
    "default_reserve_tokens": st.integers(0, 10**9),
    "budget_lease_s": positive_s,
    "queue": names,
    "max_in_flight": st.integers(1, 10**6),
    "queue_high_water": st.integers(1, 10**6),
    "claim_timeout_s": positive_s,
    "step_lease_s": positive_s,
    "result_expires_s": st.integers(60, 10**9),
    "retention_s": st.integers(1, 10**9),
    "event_stream_maxlen": st.integers(100, 10**9),
    "flower_port": st.integers(1, 65535),
    "flower_user": names,
    "flower_password": names,
    "metrics_port": st.integers(0, 65535),
    "metrics_host": st.sampled_from(["127.0.0.1", "0.0.0.0", "metrics.internal"]),
    "dashboard_port": st.integers(1, 65535),
    "dashboard_user": names,
    "dashboard_password": names,
    "dashboard_flower_url": st.sampled_from(["http://127.0.0.1:5555", "https://flower.example"]),
    "dashboard_show_text": st.booleans(),
    "dashboard_show_output": st.booleans(),
}
"""A valid value for every setting (a test below checks that none is missing)."""

INVALID: dict[str, st.SearchStrategy[Any]] = {
    **{name: st.integers() | st.sampled_from([[1], {"a": 1}]) for name in VALID},
    **{
        name: bad_scalars | st.floats(-1e6, 0)
        for name in ("budget_lease_s", "claim_timeout_s", "step_lease_s")
    },
    "default_reserve_tokens": bad_scalars | st.integers(max_value=-1) | st.just(1.5),
    "max_in_flight": bad_scalars | st.integers(max_value=0),
    "queue_high_water": bad_scalars | st.integers(max_value=0),
    "result_expires_s": bad_scalars | st.integers(max_value=59),
    "retention_s": bad_scalars | st.integers(max_value=0),
    "event_stream_maxlen": bad_scalars | st.integers(max_value=99),
    "flower_port": bad_scalars | st.integers(max_value=0) | st.integers(min_value=65536),
    "metrics_port": bad_scalars | st.integers(max_value=-1) | st.integers(min_value=65536),
    "dashboard_port": bad_scalars | st.integers(max_value=0) | st.integers(min_value=65536),
    "dashboard_show_text": st.sampled_from([[1], {"a": 1}, "maybe", 2, -1]),
    "dashboard_show_output": st.sampled_from([[1], {"a": 1}, "maybe", 2, -1]),
}
"""A value of the wrong type or out of range for every setting."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_doc(values: dict[str, Any]) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


@st.composite
def config_files(draw: st.DrawFn) -> tuple[str, dict[str, Any], str | None]:
    """A config file's text, the settings it sets validly, and the one it sets wrongly (if any)."""
    good = draw(st.fixed_dictionaries({}, optional=VALID))
    bad = draw(st.none() | st.sampled_from(sorted(INVALID)))
    values = dict(good)
    if bad is not None:
        good.pop(bad, None)
        values[bad] = draw(INVALID[bad])
    return toml_doc(values), good, bad


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in FleetSettings.model_fields:
        monkeypatch.delenv(f"FLEET_{name.upper()}", raising=False)
    return monkeypatch


def test_the_generators_cover_every_setting() -> None:
    """The valid and invalid value tables name every setting fleet has."""
    assert set(VALID) == set(INVALID) == set(FleetSettings.model_fields)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=config_files())
def test_config_file_loads_its_values_or_names_the_bad_key(
    case: tuple[str, dict[str, Any], str | None],
    tmp_path_factory: pytest.TempPathFactory,
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Valid settings load as written; one bad value fails naming that key and its variable."""
    text, good, bad = case
    path = tmp_path_factory.mktemp("cfg") / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    clean_env.setenv("FLEET_CONFIG", str(path))
    if bad is not None:
        with pytest.raises(ConfigError) as caught:
            load_settings()
        assert f"{bad} (FLEET_{bad.upper()})" in str(caught.value)
        return
    loaded = load_settings()
    defaults = FleetSettings.model_construct()
    for name in FleetSettings.model_fields:
        expected = good.get(name, getattr(defaults, name))
        if isinstance(getattr(defaults, name), Path):
            expected = Path(expected)
        assert getattr(loaded, name) == expected, name


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
@example(text="[[[")
@example(text="redis_url = 5")
@example(text="max_in_flight = -1")
@example(text='claim_timeout_s = "soon"')
@example(text="\x00")
@example(text="# only a comment\n")
def test_any_config_file_loads_or_raises_a_fleet_error_naming_it(
    text: str, tmp_path_factory: pytest.TempPathFactory, clean_env: pytest.MonkeyPatch
) -> None:
    """Whatever is in the file: not TOML fails saying so; TOML loads or names a bad key in it."""
    path = tmp_path_factory.mktemp("cfg") / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    clean_env.setenv("FLEET_CONFIG", str(path))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        with pytest.raises(ConfigError, match="cannot read fleet settings"):
            load_settings()
        return
    known = set(document) & set(FleetSettings.model_fields)
    try:
        loaded = load_settings()
    except ConfigError as error:
        named = [key for key in known if f"{key} (FLEET_{key.upper()})" in str(error)]
        assert named, str(error)
        return
    unset = set(FleetSettings.model_fields) - known
    defaults = FleetSettings.model_construct()
    assert all(getattr(loaded, name) == getattr(defaults, name) for name in unset)
