"""Per-step overhead of fleet's local host versus a bare semaphore-bounded asyncio.gather.

10,000 steps of a no-op python agent through ``execute_steps_parallel`` on
``LocalExecutor`` (hint 64), and the same agent coroutine called through a bare
``asyncio.gather`` bounded by a semaphore of 64, in one run, several repetitions;
medians reported. Target: overhead ≤ 30 µs per step.

With ``opentelemetry`` installed (``fleet[otel]``) a third side runs the same steps with
tracing on, under one phase span, exporting over OTLP/HTTP to a loopback receiver
(:mod:`bench.otlp_receiver`, its own process); its time includes flushing every span.
Target: tracing adds ≤ 30 µs per step, and tracing off costs what it did before.

    python -m bench.local_overhead [--steps 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import time
from typing import Any

from bench._common import median, table, write
from fleet import AgentContext, AgentStepSpec, LocalExecutor, execute_steps_parallel, telemetry

HINT = 64
TRACED = "fleet LocalExecutor, tracing on (OTLP loopback)"
SDK = "OpenTelemetry SDK alone, 1 span/step (same export)"
SDK_BARE = "OpenTelemetry SDK alone, 1 span/step, not exported"


async def noop(spec: AgentStepSpec, ctx: AgentContext) -> str:
    """The no-op agent both sides run."""
    return ""


async def bare(specs: list[AgentStepSpec]) -> float:
    """The floor: the agent coroutine through a semaphore-bounded gather."""
    semaphore = asyncio.Semaphore(HINT)

    async def one(spec: AgentStepSpec) -> str:
        async with semaphore:
            return await noop(spec, AgentContext(spec=spec))

    started = time.perf_counter()
    await asyncio.gather(*(one(spec) for spec in specs))
    return time.perf_counter() - started


async def fleet_local(specs: list[AgentStepSpec]) -> float:
    """fleet: execute_steps_parallel on a LocalExecutor with hint 64."""
    executor = LocalExecutor(agents={"noop": noop}, max_concurrency=HINT)
    started = time.perf_counter()
    outcomes = await execute_steps_parallel(executor, specs)
    elapsed = time.perf_counter() - started
    assert all(o.success for o in outcomes)
    return elapsed


async def fleet_traced(specs: list[AgentStepSpec]) -> float:
    """Fleet with tracing on: one phase span, a step span each, flushed to the receiver."""
    executor = LocalExecutor(agents={"noop": noop}, max_concurrency=HINT)
    started = time.perf_counter()
    with telemetry.span("phase", {"fleet.phase.name": "bench"}):
        outcomes = await execute_steps_parallel(executor, specs)
    assert telemetry.flush(60_000)
    elapsed = time.perf_counter() - started
    assert all(o.success for o in outcomes)
    return elapsed


async def sdk_floor(specs: list[AgentStepSpec], tracer: Any = None) -> float:
    """The OpenTelemetry SDK alone: the same span per step, same exporter, no fleet.

    What any Python program pays for one exported span; fleet's tracing cost on top of
    its untraced path is compared with it.
    """
    tracer = tracer if tracer is not None else telemetry.active()
    started = time.perf_counter()
    with tracer.start_as_current_span("phase"):
        for spec in specs:
            attributes = telemetry.step_attributes(spec.task_id, spec.agent, None)
            with tracer.start_as_current_span(
                "invoke_agent noop", attributes=attributes, record_exception=False
            ) as span:
                await noop(spec, AgentContext(spec=spec))
                span.set_attribute("gen_ai.usage.input_tokens", 0)
                span.set_attribute("gen_ai.usage.output_tokens", 0)
                span.set_attribute("fleet.step.success", True)
    assert telemetry.flush(60_000)
    return time.perf_counter() - started


async def sdk_unexported(specs: list[AgentStepSpec]) -> float:
    """The same spans from an SDK tracer provider with no span processor: making them only.

    The least any design that builds an SDK span per step pays, before a processor
    queues it and an exporter encodes and sends it.
    """
    from opentelemetry.sdk.trace import TracerProvider

    return await sdk_floor(specs, TracerProvider().get_tracer("bench"))


def _tracing_on(endpoint: str, steps: int) -> None:
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(steps * 2)  # no span dropped
    telemetry.reset()
    assert telemetry.active() is not None


def _tracing_off() -> None:
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    telemetry.reset()
    assert telemetry.active() is None


def main() -> None:
    """Run both sides ``--repeat`` times, alternating, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    specs = [
        AgentStepSpec(task_id=f"s{i}", agent="noop", description="", prompt="")
        for i in range(args.steps)
    ]
    sides = [("bare asyncio.gather", bare), ("fleet LocalExecutor", fleet_local)]
    receiver = None
    if importlib.util.find_spec("opentelemetry.sdk") is not None:
        from bench.otlp_receiver import ReceiverProcess

        receiver = ReceiverProcess()
        sides += [(TRACED, fleet_traced), (SDK, sdk_floor), (SDK_BARE, sdk_unexported)]
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    try:
        for _ in range(args.repeat):
            for name, side in sides:
                if side in (fleet_traced, sdk_floor) and receiver is not None:
                    _tracing_on(receiver.endpoint, args.steps)
                else:
                    _tracing_off()
                gc.collect()
                times[name].append(asyncio.run(side(specs)))
        received = receiver.count() if receiver is not None else 0
    finally:
        _tracing_off()
        if receiver is not None:
            receiver.stop()
    floor = median(times["bare asyncio.gather"])
    ours = median(times["fleet LocalExecutor"])
    extra = {}
    if receiver is not None:
        traced_us = (median(times[TRACED]) - ours) / args.steps * 1e6
        sdk_us = (median(times[SDK]) - floor) / args.steps * 1e6
        bare_span_us = (median(times[SDK_BARE]) - floor) / args.steps * 1e6
        extra = {
            "tracing_us_per_step": traced_us,
            "sdk_span_us_per_step": sdk_us,
            "sdk_unexported_span_us_per_step": bare_span_us,
            "spans_received": received,
        }
    rows = [
        {
            "side": name,
            "steps": args.steps,
            "median_s": median(values),
            "per_step_us": median(values) / args.steps * 1e6,
        }
        for name, values in times.items()
    ]
    overhead_us = (ours - floor) / args.steps * 1e6
    print(table(rows))
    print(f"\nfleet overhead per step: {overhead_us:.1f} µs (target ≤ 30 µs); "
          f"ratio fleet/bare = {ours / floor:.2f}")  # fmt: skip
    if extra:
        print(f"tracing on adds {extra['tracing_us_per_step']:.1f} µs per step (target ≤ 30 µs); "
              f"{extra['spans_received']} spans received")  # fmt: skip
        print(f"the OpenTelemetry SDK alone costs {extra['sdk_span_us_per_step']:.1f} µs per "
              "exported span in this run (its per-step time minus the bare gather's), "
              f"{extra['sdk_unexported_span_us_per_step']:.1f} µs unexported")  # fmt: skip
    command = f"python -m bench.local_overhead --steps {args.steps} --repeat {args.repeat}"
    path = write(
        "local_overhead",
        command,
        rows,
        overhead_us_per_step=overhead_us,
        ratio=ours / floor,
        target_us=30,
        repeats=args.repeat,
        **extra,
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
