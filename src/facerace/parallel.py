"""One process-pool helper: map a picklable function over items on spawned workers, in order."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

_WORKER: Callable | None = None


def _init_worker(fn: Callable) -> None:
    """Install this worker's function (its models load once per process); pin libraries to one thread;
    leave Ctrl-C to the parent."""
    global _WORKER
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    _WORKER = fn


def _call(item: Any) -> Any:
    assert _WORKER is not None
    return _WORKER(item)


def worker_count(workers: int | None, items: int) -> int:
    """`workers` (default: all cores), at most one per item, at least one."""
    return max(1, min(workers or os.cpu_count() or 1, items))


def ordered_map(fn: Callable, items: Sequence, *, workers: int | None = None, chunksize: int = 2) -> Iterator[Any]:
    """fn(item) for every item, in order, computed by `workers` spawned processes (default: all cores).

    `fn` must be picklable; each worker receives it once, so what it loads is loaded once per
    process. With one worker, or fewer than four items, it runs here. `fn` handles its own
    errors (return them as values): an exception ends the map.
    """
    workers = worker_count(workers, len(items))
    if workers <= 1 or len(items) < 4:
        yield from map(fn, items)
        return
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(workers, _init_worker, (fn,))
    try:
        yield from pool.imap(_call, items, chunksize=chunksize)
    finally:
        pool.terminate()
