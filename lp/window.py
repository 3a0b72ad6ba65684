"""The lookahead branch's 2-D window: N-1 Jacobi levels x W columns of guessed future tokens."""
from __future__ import annotations

import random
from typing import Sequence


class LookaheadWindow:
    """Levels of guesses, oldest first; column i of level j guesses the token i + j + 1 places ahead.

    The window starts with level 0 only (random tokens of the prompt) and gains one level per step
    during the N-2 warm-up steps. Once full, every step reads one n-gram up each column
    (L0[i], ..., L_{N-2}[i], new output) and shifts the levels down, the new outputs on top.
    """

    def __init__(self, levels: int, width: int, prompt: Sequence[int], seed: int = 0):
        self.levels = levels
        self.width = width
        rng = random.Random(seed)
        self.rows: list[list[int]] = [[prompt[rng.randrange(len(prompt))] for _ in range(width)]]

    @property
    def filled(self) -> int:
        return len(self.rows)

    @property
    def warm(self) -> bool:
        return len(self.rows) == self.levels

    def advance(self, top_outputs: Sequence[int]) -> list[tuple[int, ...]]:
        """Take the model's outputs at the top filled level; return the n-grams harvested (none while warming up)."""
        top = list(top_outputs)
        if len(top) != self.width:
            raise ValueError(f"expected {self.width} outputs, got {len(top)}")
        if not self.warm:
            self.rows.append(top)
            return []
        grams = [tuple(row[i] for row in self.rows) + (top[i],) for i in range(self.width)]
        self.rows = self.rows[1:] + [top]
        return grams
