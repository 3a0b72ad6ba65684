"""How often each candidate source was right: measured chances that rank the tree's nodes when its budget binds.

One class per source: prompt lookup by match length (0..MAX_MATCH) and the pool by entry age (newest first).
After each full step every candidate is checked against the tokens the step committed: its leading tokens that
match are hits, and its first token that does not (where the committed run reaches it) a miss. A class's chance is
its hits over its tries, drawn toward the hand-set prior by PRIOR_TRIES pseudo-tries. The counts are integers,
halved past HALVE_AT (recent steps weigh more), so the figures are exact and the same on every rank and device.
"""
from __future__ import annotations

import torch

from .candidate_tree import LOOKUP_STRENGTH, POOL_DECAY, POOL_STRENGTH

PRIOR_TRIES = 16  # the prior counts as this many tries: a class's own figure takes over within a few steps
HALVE_AT = 4096


class SourceStats:
    """Hits and tries per candidate class: LOOKUP_CLASSES match lengths, then one class per pool entry age."""

    LOOKUP_CLASSES = len(LOOKUP_STRENGTH)

    def __init__(self, guess: int, device: torch.device):
        ages = torch.arange(max(guess, 1), dtype=torch.float64)
        self.prior = torch.cat([torch.tensor(LOOKUP_STRENGTH, dtype=torch.float64),
                                POOL_STRENGTH * POOL_DECAY ** ages]).to(device)
        self.hits = torch.zeros(self.prior.numel(), dtype=torch.long, device=device)
        self.tries = torch.zeros_like(self.hits)
        for t in (self.hits, self.tries):
            torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        self.hits.zero_()
        self.tries.zero_()

    def chances(self) -> torch.Tensor:
        """Each class's estimated chance that a candidate's next token is right [classes] (float64)."""
        return (self.hits + PRIOR_TRIES * self.prior) / (self.tries + PRIOR_TRIES)

    def pool_class(self, rows: int, chain: int) -> torch.Tensor:
        """The classes of the pool's candidate rows, newest entry first (a chained row is its entry's) [rows * chain]."""
        return (self.LOOKUP_CLASSES + torch.arange(rows, device=self.hits.device)).repeat_interleave(max(chain, 1))

    def update(self, candidates: torch.Tensor, valid: torch.Tensor, classes: torch.Tensor, truth: torch.Tensor,
               count: torch.Tensor) -> None:
        """Count a step's candidates [R, L] (valid [R, L], classes [R]) against the `count` (0-d) tokens it committed,
        truth [A] (entries past `count` unknown)."""
        length = candidates.shape[1]
        j = torch.arange(length, device=candidates.device)
        known = j < count
        right = (candidates == truth[j.clamp(max=truth.numel() - 1)][None, :]) & valid & known[None, :]
        hits = right.long().cumprod(-1).sum(-1)  # [R]
        at = hits.clamp(max=length - 1)[:, None]
        miss = (hits < length) & valid.gather(1, at)[:, 0] & known.gather(0, at[:, 0])
        hits_now = self.hits + torch.zeros_like(self.hits).index_add(0, classes, hits)
        tries_now = self.tries + torch.zeros_like(self.tries).index_add(0, classes, hits + miss.long())
        halve = tries_now > HALVE_AT
        self.hits.copy_(torch.where(halve, hits_now // 2, hits_now))
        self.tries.copy_(torch.where(halve, tries_now // 2, tries_now))
