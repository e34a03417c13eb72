"""Shared fixtures: a real redis-server for the session, unique key prefixes per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings  # also imports hypothesis at collection: see below

from fleet.redis_server import RedisServer

# hypothesis's pytest plugin imports hypothesis lazily, in the terminal summary; after a
# long session CPython 3.11.7 can then fail to compile it (pytest's assertion rewriting)
# with "SystemError: AST constructor recursion depth mismatch" and exit 1 although every
# test passed. Importing it here, at collection, compiles it while the counters are sane.

# No per-example deadline: hypothesis's default (200 ms) is a timing assertion, and on a
# shared 2-core runner an example that writes a file or parses a megabyte can take longer
# without anything being wrong. Timings belong in bench/, never in a test's verdict.
settings.register_profile("fleet", deadline=None)
settings.load_profile("fleet")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis: ``FLEET_TEST_REDIS_URL`` if set, else a server this session starts."""
    external = os.environ.get("FLEET_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix no other test uses (tests never flush a shared server)."""
    return f"fleet-test-{uuid.uuid4().hex[:12]}"
