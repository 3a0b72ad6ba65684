"""GreedyRules with their per-generation numbers in device tensors, so one compiled step serves every prompt.

Which rules exist comes from the model's generation_config and is fixed for a decoder; the numbers that
change with the prompt (its length, max_new_tokens, the minimum length left) are refilled in place by `load`.
"""
from __future__ import annotations

import torch

from .greedy_rules import GreedyRules


NEVER = 1 << 62  # an index no generation reaches (and an int64 holds)


class DeviceRules:
    """Applies the position-only rules of `GreedyRules` to logits rows with no host values."""

    def __init__(self, template: GreedyRules, vocab: int, dtype: torch.dtype, device: torch.device):
        self.kinds = (bool(template.suppress), bool(template.begin_suppress),
                      bool(template.eos_ids), template.forced_bos is not None,
                      bool(template.forced_eos))
        self.template = template
        low = torch.finfo(dtype).min
        to = dict(device=device, dtype=torch.long)
        def ids(values):  # ids outside the vocabulary match no logit (as in transformers' processors)
            return torch.tensor([v for v in values if 0 <= v < vocab] or [vocab], **to)

        self.suppress, self.begin_suppress, self.eos = ids(template.suppress), ids(template.begin_suppress), \
            ids(template.eos_ids)
        self.forced_bos_row = _forced_row((template.forced_bos,) if template.forced_bos is not None else (), vocab, low,
                                          dtype, device)
        self.forced_eos_row = _forced_row(template.forced_eos, vocab, low, dtype, device)
        self.min_new = torch.zeros((), **to)
        self.max_new = torch.zeros((), **to)
        self.bos_on = torch.zeros((), dtype=torch.bool, device=device)

    def matches(self, rules: GreedyRules) -> bool:
        """Whether `rules` differs from the template only in the per-generation numbers."""
        t = self.template
        return (rules.suppress, rules.begin_suppress, rules.eos_ids, rules.forced_bos, rules.forced_eos) == (
            t.suppress, t.begin_suppress, t.eos_ids, t.forced_bos, t.forced_eos)

    @property
    def active(self) -> bool:
        return any(self.kinds)

    def load(self, rules: GreedyRules) -> None:
        """Set this generation's numbers (in place: compiled graphs keep reading the same tensors)."""
        self.min_new.fill_(rules.min_new_tokens if rules.eos_ids else 0)
        self.max_new.fill_(min(rules.max_new_tokens, NEVER))  # a budget past any context (10**30) never binds
        self.bos_on.fill_(rules.forced_bos is not None and rules.prompt_len == 1)

    def apply(self, logits: torch.Tensor, next_index: torch.Tensor) -> torch.Tensor:
        """Rules on logits [R, V]; next_index [R] is the index among new tokens that each row predicts."""
        suppress, begin, min_len, bos, eos = self.kinds
        low = torch.finfo(logits.dtype).min
        if suppress:
            logits = _fill_rows(logits, self.suppress, torch.ones_like(next_index, dtype=torch.bool), low)
        if begin:
            logits = _fill_rows(logits, self.begin_suppress, next_index == 0, low)
        if min_len:
            logits = _fill_rows(logits, self.eos, next_index < self.min_new, low)
        if bos:
            logits = torch.where(((next_index == 0) & self.bos_on)[:, None], self.forced_bos_row, logits)
        if eos:
            logits = torch.where((next_index == self.max_new - 1)[:, None], self.forced_eos_row, logits)
        return logits


def _forced_row(ids, vocab: int, low: float, dtype, device) -> torch.Tensor:
    row = torch.full((vocab,), low, dtype=dtype, device=device)
    ids = [i for i in ids if 0 <= i < vocab]
    if ids:
        row[torch.tensor(ids, device=device)] = 0
    return row


def _fill_rows(logits: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, low: float) -> torch.Tensor:
    hit = torch.zeros(logits.shape[-1] + 1, dtype=torch.bool, device=logits.device).index_fill(0, cols, True)
    return logits.masked_fill(rows[:, None] & hit[None, :-1], low)
