"""Independent lookahead teams (replicas) draining one queue of prompts.

The world splits into `replicas x lp x tp` ranks, replica-major: rank = (replica * lp + lp_index) * tp + tp_rank.
`lp` is the ranks per lookahead team (model copies that split one step), `tp` the tensor-parallel ranks per copy,
and every replica is a team of its own with its own process groups. Replicas take prompts from one atomic
counter in the rendezvous store, so long and short prompts balance themselves; inside a replica its first rank
claims and the others hear the claim by a broadcast, so the whole team decodes the same prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist



class LayoutError(ValueError):
    """The world cannot be split into the replicas, lp and tp asked for; the message says what to launch."""


@dataclass(frozen=True)
class Layout:
    """How the world's ranks split into replicas of lp x tp ranks."""

    replicas: int
    lp: int
    tp: int

    @property
    def team_size(self) -> int:
        """Ranks in one replica."""
        return self.lp * self.tp

    def replica_of(self, rank: int) -> int:
        return rank // self.team_size

    def ranks_of(self, replica: int) -> list[int]:
        return list(range(replica * self.team_size, (replica + 1) * self.team_size))


def split_world(world: int, tp: int = 1, lp: int | None = None, replicas: int | None = None) -> Layout:
    """The layout of `world` ranks: lp defaults to what is left of the world after tp and replicas (one team by
    default), replicas to what is left after lp and tp; sizes that do not multiply to the world are refused."""
    for name, value in (("tp", tp), ("lp", lp), ("replicas", replicas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    if world % tp:
        raise LayoutError(f"world size {world} is not divisible by tp={tp}: launch a multiple of {tp} ranks")
    if lp is None:
        r = replicas or 1
        if world % (r * tp):
            raise LayoutError(f"replicas={r} x tp={tp} does not divide the world of {world} rank{'s' * (world != 1)}: launch a "
                                      f"multiple of {r * tp} ranks")
        return Layout(r, world // (r * tp), tp)
    if lp * tp > world:
        raise LayoutError(f"lp={lp} x tp={tp} = {lp * tp} ranks, but the world has {world}")
    if world % (lp * tp):
        raise LayoutError(f"lp={lp} x tp={tp} = {lp * tp} ranks a team does not divide the world of {world} "
                                  f"ranks: launch a multiple of {lp * tp} ranks")
    layout = Layout(world // (lp * tp), lp, tp)
    if replicas is not None and replicas != layout.replicas:
        raise LayoutError(f"replicas={replicas} x lp={lp} x tp={tp} = {replicas * lp * tp} ranks, but the "
                                  f"world has {world}")
    return layout


def replica_groups(layout: Layout) -> list:
    """A process group per replica (every rank makes every group, in the same order); None for teams of one."""
    if layout.team_size == 1:
        return [None] * layout.replicas
    return [dist.new_group(layout.ranks_of(r), backend="gloo") for r in range(layout.replicas)]  # host claims


class WorkQueue:
    """Hands out the indices 0..total-1, each exactly once over all replicas, in claim order.

    The replica's first rank adds 1 to a counter in the rendezvous store and broadcasts what it got to its team.
    Without a store (an MPI-initialised world) replica r takes r, r + R, r + 2R, ... instead."""

    def __init__(self, total: int, layout: Layout, rank: int, group=None, store=None, key: str = "lp-queue"):
        self.total, self.layout, self.group, self.store, self.key = total, layout, group, store, key
        self.replica = layout.replica_of(rank)
        self.leader = layout.ranks_of(self.replica)[0]
        self.is_leader = rank == self.leader
        self._static = self.replica  # the fallback's next index

    def claim(self) -> int | None:
        """The next index for this replica (the same on every rank of it), or None when the queue is empty."""
        if self.store is None:
            index, self._static = self._static, self._static + self.layout.replicas
        else:
            index = self.store.add(self.key, 1) - 1 if self.is_leader else 0
            if self.group is not None:
                value = torch.tensor([index], dtype=torch.long)
                dist.broadcast(value, src=self.leader, group=self.group)
                index = int(value[0])
        return index if index < self.total else None
