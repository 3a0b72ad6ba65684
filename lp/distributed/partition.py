"""Split one step's window columns and candidates over P ranks so that the tokens each feeds are balanced.

A rank that owns columns [a, b) of a window with L filled levels feeds the level-0 prefix [0, a) as
context, its own columns on every level, and its candidates: a + L*(b - a) + k*candidate_len tokens,
plus its pending tokens. Later columns carry a longer prefix, so the split gives them fewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from ..step_layout import StepShape, tokens_fed


@dataclass(frozen=True)
class Slice:
    """One rank's share of a step: window columns [col_start, col_end) and candidates [cand_start, cand_end)."""

    col_start: int
    col_end: int
    cand_start: int
    cand_end: int

    @property
    def columns(self) -> int:
        return self.col_end - self.col_start


def rank_shape(s: Slice, levels: int, candidate_len: int, pending: int) -> StepShape:
    """What a rank feeds for slice `s`: a rank with no window columns feeds no window tokens at all."""
    if s.columns == 0:
        levels = 0
    return StepShape(pending, levels, s.col_start if levels else 0, s.col_end if levels else 0,
                     s.cand_end - s.cand_start, candidate_len)


def rank_load(s: Slice, levels: int, candidate_len: int, pending: int) -> int:
    """Tokens a rank feeds for slice `s`: the one cost model of the split, the decoders and the GPU projection."""
    return tokens_fed(rank_shape(s, levels, candidate_len, pending))


def _try_split(limit, width, levels, candidates, candidate_len, pending):
    """Slices that keep every rank's load <= limit, or None. Columns go first, candidates fill the rest."""
    slices, col, cand = [], 0, 0
    for p in pending:
        room = limit - p
        take = 0
        if levels:
            # largest x with col + levels*x <= room (a rank with no columns feeds no prefix)
            take = max(0, min(width - col, (room - col) // levels)) if room > col else 0
        window = col + levels * take if take else 0
        k = 0 if candidate_len == 0 else max(0, min(candidates - cand, (room - window) // candidate_len))
        slices.append(Slice(col, col + take, cand, cand + k))
        col, cand = col + take, cand + k
    if col < width or cand < candidates:
        return None
    return slices


def split_step(width: int, levels: int, candidates: int, candidate_len: int, pending: Sequence[int]) -> list[Slice]:
    """Balanced, deterministic slices for len(pending) ranks (the same answer on every rank).

    width/levels describe the window fed this step (levels 0: no window), pending[r] is rank r's
    pending token count. Minimises the largest per-rank load by bisection over the load limit.
    """
    return list(_split(width, levels, candidates, candidate_len, tuple(pending)))


@lru_cache(maxsize=1024)
def _split(width: int, levels: int, candidates: int, candidate_len: int, pending: tuple[int, ...]) -> tuple[Slice, ...]:
    if levels == 0:
        width = 0
    low = max(pending)
    high = max(pending) + width + max(levels - 1, 0) * width + candidates * candidate_len
    best = _try_split(high, width, levels, candidates, candidate_len, pending)
    while low < high:
        mid = (low + high) // 2
        found = _try_split(mid, width, levels, candidates, candidate_len, pending)
        if found is None:
            low = mid + 1
        else:
            high, best = mid, found
    assert best is not None
    return tuple(best)


@lru_cache(maxsize=1024)
def deal_rows(slots: tuple[int, ...], rows: int) -> tuple[tuple[int, ...], ...]:
    """Deal candidate rows 0..rows-1 (best first) to ranks in proportion to their tree slots `slots`, interleaved
    (smooth weighted round-robin, ties to the lower rank): a rank with no slot gets no row, and the best rows go
    to the ranks with the most slots. The same answer on every rank."""
    total = sum(slots)
    dealt: list[list[int]] = [[] for _ in slots]
    credit = [0] * len(slots)
    for row in range(rows if total else 0):
        credit = [c + s for c, s in zip(credit, slots)]
        best = max(range(len(slots)), key=lambda r: (credit[r], -r))
        credit[best] -= total
        dealt[best].append(row)
    return tuple(tuple(d) for d in dealt)

