"""A step's batches read ahead by one background thread, in order."""

from __future__ import annotations

import queue
import threading
from typing import Optional, Sequence

__all__ = ["Prefetcher"]


class Prefetcher:
    """``next()`` gives ``dataset.batch(indices, epoch=epoch)`` for each of ``batches`` in order.

    With ``depth`` > 0 one background thread reads up to ``depth`` batches ahead (one
    thread: h5py is not safe to use from several threads at once); with 0 each batch is
    read when asked for. Local (no communication). :meth:`close` stops the thread; an
    error in the thread is raised by the ``next()`` that would have returned its batch.
    """

    def __init__(self, dataset, batches: Sequence, *, epoch: Optional[int] = None, depth: int = 0):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.dataset, self.batches, self.epoch, self.depth = dataset, list(batches), epoch, depth
        self._next = 0
        self._closed = threading.Event()
        self._queue: Optional[queue.Queue] = None
        self._thread = None
        if depth and self.batches:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._read_ahead, args=(self._queue,), name="mpipar-prefetch",
                                            daemon=True)
            self._thread.start()

    def _read_ahead(self, out: queue.Queue) -> None:
        for indices in self.batches:
            try:
                item = self.dataset.batch(indices, epoch=self.epoch)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not self._closed.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._closed.is_set() or isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self._next >= len(self.batches) or self._closed.is_set():
            raise StopIteration
        self._next += 1
        if self._queue is None:
            return self.dataset.batch(self.batches[self._next - 1], epoch=self.epoch)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (batches not taken are dropped)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
