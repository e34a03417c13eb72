"""The one fan-out primitive every combinator uses: a bounded, order-keeping sliding window."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

__all__ = ["run_ordered"]

T = TypeVar("T")
R = TypeVar("R")


async def run_ordered(
    items: Sequence[T],
    limit: int,
    run: Callable[[int, T], Awaitable[R]],
    on_crash: Callable[[int, T, Exception], R],
) -> list[R]:
    """Run ``run(i, item)`` for every item, at most ``max(limit, 1)`` at once.

    Items start in input order: the first ``limit`` at once, then the next one each
    time one finishes (a sliding window, not batches). A branch that raises becomes
    ``on_crash(i, item, exc)`` for that index; siblings are unaffected. Results come
    back in input order, one per item. Cancelling the caller cancels every branch
    still running and leaves no task behind.
    """
    count = len(items)
    if count == 0:
        return []
    results: list[R | None] = [None] * count
    indices = iter(range(count))

    async def lane() -> None:
        # All lanes share one iterator, so the next index goes to whichever lane frees up first.
        for index in indices:
            item = items[index]
            try:
                results[index] = await run(index, item)
            except Exception as error:
                results[index] = on_crash(index, item, error)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(max(limit, 1), count)):
            group.create_task(lane())
    return results  # type: ignore[return-value]  # every index was filled by a lane
