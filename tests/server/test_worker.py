"""The inference worker: one thread, bounded queue (429), deadlines (504), draining on stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.errors import DeadlineExceeded, NotReady, QueueFull, http_status
from server.worker import InferenceWorker


class FakePipeline:
    def __init__(self) -> None:
        self.threads: set[int] = set()

    def work(self, seconds: float) -> int:
        self.threads.add(threading.get_ident())
        time.sleep(seconds)
        return threading.get_ident()


async def _ready_worker(queue_size: int = 4, factory=None) -> InferenceWorker[FakePipeline]:
    worker: InferenceWorker[FakePipeline] = InferenceWorker(factory or (lambda on_state: FakePipeline()), queue_size=queue_size)
    worker.start()
    await asyncio.get_running_loop().run_in_executor(None, worker.ready_event.wait, 5)
    return worker


def test_all_jobs_run_on_one_thread_that_is_not_the_event_loop() -> None:
    async def main() -> None:
        worker = await _ready_worker()
        results = await asyncio.gather(*(worker.run(lambda p: p.work(0.001), timeout_s=5) for _ in range(4)))
        assert {r.value for r in results} == {worker._thread.ident}
        assert worker._thread.ident != threading.get_ident()
        assert await worker.stop(5)

    asyncio.run(main())


def test_full_queue_raises_queue_full_with_retry_after() -> None:
    async def main() -> None:
        worker = await _ready_worker(queue_size=2)
        # One job runs (blocks), two wait: the queue (size 2) is now full.
        tasks = [asyncio.create_task(worker.run(lambda p: p.work(0.3), timeout_s=5))]
        await asyncio.sleep(0.05)  # the first job is running, the queue is empty
        tasks += [asyncio.create_task(worker.run(lambda p: p.work(0.3), timeout_s=5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as info:
            await worker.run(lambda p: p.work(0), timeout_s=5)
        assert int(info.value.headers["Retry-After"]) >= 1
        assert http_status(info.value) == 429
        await asyncio.gather(*tasks)  # the accepted ones still finish
        await worker.run(lambda p: p.work(0), timeout_s=5)  # and there is room again
        await worker.stop(5)

    asyncio.run(main())


def test_deadline_raises_and_expired_jobs_are_skipped() -> None:
    async def main() -> None:
        worker = await _ready_worker(queue_size=4)
        ran: list[int] = []
        blocker = asyncio.create_task(worker.run(lambda p: p.work(0.4), timeout_s=5))
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExceeded):
            await worker.run(lambda p: ran.append(1), timeout_s=0.1)
        await blocker
        await worker.run(lambda p: None, timeout_s=5)
        assert ran == []  # the timed-out job never ran
        assert worker.stats.skipped_expired == 1
        await worker.stop(5)

    asyncio.run(main())


def test_stop_drains_accepted_jobs() -> None:
    async def main() -> None:
        worker = await _ready_worker(queue_size=8)
        tasks = [asyncio.create_task(worker.run(lambda p: p.work(0.05), timeout_s=10)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert await worker.stop(10)
        results = await asyncio.gather(*tasks)
        assert len(results) == 5 and worker.state == "stopped"

    asyncio.run(main())


def test_states_and_load_failure() -> None:
    async def main() -> None:
        seen: list[str] = []

        def factory(on_state):
            on_state("building_engines")
            seen.append("built")
            raise RuntimeError("no engines")

        worker = await _ready_worker(factory=factory)
        assert worker.state == "failed" and "no engines" in (worker.error or "")
        with pytest.raises(NotReady):
            await worker.run(lambda p: None, timeout_s=1)
        assert seen == ["built"]

    asyncio.run(main())


def test_not_ready_while_loading() -> None:
    async def main() -> None:
        gate = threading.Event()

        def factory(on_state):
            gate.wait(5)
            return FakePipeline()

        worker: InferenceWorker[FakePipeline] = InferenceWorker(factory, queue_size=2)
        worker.start()
        await asyncio.sleep(0.02)
        assert worker.state == "loading"
        with pytest.raises(NotReady):
            await worker.run(lambda p: None, timeout_s=1)
        gate.set()
        await asyncio.get_running_loop().run_in_executor(None, worker.ready_event.wait, 5)
        assert worker.state == "ready"
        await worker.stop(5)

    asyncio.run(main())
