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
    """The values of `group`'s first rank on every rank of the group: a gloo group (the host's tensors), such as a
    replica's from lp.distributed.replicas.replica_groups, so it works whatever backend the decoding uses."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.source = dist.get_global_rank(group, 0)
        self.leader = dist.get_rank() == self.source
        self.size = dist.get_world_size(group)

    def first(self, value: int) -> int:
        row = torch.tensor([int(value)], dtype=torch.int64)
        self.dist.broadcast(row, src=self.source, group=self.group)
        return int(row.item())

    def first_floats(self, values: list[float]) -> list[float]:
        """The leader's list (every rank passes one of the same length)."""
        row = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.dist.broadcast(row, src=self.source, group=self.group)
        return row.tolist()
