"""What one decoding step feeds: [pending tokens | lookahead window | candidates] as a token tree.

Every fed token has one parent (the token before it in its own context path), so its depth is its
position offset and its ancestors are exactly what it may attend to. The lookahead token at level j,
column i continues the path pending -> L0[0..i] -> L1[i] -> ... -> Lj[i]: n-grams are read up a column.
A candidate continues the last pending token. Masks are cached per shape, since shapes repeat.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class StepShape:
    """Shape of one step's input on one rank.

    pending: committed tokens not yet in the KV cache (the last one's output predicts the next token).
    levels: filled window levels fed (0 = no lookahead branch).
    col_start, col_end: this rank's window columns [col_start, col_end); level-0 columns before
        col_start are fed too, as context only.
    candidates, candidate_len: verification branch size.
    """

    pending: int
    levels: int
    col_start: int
    col_end: int
    candidates: int
    candidate_len: int


@dataclass(frozen=True)
class StepLayout:
    parents: tuple[int, ...]  # parent row of each row, -1 for the first pending token
    depth: torch.Tensor  # [T] position offset of each row from the first pending token
    allowed: torch.Tensor  # [T, T] bool: row may attend to column
    window_rows: torch.Tensor  # [levels, columns] row of L_j[col_start + c]; empty when levels == 0
    candidate_rows: torch.Tensor  # [candidates, candidate_len]

    last_pending: int  # row whose output predicts the next committed token

    @property
    def size(self) -> int:
        return len(self.parents)


def tokens_fed(shape: StepShape) -> int:
    """Number of tokens a step of this shape feeds (what lookahead parallelism balances)."""
    columns = shape.col_end - shape.col_start
    window = 0 if shape.levels == 0 else shape.col_end + (shape.levels - 1) * columns
    return shape.pending + window + shape.candidates * shape.candidate_len


@lru_cache(maxsize=256)
def build_layout(shape: StepShape) -> StepLayout:
    """Parents, depths, attention and row indices for one step shape (cached)."""
    parents: list[int] = []

    def add(parent: int) -> int:
        parents.append(parent)
        return len(parents) - 1

    last = -1
    for _ in range(shape.pending):
        last = add(last)
    columns = shape.col_end - shape.col_start
    window_rows = torch.empty(shape.levels, columns, dtype=torch.long)
    if shape.levels:
        prev = last
        for i in range(shape.col_end):  # level 0, including the context-only prefix
            prev = add(prev)
            if i >= shape.col_start:
                window_rows[0, i - shape.col_start] = prev
        for j in range(1, shape.levels):
            for c in range(columns):
                window_rows[j, c] = add(int(window_rows[j - 1, c]))
    candidate_rows = torch.empty(shape.candidates, shape.candidate_len, dtype=torch.long)
    for k in range(shape.candidates):
        prev = last
        for j in range(shape.candidate_len):
            prev = candidate_rows[k, j] = add(prev)

    size = len(parents)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    depth = torch.zeros(size, dtype=torch.long)
    for r, p in enumerate(parents):
        if p >= 0:
            allowed[r] = allowed[p]
            depth[r] = depth[p] + 1
        allowed[r, r] = True
    return StepLayout(tuple(parents), depth, allowed, window_rows, candidate_rows, shape.pending - 1)


def step_mask(hidden: torch.Tensor, cached: int, dtype: torch.dtype) -> torch.Tensor:
    """Float additive mask [1, 1, T, cached + T] on hidden's device: the committed cache is visible to all
    rows, `hidden` [T, T] (True = masked) applies within the step. Boolean 4-D masks are mis-applied by
    some attention implementations, so the mask is float."""
    size = hidden.shape[0]
    mask = torch.zeros(1, 1, size, cached + size, dtype=dtype, device=hidden.device)
    mask[0, 0, :, cached:].masked_fill_(hidden, torch.finfo(dtype).min)
    return mask
