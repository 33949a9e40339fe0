"""Dynamic batching: concurrent requests share one model call.

Requests wait in a bounded queue. One task on the event loop takes the
queue's head and, while the model is idle, gathers more for at most
``max_wait`` seconds or until ``token_budget`` tokens are queued; it then
runs the model on the whole batch in a worker thread (off the event loop,
which keeps accepting and parsing requests meanwhile) and hands each request
its own rows. While a batch computes, the next one forms.

A request is never split across batches, so a single request over the
budget still runs (alone). The queue is bounded in texts: past
``max_queued_texts`` a request is refused at once (QueueFull: the service
answers 503 with Retry-After) instead of waiting without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Protocol

import numpy as np


class QueueFull(Exception):
    """The batcher's queue holds max_queued_texts texts already."""


class BatchObserver(Protocol):
    def batch_formed(self, texts: int, tokens: int, requests: int) -> None: ...
    def queue_waited(self, seconds: float) -> None: ...
    def batch_computed(self, seconds: float) -> None: ...


@dataclass
class _Request:
    texts: List[str]
    tokens: int
    future: "asyncio.Future[np.ndarray]"
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Coalesces concurrent ``embed`` calls into batches for ``model_embed``
    (called from one worker thread, one batch at a time)."""

    def __init__(self, model_embed: Callable[[List[str]], np.ndarray], *,
                 token_budget: int = 4096, max_wait: float = 0.002,
                 max_queued_texts: int = 2048,
                 observer: Optional[BatchObserver] = None) -> None:
        if token_budget <= 0 or max_wait < 0 or max_queued_texts <= 0:
            raise ValueError("token_budget and max_queued_texts: expected > 0, "
                             "max_wait: expected >= 0")
        self._model_embed = model_embed
        self.token_budget, self.max_wait = token_budget, max_wait
        self.max_queued_texts = max_queued_texts
        self._observer = observer
        self._queue: Deque[_Request] = deque()
        self._queued_texts = 0
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="embed-batch")
        self._task: Optional["asyncio.Task[None]"] = None

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop (the server has stopped taking
        requests by then)."""
        while self._queue:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._worker.shutdown(wait=True)

    async def embed(self, texts: List[str], tokens: int) -> np.ndarray:
        """The rows of ``texts`` (``tokens`` of them in all), computed in
        some batch. Raises QueueFull at once if the queue is full."""
        if self._queued_texts + len(texts) > self.max_queued_texts:
            raise QueueFull(f"{self._queued_texts} texts are waiting "
                            f"(max_queued_texts {self.max_queued_texts})")
        request = _Request(texts, tokens, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._queued_texts += len(texts)
        self._queued_tokens += tokens
        self._arrived.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while self._queued_tokens < self.token_budget and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            texts = [t for r in batch for t in r.texts]
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._worker, self._model_embed, texts)
            except Exception as e:         # the model failed: every request hears of it
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            if self._observer is not None:
                self._observer.batch_computed(time.perf_counter() - started)
            start = 0
            for r in batch:
                if not r.future.done():      # done: the client went away
                    r.future.set_result(rows[start:start + len(r.texts)])
                start += len(r.texts)

    def _take(self) -> List[_Request]:
        """Requests from the queue's head up to the token budget (at least one)."""
        now = time.perf_counter()
        batch: List[_Request] = []
        tokens = 0
        while self._queue and (not batch or tokens + self._queue[0].tokens <= self.token_budget):
            r = self._queue.popleft()
            batch.append(r)
            tokens += r.tokens
            self._queued_texts -= len(r.texts)
            self._queued_tokens -= r.tokens
        if self._observer is not None:
            for r in batch:
                self._observer.queue_waited(now - r.queued_at)
            self._observer.batch_formed(sum(len(r.texts) for r in batch), tokens, len(batch))
        return batch
