"""Worker execution for I/O-bound agents: one shared event loop per worker process.

The model server is bench/provider.py in a subprocess; the assertions are counts it
keeps (peak calls in flight, calls answered, clients that hung up), never timings.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.provider import ProviderProcess
from fleet import AgentStepSpec, StepOutcome, execute_steps_parallel
from fleet.agents import AgentRegistry
from fleet.celery import CeleryExecutor
from tests.celery_support import AGENTS_FILE, CeleryWorkers, fleet_settings
from workers import runtime as worker_runtime
from workers.loop import StepEscaped, StepLoop
from workers.runtime import WorkerRuntime

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def agents_file(directory: Path, provider: ProviderProcess) -> Path:
    """The tests' agents plus ``llm`` (an openai agent on the provider) and blocking ones."""
    path = directory / "agents.toml"
    path.write_text(
        AGENTS_FILE.read_text()
        + f'\n[agents.llm]\nkind = "openai"\nbase_url = "{provider.base_url}"\n'
        'model = "bench"\nmax_tokens = 16\nmax_concurrent = 256\n'
        '\n[agents.wait_for_calls]\ntarget = "tests.worker_agents:wait_for_calls"\n'
        "blocking = true\n"
        '\n[agents.hog]\ntarget = "tests.worker_agents:hog"\n'
    )
    return path


def fleet_for(provider: ProviderProcess, redis_url: str, directory: Path) -> CeleryWorkers:
    settings = fleet_settings(
        redis_url,
        agents_file=agents_file(directory, provider),
        claim_timeout_s=4.0,
        step_lease_s=3.0,
        max_in_flight=64,
    )
    return CeleryWorkers(settings, directory)


def steps(n: int, agent: str = "llm", prefix: str = "s", prompt: str = "") -> list[AgentStepSpec]:
    return [
        AgentStepSpec(
            task_id=f"{prefix}{i}", agent=agent, description="t", prompt=prompt or f"q{i}"
        )
        for i in range(n)
    ]


async def stats(provider: ProviderProcess) -> dict[str, Any]:
    return await asyncio.to_thread(provider.stats, log=False)


async def test_one_worker_holds_64_model_calls_in_flight(redis_url: str, tmp_path: Path) -> None:
    """-c 64, 128 steps of 1 s model calls: the provider sees 64 calls at once."""
    with ProviderProcess(latency_s=1.0) as provider:
        fleet = fleet_for(provider, redis_url, tmp_path)
        try:
            fleet.start("worker1", concurrency=64)
            executor = fleet.executor(max_in_flight=64)
            outcomes = await execute_steps_parallel(executor, steps(128))
            await executor.aclose()
        finally:
            fleet.stop()
        seen = await stats(provider)
    assert [o.error for o in outcomes if not o.success] == []
    assert (seen["peak_in_flight"], seen["ok"], seen["requests"]) == (64, 128, 128)


@pytest.fixture(scope="module")
def small_worker(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CeleryWorkers, ProviderProcess]]:
    """One worker with 8 threads, and a provider answering after 0.5 s.

    Its node name is its own: the other tests here start a ``worker1`` while this one
    lives, and a ping to a shared node name would be answered by this worker.
    """
    with ProviderProcess(latency_s=0.5) as provider:
        fleet = fleet_for(provider, redis_url, tmp_path_factory.mktemp("small"))
        try:
            fleet.start("small1", concurrency=8)
            yield fleet, provider
        finally:
            fleet.stop()


async def test_blocking_agent_stalls_only_its_own_threads(
    small_worker: tuple[CeleryWorkers, ProviderProcess],
) -> None:
    """Two steps of a plain blocking agent hold 2 of 8 threads; the other 6 keep calling.

    Each blocking step sleeps until the provider has answered 12 calls, which only the
    other steps of the same worker can make meanwhile: on a stalled loop it would fail.
    """
    fleet, provider = small_worker
    provider.reset()
    waiting = steps(2, "wait_for_calls", "w", prompt=f"{provider.root} 12")
    executor = fleet.executor(max_in_flight=14)
    outcomes = await execute_steps_parallel(executor, [*waiting, *steps(12, prefix="b")])
    await executor.aclose()
    assert [o.error for o in outcomes if not o.success] == []
    assert all(o.output.startswith("saw ") for o in outcomes[:2])
    assert (await stats(provider))["ok"] == 12


async def test_crashing_agent_fails_only_its_own_step(
    small_worker: tuple[CeleryWorkers, ProviderProcess],
) -> None:
    """Steps that crash fail with error "crashed"; the model calls beside them succeed."""
    fleet, provider = small_worker
    executor = fleet.executor(max_in_flight=16)
    mixed = [*steps(4, "boom", "x"), *steps(12, prefix="c")]
    outcomes = await execute_steps_parallel(executor, mixed)
    await executor.aclose()
    assert [o.error for o in outcomes] == ["crashed"] * 4 + [None] * 12
    assert fleet.workers["small1"].process.poll() is None


async def test_agent_hogging_the_shared_loop_is_reported(
    small_worker: tuple[CeleryWorkers, ProviderProcess],
) -> None:
    """An async agent that blocks the shared loop still runs, and the worker log says where."""
    fleet, _ = small_worker
    executor = fleet.executor()
    outcomes = await execute_steps_parallel(
        executor, [*steps(1, "hog", "h", prompt="3"), *steps(3, prefix="d")]
    )
    await executor.aclose()
    assert all(o.success for o in outcomes)
    log = fleet.workers["small1"].log_text()
    assert "blocked this worker's event loop" in log
    assert "worker_agents.py" in log


async def round_with_64_in_flight(
    fleet: CeleryWorkers, provider: ProviderProcess, prefix: str
) -> tuple[CeleryExecutor, asyncio.Task[list[StepOutcome]]]:
    executor = fleet.executor(max_in_flight=64)
    task = asyncio.create_task(execute_steps_parallel(executor, steps(64, prefix=prefix)))
    await provider_until(provider, lambda seen: seen["in_flight"] == 64, "64 calls in flight")
    return executor, task


async def provider_until(provider: ProviderProcess, condition: Any, what: str) -> None:
    """Poll the provider's counters (off the event loop the host runs on) until ``condition``."""
    for _ in range(1200):
        if condition(await stats(provider)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the provider never showed {what}")


async def test_sigterm_drains_64_calls_in_flight(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM with 64 model calls in flight: they finish, are recorded, and the worker exits."""
    with ProviderProcess(latency_s=2.0) as provider:
        fleet = fleet_for(provider, redis_url, tmp_path)
        try:
            (worker,) = fleet.start("worker1", concurrency=64)
            executor, round_ = await round_with_64_in_flight(fleet, provider, "t")
            worker.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.process.wait, 60)
            outcomes = await asyncio.wait_for(round_, timeout=60)
            await executor.aclose()
        finally:
            fleet.stop()
        seen = await stats(provider)
    assert code == 0
    assert [o.error for o in outcomes if not o.success] == []
    assert {o.worker for o in outcomes} == {worker.node}
    assert (seen["ok"], seen["requests"], seen["client_closed"]) == (64, 64, 0)


async def test_sigkill_with_64_calls_in_flight_resends_them(redis_url: str, tmp_path: Path) -> None:
    """SIGKILL with 64 calls in flight: another worker reruns them within the recovery bound."""
    with ProviderProcess(latency_s=2.0) as provider:
        fleet = fleet_for(provider, redis_url, tmp_path)
        try:
            fleet.start("worker1", concurrency=64)
            executor, round_ = await round_with_64_in_flight(fleet, provider, "k")
            await asyncio.to_thread(fleet.kill, "worker1")
            (survivor,) = await asyncio.to_thread(fleet.start, "worker2", concurrency=64)
            settings = executor.settings
            bound = max(settings.claim_timeout_s, settings.step_lease_s) + executor.check_interval_s
            # the bound, plus one 2 s call, plus room for a loaded machine
            outcomes = await asyncio.wait_for(round_, timeout=bound + 2.0 + 30)
            await executor.aclose()
        finally:
            fleet.stop()
        await provider_until(provider, lambda seen: seen["client_closed"] == 64, "64 hang-ups")
        seen = await stats(provider)
    assert [o.error for o in outcomes if not o.success] == []
    assert {o.worker for o in outcomes} == {survivor.node}
    assert (seen["ok"], seen["requests"]) == (64, 128)


def test_steps_share_one_loop_and_an_exiting_step_fails_alone() -> None:
    """Steps from many threads run on one loop; SystemExit in one fails only that one."""
    loop = StepLoop()
    release = threading.Event()

    async def which_loop() -> int:
        await asyncio.to_thread(release.wait, 10)
        return id(asyncio.get_running_loop())

    async def exits() -> None:
        raise SystemExit(3)

    try:
        with ThreadPoolExecutor(16) as pool:
            running = [pool.submit(loop.run, which_loop()) for _ in range(16)]
            with pytest.raises(StepEscaped, match="SystemExit"):
                loop.run(exits())
            release.set()
            loops = {future.result(timeout=10) for future in running}
        assert len(loops) == 1
        assert loop.run(which_loop()) in loops  # still serving after the escape
    finally:
        loop.close()


def test_a_fresh_worker_claims_on_many_threads_at_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first steps of a fresh worker arrive together: none finds a half-built client.

    Binding the Lua scripts to the client is made slow, so that a thread arriving while
    another builds the client would see the client without its scripts (AttributeError).
    """
    real = worker_runtime.script

    def slow_script(name: str) -> Any:
        time.sleep(0.02)
        return real(name)

    monkeypatch.setattr(worker_runtime, "script", slow_script)
    runtime = WorkerRuntime(fleet_settings(redis_url), AgentRegistry(), {})
    start = threading.Barrier(16)

    def claim(i: int) -> str:
        start.wait()
        status, _ = runtime.claim(f"t{i}", "n", runtime.keys.reply("r"), "", [], "n")
        runtime.abandon(f"t{i}")
        return status

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(claim, range(16))) == ["claimed"] * 16


def test_a_step_with_a_done_marker_is_answered_from_it_under_any_send_id(redis_url: str) -> None:
    """A journaled step that finished is not run again when it arrives under a new send id.

    E.g. a resumed host re-sent a step still queued when the old host died, and the old
    copy ran first: the new copy's result key (per send id) is empty and no lease is
    held, so only the done-marker stops it.
    """
    runtime = WorkerRuntime(fleet_settings(redis_url), AgentRegistry(), {})
    recorded = StepOutcome(
        task_id="j1", session_id="s-j1", agent="echo", output="done once", success=True
    ).to_json()
    runtime.redis().hset(runtime.keys.steps("wf"), "done:tid-j1", recorded)
    status, value = runtime.claim("tid-j1", "new-send", runtime.keys.reply("r"), "", [], "wf")
    assert status == "done"
    assert StepOutcome.from_json(value).output == "done once"
    assert not runtime.redis().exists(runtime.keys.lease("tid-j1"))
