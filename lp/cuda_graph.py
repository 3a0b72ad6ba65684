"""One fast-path step replayed from a captured CUDA graph: one launch a step, no Python or host work.

The step's state lives in tensors at fixed addresses and its graphs never sync with the host, so the kernels a
call launches can be captured once and replayed. The first call runs as is (compiling, autotuning and allocating
happen there, on a side stream as capture requires), the second is captured and then replayed, and every later
call only replays. This wraps the whole step, however many compiled graphs (or eager kernels) it is made of, so
a split step costs one launch like a whole one.
"""
from __future__ import annotations

from typing import Callable

import torch


class CapturedStep:
    """Calls `fn(*args)` once, then captures its next call in one CUDA graph and replays it from then on.

    `args` are tensors; a later call's tensor at another address is copied into the captured one first. Graphs of
    one decoder share `pool` (they never run at once)."""

    def __init__(self, fn: Callable, pool=None):
        self.fn, self.pool = fn, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.args: tuple = ()
        self.out = None
        self.warmed = False

    def __call__(self, *args):
        if self.graph is not None:
            for mine, given in zip(self.args, args):
                if given.data_ptr() != mine.data_ptr():
                    mine.copy_(given)
            self.graph.replay()
            return self.out
        if not self.warmed:
            self.warmed = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*args)
        self.graph, self.args, self.out = graph, args, out
        graph.replay()
        return out
