"""How the ranks decoding one sequence agree after each step. A single process is a team of one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .partition import Slice


@dataclass
class Agreement:
    """What every rank commits after a step: the winner's accepted tokens and the whole window's new top row."""

    accepted: list[int]
    winner: int
    top: list[int]


@dataclass
class CommStats:
    """Communication bookkeeping of one rank, per step."""

    seconds: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)


class SoloTeam:
    """One process: nothing to exchange."""

    rank = 0
    size = 1
    kv_sync = "none"

    def __init__(self):
        self.comm = CommStats()

    def begin(self, ngram: int, width: int) -> None:
        self.comm = CommStats()

    def agree(self, accepted: list[int], top: list[int], slices: Sequence[Slice], state_hash: int) -> Agreement:
        return Agreement(accepted, 0, top)

    def share_kv(self, cache, start: int, count: int, winner: int) -> None:
        return None

    def gather_rows(self, row):
        return row[None]

    def sum_kv(self, buffer) -> None:
        return None

    def pick(self, value: int) -> int:
        return value

    def report_failure(self, message: str) -> None:
        return None
