"""Iterate a producer in a background thread, a few items ahead of the consumer.

Used for minibatches (``train.InMemorySource``: a batch is gathered on the second core
while the first trains on the previous one) and for disk buffers (``stream``). torch and
NumPy release the GIL inside their kernels, so the two threads overlap.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(produce: Callable[[threading.Event], Iterator], depth: int = 1) -> Iterator:
    """Iterate ``produce(stop)`` in a background thread, ``depth`` items ahead. Closing the
    iterator early sets ``stop`` and waits for the thread; its errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in produce(stop):
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(_Failure(err))

    thread = threading.Thread(target=work, name="ldvae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
