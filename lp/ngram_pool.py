"""The n-gram pool: (N-1)-gram continuations keyed by their first token, at most G per key, LRU."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class NGramPool:
    """Maps a key token to at most `capacity` continuations of length `length`, least recently used dropped.

    Re-inserting a continuation that is already there marks it most recently used. Lookup returns
    the most recently used first, so verification tries the freshest guesses first.
    """

    def __init__(self, capacity: int, length: int):
        self.capacity = capacity
        self.length = length
        self._table: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, key: int, continuation: Sequence[int]) -> None:
        """Insert one n-gram: `key` followed by `continuation` (length N-1)."""
        if self.capacity == 0:
            return
        entry = tuple(continuation)
        bucket = self._table.get(key)
        if bucket is None:
            bucket = self._table[key] = OrderedDict()
        if entry in bucket:
            bucket.move_to_end(entry)
            return
        bucket[entry] = None
        if len(bucket) > self.capacity:
            bucket.popitem(last=False)

    def add_sequence(self, tokens: Sequence[int], start: int = 0) -> None:
        """Insert every n-gram of `tokens` whose first token sits at index >= start."""
        n = self.length + 1
        for i in range(max(start, 0), len(tokens) - n + 1):
            self.add(tokens[i], tokens[i + 1 : i + n])

    def candidates(self, key: int, limit: int | None = None) -> list[tuple[int, ...]]:
        """Continuations stored under `key`, most recently used first (at most `limit`)."""
        bucket = self._table.get(key)
        if not bucket:
            return []
        out = list(reversed(bucket))
        return out if limit is None else out[:limit]

    def entries(self):
        """Every stored n-gram as (key, continuation), each key's oldest first."""
        for key, bucket in self._table.items():
            for entry in bucket:
                yield key, entry

    def __len__(self) -> int:
        return sum(len(b) for b in self._table.values())
