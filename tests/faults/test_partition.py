"""Partitions: a worker cut off from Redis (or paused) stops spending, and nothing it does counts.

A bounded trial of the set-append workload of :mod:`tests.faults.partition` (the long
trials are ``python -m bench.partition``): rounds of budgeted, journaled steps on three
workers while a nemesis cuts, delays and blackholes one worker's link to Redis, pauses
another longer than the lease and restarts Redis. Every round must pass the checker:
every step succeeded, the journal holds one attempt per step and it is the one the host
was answered with, no attempt started and no model call began after its lease lapsed,
the budget charged exactly what the attempts used and holds nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.partition import Shape, run_trial
from tests.faults.support import SUMMARY

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.faults, pytest.mark.slow]


@pytest.mark.timeout(400)
async def test_partitions_pauses_and_restarts_leave_one_counted_attempt_per_step(
    tmp_path: Path,
) -> None:
    """Under cut, delayed, blackholed links, paused workers and Redis restarts: every check holds."""
    tally = await run_trial(tmp_path, Shape(duration_s=35.0))
    line = f"faults: partition 1/1 trials passed\n  trial 1: {tally.line()}"
    SUMMARY.append(line)
    print(line)
    assert len(tally.faults) >= 5, "the nemesis injected fewer faults than one of each kind"
    assert tally.stopped > 0, "no attempt was stopped on a lapsed lease: the trial proves nothing"
