"""A line every so often while a long call runs: compiling a step takes a minute or two on a CPU, and prints nothing."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

PROGRESS_S = 30.0  # seconds between two lines


@contextlib.contextmanager
def ticking(notify: Callable[[str], None] | None, what: str, every: float | None = None) -> Iterator[None]:
    """While the block runs, `notify(f"{what}: N s so far")` every `every` seconds (PROGRESS_S) from a thread of its
    own; nothing when notify is None."""
    if notify is None:
        yield
        return
    every = PROGRESS_S if every is None else every
    done, began = threading.Event(), time.perf_counter()

    def tick() -> None:
        while not done.wait(every):
            notify(f"{what}: {time.perf_counter() - began:.0f} s so far")

    thread = threading.Thread(target=tick, name="lp-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
