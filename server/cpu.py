"""Where a request's CPU work runs: a few low-priority threads, and the decode slots.

Hashing, image decoding, JSON parsing and mask encoding are CPU work that must not run on the
event loop; they run here, on ``threads`` threads whose scheduling priority is lowered (nice +10,
per thread, Linux), so that on a busy or single-core device the loop still gets the CPU first:
admission (429), probes and /metrics answer while decodes run. The decode slots bound what is
held at once: at most ``slots`` images decoded (or JSON bodies parsed) at a time.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

NICENESS = 10


def lower_priority() -> None:
    """Nice the calling thread (only it): the event loop's thread keeps its priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)  # this thread only
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: same priority as the loop


class CpuWork:
    def __init__(self, threads: int, decode_slots: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sam3-cpu", initializer=lower_priority)
        self.slots = asyncio.Semaphore(decode_slots)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def run_in_slot(self, fn: Callable[..., T], *args: Any) -> T:
        async with self.slots:
            return await self.run(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
