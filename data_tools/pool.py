"""Work items computed by a pool of spawned processes, their results yielded in input order.

Forking a process whose tokenizers or torch threads have run is unsafe (the tokenizers library warns about it),
so the pool is spawned; at most `2 x workers` items are in flight, so memory stays bounded for any input size.
"""

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator


def in_order(
    items: Iterable, fn: Callable, workers: int, init: Callable, initargs: tuple, tag: Callable = None
) -> Iterator:
    """(tag(item), fn(item)) for every item, in input order; `tag` (default: the item) is what the caller keeps of an
    item while it is computed (e.g. its ids, not its text)."""
    tag = tag or (lambda item: item)
    with mp.get_context("spawn").Pool(workers, initializer=init, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((tag(item), pool.apply_async(fn, (item,))))
            del item
            if len(pending) >= 2 * workers:
                kept, result = pending.popleft()
                yield kept, result.get()
        while pending:
            kept, result = pending.popleft()
            yield kept, result.get()
