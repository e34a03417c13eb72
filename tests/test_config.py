"""Settings: config/fleet.toml < FLEET_* environment < explicit overrides; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleet.config import FleetSettings, load_settings, mask_url
from fleet.errors import ConfigError, FleetError

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


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
@example(text="[[[")
@example(text="redis_url = 5")
@example(text="max_in_flight = -1")
@example(text='claim_timeout_s = "soon"')
@example(text="\x00")
def test_any_config_file_loads_or_raises_a_fleet_error(
    text: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever is in the config file, loading it works or raises a FleetError."""
    path = tmp_path_factory.mktemp("cfg") / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("FLEET_CONFIG", str(path))
    try:
        load_settings()
    except FleetError:
        pass
