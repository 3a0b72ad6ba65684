"""One rank decides, every rank of its group follows: the group's first rank's values, on every rank.

A self-tuning replica sharded over tensor-parallel ranks times one forward together (the forward is collective), so
its ranks must make the same choices from one rank's clock: when to stop measuring, which setting to run. Fixed-shape
broadcasts from the group's first rank, never pickled objects.
"""
from __future__ import annotations

import torch


class Alone:
    """A process that decides for itself (no group): its own values."""

    leader = True
    size = 1

    def first(self, value: int) -> int:
        return value

    def first_floats(self, values: list[float]) -> list[float]:
        return list(values)


class GroupAgreement:
    """The values of `group`'s first rank (None: the whole world) on every rank of the group; `device` is where the
    group's backend takes tensors (the host for gloo, the GPU for NCCL)."""

    def __init__(self, group=None, device: torch.device | str = "cpu"):
        import torch.distributed as dist

        self.dist, self.group, self.device = dist, group, torch.device(device)
        self.source = dist.get_global_rank(group, 0) if group is not None else 0
        self.leader = dist.get_rank() == self.source
        self.size = dist.get_world_size(group)

    def first(self, value: int) -> int:
        row = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        self.dist.broadcast(row, src=self.source, group=self.group)
        return int(row.item())

    def first_floats(self, values: list[float]) -> list[float]:
        """The leader's list (every rank passes one of the same length)."""
        row = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self.dist.broadcast(row, src=self.source, group=self.group)
        return row.cpu().tolist()
