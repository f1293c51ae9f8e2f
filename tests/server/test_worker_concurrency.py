"""The inference worker with ``concurrency`` > 1 (--backend triton): jobs overlap, and stopping
still drains every accepted job and closes the pipeline once, on the loading thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.worker import InferenceWorker


class RemotePipeline:
    def __init__(self) -> None:
        self.closed_on: list[int] = []

    def close(self) -> None:
        self.closed_on.append(threading.get_ident())


@pytest.mark.parametrize("concurrency", [3])
def test_jobs_overlap_and_stop_drains(concurrency):
    pipeline = RemotePipeline()
    barrier = threading.Barrier(concurrency, timeout=5)  # passes only if `concurrency` jobs run at once

    async def main() -> None:
        worker = InferenceWorker(lambda on_state: pipeline, queue_size=8, concurrency=concurrency)
        worker.start()
        await asyncio.get_running_loop().run_in_executor(None, worker.ready_event.wait, 5)

        def job(p):
            barrier.wait()
            return threading.get_ident()

        results = await asyncio.gather(*(worker.run(job, timeout_s=10) for _ in range(concurrency)))
        assert len({r.value for r in results}) == concurrency
        queued = [asyncio.create_task(worker.run(lambda p: 1, timeout_s=10)) for _ in range(5)]
        await asyncio.sleep(0)
        assert await worker.stop(10)
        assert [r.value for r in await asyncio.gather(*queued)] == [1] * 5  # accepted jobs all ran
        assert worker.stats.completed == concurrency + 5 and worker.depth == 0
        assert pipeline.closed_on == [worker._thread.ident] and worker.state == "stopped"

    asyncio.run(main())


def test_concurrency_must_be_positive():
    with pytest.raises(ValueError):
        InferenceWorker(lambda on_state: None, queue_size=1, concurrency=0)
