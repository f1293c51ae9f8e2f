"""One inference worker thread that owns the pipeline.

GPU contexts (CUDA, TensorRT execution contexts) are bound to the thread that created them,
and an Orin Nano has one small GPU: running one job at a time on one thread is both correct
and as fast as it gets. The event loop never runs inference; it puts a job on a bounded queue
and awaits an asyncio future the worker completes with ``call_soon_threadsafe``.

Backpressure is explicit: a full queue raises :class:`QueueFull` (429 + Retry-After) at once
instead of letting latency grow without bound. In the server this never fires: admission
(``SegmentService.admit``) is the one check, and it keeps at most ``queue_size`` requests alive,
each with at most one job here; the bound stays because the queue must be bounded by itself.
A request past its deadline raises :class:`DeadlineExceeded` (504) and, if its job has not
started yet, the worker skips it.
On shutdown the queue is drained: jobs already accepted run to completion.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, TypeVar

from server.cpu import lower_priority
from server.errors import DeadlineExceeded, NotReady, QueueFull

log = logging.getLogger("server.worker")

State = Literal["starting", "building_engines", "loading", "ready", "failed", "stopping", "stopped"]
STATES: tuple[str, ...] = ("starting", "building_engines", "loading", "ready", "failed", "stopping", "stopped")

P = TypeVar("P")
T = TypeVar("T")

# factory(on_state) -> pipeline; it runs ON the worker thread and may call
# on_state("building_engines") while TensorRT plans are built on first start.
PipelineFactory = Callable[[Callable[[str], None]], P]


@dataclass
class _Job:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float
    started: float = 0.0
    abandoned: bool = False


@dataclass
class JobResult(Generic[T]):
    value: T
    queue_ms: float
    run_ms: float


_STOP = object()


@dataclass
class WorkerStats:
    completed: int = 0
    failed: int = 0
    skipped_expired: int = 0
    rejected_full: int = 0
    timed_out: int = 0
    run_s_ewma: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class InferenceWorker(Generic[P]):
    """Loads the pipeline on its own thread, then runs submitted jobs one at a time."""

    def __init__(
        self,
        factory: PipelineFactory[P],
        *,
        queue_size: int,
        warmup: Callable[[P], None] | None = None,
        name: str = "sam3-inference",
        concurrency: int = 1,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        """``concurrency`` > 1 only for remote engines (--backend triton): jobs then run on that
        many threads, so several requests are in flight to Triton, whose batcher can combine them;
        local engines keep one thread (CUDA contexts are per thread, and one small GPU)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self._name = name
        self._factory = factory
        self._warmup = warmup
        self._on_failed = on_failed
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._state: str = "starting"
        self._state_lock = threading.Lock()
        self.error: str | None = None
        self.pipeline: P | None = None
        self.stats = WorkerStats()
        self._running = 0
        self._count_lock = threading.Lock()  # _running and stats, shared by the job threads
        self.ready_event = threading.Event()  # set once ready or failed

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    def _set_state(self, state: str) -> None:
        with self._state_lock:
            if self._state != state:
                log.info("worker state %s -> %s", self._state, state)
            self._state = state

    @property
    def depth(self) -> int:
        """Jobs waiting plus the ones running."""
        return self._queue.qsize() + self._running

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout_s: float) -> bool:
        """Drain accepted jobs, then end the thread. True if it ended within ``timeout_s``."""
        if not self._thread.is_alive():
            self._set_state("stopped")
            return True
        if self._state in ("ready",):
            self._set_state("stopping")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s

        def put_sentinel_and_join() -> bool:
            try:
                for _ in range(self.concurrency):  # one per job thread, after the accepted jobs
                    self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                return False
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            return not self._thread.is_alive()

        ended = await loop.run_in_executor(None, put_sentinel_and_join)
        if not ended:
            log.warning("worker did not drain within %.1f s", timeout_s)
        return ended

    # -- submission (event loop side) ------------------------------------------------------
    async def run(self, fn: Callable[[P], T], *, timeout_s: float) -> JobResult[T]:
        """Run ``fn(pipeline)`` on the worker thread; never blocks the event loop."""
        if self._state != "ready":
            raise NotReady(f"inference engines are not ready (state: {self._state})")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(fn=fn, loop=loop, future=loop.create_future(), enqueued=now, deadline=now + timeout_s)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected_full += 1
            raise QueueFull(
                f"inference queue is full ({self.queue_size} waiting); retry later",
                retry_after_s=self.retry_after_s(),
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            job.abandoned = True
            self.stats.timed_out += 1
            raise DeadlineExceeded(f"request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.abandoned = True  # client went away; skip the job if it has not started
            raise

    def retry_after_s(self) -> int:
        """Seconds until the queue is likely to have room: waiting jobs x mean job time."""
        per_job = self.stats.run_s_ewma or 1.0
        return max(1, math.ceil(self.depth * per_job / self.concurrency))

    # -- worker thread -------------------------------------------------------------------
    def _main(self) -> None:
        lower_priority()  # the event loop (admission, probes) before inference on a busy CPU
        try:
            self._set_state("loading")
            self.pipeline = self._factory(self._set_state)
            self._set_state("loading")
            if self._warmup is not None:
                self._warmup(self.pipeline)
        except BaseException as exc:  # noqa: BLE001 - any load failure is reported, not raised
            # One line (ONNX Runtime's messages span several): the typed errors name the file.
            self.error = " ".join(f"{type(exc).__name__}: {exc}".split())
            log.debug("pipeline failed to load", exc_info=exc)  # the traceback: --log-level debug
            self._set_state("failed")
            self.ready_event.set()
            self._fail_pending()
            if self._on_failed is not None:
                self._on_failed(self.error)
            else:
                log.error("pipeline failed to load: %s", self.error)
            return
        self._set_state("ready")
        self.ready_event.set()
        helpers = [
            threading.Thread(target=self._serve, name=f"{self._name}-{i}", daemon=True)
            for i in range(1, self.concurrency)
        ]
        for helper in helpers:
            helper.start()
        self._serve()
        for helper in helpers:
            helper.join()
        close = getattr(self.pipeline, "close", None)
        if callable(close):
            try:
                close()  # on this thread: GPU resources are released where they were made
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("pipeline.close() failed")
        self._set_state("stopped")

    def _serve(self) -> None:
        lower_priority()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._execute(item)

    def _execute(self, job: _Job) -> None:
        job.started = time.monotonic()
        if job.abandoned or job.started > job.deadline:
            with self._count_lock:
                self.stats.skipped_expired += 1
            return
        with self._count_lock:
            self._running += 1
        try:
            value = job.fn(self.pipeline)
        except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting request
            with self._count_lock:
                self.stats.failed += 1
            self._deliver(job, exc=exc)
        else:
            with self._count_lock:
                self.stats.completed += 1
            done = time.monotonic()
            self._deliver(
                job,
                value=JobResult(value, (job.started - job.enqueued) * 1e3, (done - job.started) * 1e3),
            )
        finally:
            run_s = time.monotonic() - job.started
            with self._count_lock:
                self._running -= 1
                ewma = self.stats.run_s_ewma
                self.stats.run_s_ewma = run_s if ewma == 0.0 else 0.8 * ewma + 0.2 * run_s

    @staticmethod
    def _deliver(job: _Job, value: Any = None, exc: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(value)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                self._deliver(item, exc=NotReady(f"pipeline failed to load: {self.error}"))
