"""Bounded waits for async tests: poll a condition instead of sleeping a fixed time (a fixed
sleep races a loaded or an idle machine), and fail with a message when it never comes."""
from __future__ import annotations

import asyncio
from typing import Callable


async def until(cond: Callable[[], bool], what: Callable[[], str], timeout_s: float = 10.0) -> None:
    """Return once cond() holds; AssertionError with what() after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what()}")
        await asyncio.sleep(0.001)
