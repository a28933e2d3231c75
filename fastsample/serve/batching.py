"""The dynamic batcher: one per model, on the server's event loop.

Requests wait in a bounded queue. The worker takes the oldest request, waits until the batch
holds `max_batch` samples or `max_delay` has passed since that request arrived, and runs the
batch in the model's one runner thread (ONNX Runtime and the Engine release the GIL). While a
batch runs, new requests queue up and join the next batch. The wait is adaptive: the batcher
waits (at most max_delay after the runner is free) only for as many samples as the last batch
held plus those that queued while it ran, so a lone request at low load runs at once; and a lone cheap request at low load runs on
the loop's thread, sparing two thread hand-offs. A model that cannot merge requests (the
Engine: one seed per batch) runs them one at a time through the same queue.

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


# A batch of one may run on the event loop's thread only if the last one took less than this
# (the loop answers nothing else meanwhile).
INLINE_MAX_S = 0.025


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


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class Batcher:
    def __init__(self, served, *, max_batch: int, max_delay_s: float, max_queue: int,
                 metrics=None):
        self.served = served
        self.max_batch = max_batch if served.merges else 1
        self.max_delay = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        if metrics is not None:      # labelled children looked up once, not per request
            self._depth_gauge = metrics.queue_depth.labels(served.name)
            self._batch_hist = metrics.batch_size.labels(served.name)
        self.queue: deque[_Item] = deque()
        self.closed = False
        self.in_flight = 0                   # samples in the running batch
        self._last = 0                       # samples in the last batch
        self._want = 0                       # samples likely to be wanted in the next one
        self._free = 0.0                     # when the runner last became free
        self._last_s = float("inf")          # how long the last batch ran
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
        loop = asyncio.get_running_loop()
        item = _Item(seed, num, loop.create_future())
        self.queue.append(item)
        self._gauge()
        self._wake.set()
        # A timer on the future itself (asyncio.wait_for costs more per request).
        timer = loop.call_later(timeout, _expire, item.fut)
        try:
            return await item.fut
        finally:
            timer.cancel()
            if not item.fut.done():            # the caller was cancelled (client gone)
                item.fut.cancel()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self._depth_gauge.set(len(self.queue))

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
                # Wait only for requests that are likely to come: the last batch's samples
                # (its clients send again once answered) plus those that queued while it ran,
                # at most max_delay after the oldest arrived or the runner became free,
                # whichever is later. A lone request at low load runs at once; two cohorts of
                # closed-loop clients (one running, one queued) are merged again instead of
                # alternating for ever.
                want = min(self.max_batch, max(self._want, 1))
                deadline = max(self.queue[0].t, self._free) + self.max_delay
                while self._queued_samples() < want:
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
            # Low load (a lone request after a lone request, nothing queued behind it) and a
            # cheap model: run it on the loop's own thread. Two thread hand-offs cost more
            # than the wait they would spare anyone on a busy 2-core machine.
            inline = (len(reqs) == 1 and self._last == reqs[0][1] == 1 and not self.queue
                      and self._last_s < INLINE_MAX_S)
            self.in_flight = self._last = sum(n for _, n in reqs)
            if self.metrics is not None:
                self._batch_hist.observe(self.in_flight)
            t0 = time.perf_counter()
            try:
                if inline:
                    outs = self.served.run(reqs)
                else:
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
                self._free = time.perf_counter()
                self._want = self._last + self._queued_samples()
                self._last_s = self._free - t0

    async def close(self) -> None:
        """Finish every queued request, then stop the worker and its thread."""
        self.closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)
