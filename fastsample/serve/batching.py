"""The dynamic batcher: one per model, on the server's event loop.

Requests wait in a bounded queue. The worker takes the oldest request, waits until the batch
holds `max_batch` samples or `max_delay` has passed since that request arrived, and runs the
batch in the model's one runner thread (ONNX Runtime and the Engine release the GIL). While a
batch runs, new requests queue up; their delay was already spent waiting, so they run next
without another wait. A model that cannot merge requests (the Engine: one seed per batch) runs
them one at a time through the same queue.

    full queue           QueueFull -> 503 with Retry-After
    request timeout      TimeoutError -> 504; a queued request is dropped, not run
    client gone          its future is cancelled; the batch skips it if not yet started and
                         discards its slice otherwise; other requests are not affected
    close()              stop taking requests; the worker finishes everything queued
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


@dataclass
class _Item:
    seed: int
    num: int
    fut: asyncio.Future
    t: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, served, *, max_batch: int, max_delay_s: float, max_queue: int,
                 metrics=None):
        self.served = served
        self.max_batch = max_batch if served.merges else 1
        self.max_delay = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: deque[_Item] = deque()
        self.closed = False
        self.in_flight = 0                   # samples in the running batch
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread per model: a session/Engine runs one batch at a time.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, f"serve-{served.name}")

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    @property
    def depth(self) -> int:
        return len(self.queue)

    async def submit(self, seed: int, num: int, timeout: float):
        """The request's samples (numpy, [num, ...]); QueueFull, Closed or TimeoutError."""
        if self.closed:
            raise Closed()
        if len(self.queue) >= self.max_queue:
            # Requests whose clients left or timed out hold no place in the queue.
            self.queue = deque(it for it in self.queue if not it.fut.done())
            if len(self.queue) >= self.max_queue:
                raise QueueFull()
        item = _Item(seed, num, asyncio.get_running_loop().create_future())
        self.queue.append(item)
        self._gauge()
        self._wake.set()
        try:
            return await asyncio.wait_for(item.fut, timeout)
        finally:
            if not item.fut.done():            # timed out or the caller was cancelled
                item.fut.cancel()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.served.name).set(len(self.queue))

    def _take(self) -> list[_Item]:
        batch, n = [], 0
        while self.queue:
            it = self.queue[0]
            if it.fut.done():                  # cancelled while queued: never runs
                self.queue.popleft()
                continue
            if batch and n + it.num > self.max_batch:
                break
            batch.append(self.queue.popleft())
            n += it.num
            if n >= self.max_batch:
                break
        self._gauge()
        return batch

    def _queued_samples(self) -> int:
        return sum(it.num for it in self.queue if not it.fut.done())

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                if self.closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            if self.max_delay > 0 and self.max_batch > 1:
                deadline = self.queue[0].t + self.max_delay
                while self._queued_samples() < self.max_batch:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            reqs = [(it.seed, it.num) for it in batch]
            self.in_flight = sum(n for _, n in reqs)
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.served.name).observe(self.in_flight)
            try:
                outs = await loop.run_in_executor(self._pool, self.served.run, reqs)
            except Exception as e:              # a runtime failure fails this batch only
                for it in batch:
                    if not it.fut.done():
                        it.fut.set_exception(e)
            else:
                for it, out in zip(batch, outs):
                    if not it.fut.done():
                        it.fut.set_result(out)
            finally:
                self.in_flight = 0

    async def close(self) -> None:
        """Finish every queued request, then stop the worker and its thread."""
        self.closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)
