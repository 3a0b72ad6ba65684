"""The n-gram pool as device tensors: for each key token a ring of at most G continuations of length N-1.

Lookup and insertion are fixed-shape tensor ops, so they run inside the compiled step with no host sync.
A continuation already stored under its key is not stored twice; a full ring drops its oldest entry.
Lookup returns the newest first. The table is [vocab, G, N-1] (61 MB for a 128k vocabulary at G=15, N=5).
"""
from __future__ import annotations

import math

import torch

from .ngram_pool import NGramPool

# A key's running average of the tokens a full step from it committed, in eighths (integers: exact on every device):
# where it starts (4 tokens: a memory is tried first, wherever a full step costs up to 4 plain ones), the most one
# step adds (bounds the sum), and the bar (1.5 tokens) until the decoder has timed a full step against a plain one
# (`trust_at`: a full step pays where it commits at least as many tokens as the plain steps its time would have run).
GAIN_SCALE, GAIN_START, GAIN_CAP, TRUST_AT = 8, 32, 16, 12


class DevicePool:
    """Rings of continuations per key token, with fixed-shape `lookup` and `insert`."""

    def __init__(self, vocab: int, guess: int, length: int, device: torch.device):
        self.vocab, self.guess, self.length = vocab, guess, length
        rings = max(guess, 1)
        # one spare key row (index `vocab`) takes the writes of rejected n-grams, so every scatter has a fixed size
        self.tokens = torch.zeros(vocab + 1, rings, length, dtype=torch.long, device=device)
        self.count = torch.zeros(vocab + 1, dtype=torch.long, device=device)
        self.next = torch.zeros(vocab + 1, dtype=torch.long, device=device)
        # a job's memory: which generation last stored under a key, and what full steps from the key committed (a
        # running average in eighths of a token, GAIN_START at first: trusted), against the bar `trust_at`
        self.stamp = torch.full((vocab + 1,), -1, dtype=torch.long, device=device)
        self.gain = torch.full((vocab + 1,), GAIN_START, dtype=torch.long, device=device)
        self.trust_at = torch.full((), TRUST_AT, dtype=torch.long, device=device)
        for t in (self.tokens, self.count, self.next, self.stamp, self.gain, self.trust_at):
            torch._dynamo.mark_static_address(t)

    def load(self, pool: NGramPool, keys, keep: bool = False, generation: int = 0) -> None:
        """Start generation `generation` from a host pool whose keys are among `keys` (the prompt's n-grams, in its
        order); with `keep` (a job's memory) they join what the table already holds, as its newest entries."""
        if keep:
            grams = [(key, *entry) for key in dict.fromkeys(keys) for entry in reversed(pool.candidates(key, self.guess))]
            self.insert_all(grams, generation)
            return
        self.count.zero_()
        self.next.zero_()
        self.stamp.fill_(-1)
        self.gain.fill_(GAIN_START)
        rows, slots, values, counts = [], [], [], []
        for key in dict.fromkeys(keys):
            entries = pool.candidates(key, self.guess)  # newest first
            if not entries:
                continue
            c = len(entries)
            for j, entry in enumerate(entries):
                rows.append(key)
                slots.append(c - 1 - j)  # the newest sits just before the write pointer
                values.append(entry)
            counts.append((key, c))
        if not rows:
            return
        device = self.tokens.device
        k = torch.tensor(rows, device=device)
        self.tokens[k, torch.tensor(slots, device=device)] = torch.tensor(values, dtype=torch.long, device=device)
        ck = torch.tensor([key for key, _ in counts], device=device)
        cv = torch.tensor([c for _, c in counts], device=device)
        self.count[ck] = cv
        self.next[ck] = cv % max(self.guess, 1)
        self.stamp[ck] = generation

    def insert_all(self, grams, generation: int = -1, chunk: int = 256) -> None:
        """Insert n-grams [M, N] (a tensor or a list of rows), oldest first, in chunks (insert compares a chunk with
        itself), as generation `generation`'s (-1: none's, a text remembered from outside)."""
        device = self.tokens.device
        grams = torch.as_tensor(grams, dtype=torch.long).to(device)
        if self.guess == 0 or grams.numel() == 0:
            return
        stamp = torch.tensor(generation, device=device)
        for part in grams.split(chunk):
            self.insert(part, torch.ones(part.shape[0], dtype=torch.bool, device=device), stamp)

    def remember(self, tokens) -> None:
        """Insert every n-gram of a text (token ids), in its order."""
        tokens = torch.as_tensor([int(t) for t in tokens], dtype=torch.long)
        if tokens.numel() > self.length:
            self.insert_all(tokens.unfold(0, self.length + 1, 1))

    def grams(self) -> torch.Tensor:
        """Every stored n-gram [M, N], each key's oldest first (insert_all of them rebuilds the pool)."""
        g = max(self.guess, 1)
        keys = (self.count[: self.vocab] > 0).nonzero().flatten()
        count, after = self.count[keys][:, None], self.next[keys][:, None]
        age = torch.arange(g, device=keys.device)[None, :]  # 0 = the oldest entry of a key
        slots = (after - count + age) % g  # a full ring's oldest entry sits where the next one goes
        grams = torch.cat([keys[:, None, None].expand(-1, g, 1), self.tokens[keys[:, None], slots]], -1)
        return grams.transpose(0, 1)[(age < count).T]  # age-major: every key's entries stay in their order

    def worth_a_step(self, key: torch.Tensor, generation: torch.Tensor) -> torch.Tensor:
        """Whether the entries under `key` ([1]) deserve a full step (0-d bool): there are some, and either this
        generation stored some of them or full steps from this key have lately committed enough tokens to pay for
        their cost (`trust_at`; a job's memory is tried, and given up on where it does not pay)."""
        stored = self.count.index_select(0, key)[0] > 0
        mine = self.stamp.index_select(0, key)[0] == generation
        trusted = self.gain.index_select(0, key)[0] >= self.trust_at
        return stored & (mine | trusted)

    def record_gain(self, key: torch.Tensor, committed: torch.Tensor) -> None:
        """A full step from `key` ([1]) committed `committed` tokens (0-d, at least 1): update its running average
        (3/4 the old one, 1/4 this step)."""
        before = self.gain.index_select(0, key)
        self.gain.index_put_((key,), (3 * before + GAIN_SCALE * committed.clamp(max=GAIN_CAP)) // 4)

    def set_cost_ratio(self, full_over_plain: float) -> None:
        """Tell the pool what a full step costs in plain steps: the bar its keys' running averages must reach (a
        fill from the host, no read)."""
        self.trust_at.fill_(max(GAIN_SCALE, math.ceil(GAIN_SCALE * full_over_plain)))

    def lookup(self, key: torch.Tensor, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries first..first+size-1 (newest first) under `key` (0-d): tokens [size, N-1] and valid [size]."""
        g = max(self.guess, 1)
        key = key.view(1)  # a 1-element index gathers on the device (a 0-d one would be read on the host)
        order = torch.arange(first, first + size, device=key.device)
        slots = (self.next.index_select(0, key) - 1 - order) % g
        return self.tokens.index_select(0, key)[0].index_select(0, slots), order < self.count.index_select(0, key)

    def chained(self, tokens: torch.Tensor, valid: torch.Tensor, chain: int, room: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each candidate [K, N-1] (valid [K, N-1]) continued by each of the `chain` newest entries stored under
        its last token, cut to `room` tokens: [K * chain, N-1 + room], candidate-major. A continuation is valid
        where its candidate is and the entry exists: a pool n-gram that is accepted whole often runs on."""
        g = max(self.guess, 1)
        k, n = tokens.shape
        last = tokens[:, -1:]  # [K, 1]
        nth = torch.arange(chain, device=tokens.device)
        more = self.tokens[last, (self.next[last] - 1 - nth) % g][..., :room]  # [K, chain, room]
        stored = valid[:, -1:] & (self.count[last] > nth)  # [K, chain]
        rows = torch.cat([tokens[:, None].expand(k, chain, n), more], -1)
        oks = torch.cat([valid[:, None].expand(k, chain, n), stored[..., None].expand(k, chain, more.shape[-1])], -1)
        return rows.flatten(0, 1), oks.flatten(0, 1)

    def insert(self, grams: torch.Tensor, valid: torch.Tensor, generation: torch.Tensor) -> torch.Tensor:
        """Insert n-grams [M, N] where `valid` [M], in order, for generation `generation` (0-d); returns how many
        were new (a 0-d tensor)."""
        if self.guess == 0:
            return torch.zeros((), dtype=torch.long, device=grams.device)
        g = self.guess
        keys, conts = grams[:, 0], grams[:, 1:]
        m = keys.numel()
        safe_keys = torch.where(valid, keys, self.vocab)
        stored = self.tokens[safe_keys]  # [M, G, N-1]
        filled = torch.arange(g, device=keys.device)[None, :] < self.count[safe_keys][:, None]
        present = ((stored == conts[:, None, :]).all(-1) & filled).any(-1)
        same_key = keys[:, None] == keys[None, :]
        earlier = torch.ones(m, m, dtype=torch.bool, device=keys.device).tril(-1)  # [i, j]: j before i
        same = same_key & (conts[:, None, :] == conts[None, :, :]).all(-1) & earlier & valid[None, :]
        new = valid & ~present & ~same.any(-1)
        rank = (same_key & earlier & new[None, :]).sum(-1)  # new n-grams under the same key before this one
        later = (same_key & earlier.T & new[None, :]).sum(-1)  # ... and after it: a ring keeps the newest G
        kept = new & (later < g)
        target_key = torch.where(kept, keys, self.vocab)
        slot = torch.where(kept, (self.next[target_key] + rank) % g, 0)
        # each row's key gets all of this insert's new entries at once: every write to a key carries the same value,
        # and no entry is read back after a write (in-place read-modify-write is what the CUDA issue suspects)
        total = (same_key & new[None, :]).sum(-1)  # every new n-gram under the key, those the ring passed over too
        count = (self.count[target_key] + total).clamp(max=g)
        after = (self.next[target_key] + total) % g
        self.tokens.index_put_((target_key, slot), conts)
        self.count.index_put_((target_key,), count)
        self.next.index_put_((target_key,), after)
        self.stamp.index_put_((target_key,), generation.expand_as(target_key))
        return kept.sum()
