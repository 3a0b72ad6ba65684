"""A job's corpus: the texts (prompts and outputs) of the records a decoder has decoded, oldest first, in one
fixed-size device tensor that the fast path's prompt lookup searches beside the record's own text
(LookaheadConfig.memory_tokens): a job of one kind repeats its keys, phrases and code verbatim. A hashed index of
its 2-4 token n-grams says where each last ended, so a step reads a few entries instead of scanning the corpus:
its cost does not grow with the corpus."""
from __future__ import annotations

import torch

MIN_MATCH, MAX_MATCH = 2, 4  # n-gram lengths indexed (one token recurs anywhere in a long corpus)
HASH_MULTIPLIER = 1_000_003  # a token id times a power of it modulo the slots stays far inside int64
WRAP = 1 << 31  # positions are kept modulo this (int32); a stale one that wraps onto the corpus is a token check away


class JobCorpus:
    """The last `size` tokens of the job's texts, each after a -1 (which no match crosses; -1 where none yet), for
    each position how many tokens follow it within its text (`room`), and the index: for each n-gram length, hash
    slot and kind (any; followed by `continuation` tokens of its text) the global position where the newest such
    n-gram ends. Global positions count every token ever appended, modulo WRAP; `base` is tokens[0]'s, so an entry
    whose n-gram left the corpus points before it. What the index offers is only ever a guess: prompt lookup
    compares the tokens there (lp.candidate_tree), so a collision or a stale entry costs a candidate, never a token."""

    def __init__(self, size: int, device: torch.device, continuation: int = 1):
        self.continuation = continuation
        self.slots = max(1024, 1 << (4 * size - 1).bit_length())  # four slots a token: few n-grams share one
        self.tokens = torch.full((size,), -1, dtype=torch.long, device=device)
        self.room = torch.zeros(size, dtype=torch.long, device=device)
        self.newest = torch.full((MAX_MATCH - MIN_MATCH + 1, 2, self.slots), -1, dtype=torch.int32, device=device)
        self.base = torch.zeros((), dtype=torch.long, device=device)
        self.appended = size  # the -1s it starts with count: tokens[0] is global position 0
        powers = [[pow(HASH_MULTIPLIER, n - 1 - m, self.slots) if m < n else 0 for m in range(MAX_MATCH)]
                  for n in range(MIN_MATCH, MAX_MATCH + 1)]
        self.powers = torch.tensor(powers, device=device)  # [lengths, MAX_MATCH]: the hash's factors (slots_of)
        for t in (self.tokens, self.room, self.newest, self.base, self.powers):
            torch._dynamo.mark_static_address(t)

    def add(self, text) -> None:
        """Append a text (token ids) after a -1; the oldest tokens make room. Eager, once a record."""
        self.add_texts(torch.as_tensor(text, dtype=torch.long).flatten())

    def add_texts(self, corpus) -> None:
        """Append another corpus as it is (texts each after a -1, as `tokens` holds them; its first text may be cut)
        after a -1, in one pass, and index the n-grams that end in it."""
        corpus = torch.as_tensor(corpus, dtype=torch.long).flatten().to(self.tokens.device)
        if corpus.numel() == 0:  # (decided on the host: the device is never read)
            return
        size = self.tokens.numel()
        self.tokens.copy_(torch.cat([self.tokens, self.tokens.new_full((1,), -1), corpus])[-size:])
        self.appended += corpus.numel() + 1
        self.base.fill_((self.appended - size) % WRAP)
        at = torch.arange(size, device=self.tokens.device)
        stop = torch.where(self.tokens < 0, at, size)  # a separator, or the corpus' end
        stop = torch.cat([stop[1:], stop.new_full((1,), size)]).flip(0).cummin(0).values.flip(0)  # the next one after
        self.room.copy_(stop - at - 1)
        ends = at[-min(corpus.numel() + 1, size):]  # the new positions (an n-gram ending there is new)
        back = ends[:, None] - torch.arange(MAX_MATCH, device=ends.device)[None, :]
        slot, ok = self.slots_of(torch.where(back >= 0, self.tokens[back.clamp(min=0)], -1))  # [new, lengths]
        whole = (self.room[ends] >= self.continuation)[:, None]
        kinds = torch.stack([ok, ok & whole], -1)  # [new, lengths, 2]: any; followed by a whole continuation
        cell = (torch.arange(ok.shape[1], device=ends.device)[:, None] * 2 + torch.arange(2, device=ends.device)) \
            * self.slots + slot[..., None]  # each new n-gram's entry in the flattened table, per kind
        position = (ends + self.appended - size)[:, None, None].expand_as(cell)
        newest = torch.full((self.newest.numel(),), -1, dtype=torch.long, device=ends.device).scatter_reduce(
            0, cell[kinds], position[kinds], "amax").view_as(self.newest)  # per entry the newest: no duplicate writes
        self.newest.copy_(torch.where(newest >= 0, newest % WRAP, self.newest))

    def slots_of(self, grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash slots of n-grams given by their last MAX_MATCH tokens, last first ([..., MAX_MATCH]; a negative
        token: none), for each indexed length ([..., lengths]), and whether all of its tokens are tokens: the
        polynomial sum of token x HASH_MULTIPLIER^(tokens before it in the n-gram), modulo the slots."""
        slot = (grams.clamp(min=0)[..., None, :] * self.powers).sum(-1) % self.slots
        ok = (grams >= 0).long().cumprod(-1)[..., MIN_MATCH - 1:].bool()
        return slot, ok

    def positions(self, suffix: torch.Tensor) -> torch.Tensor:
        """Where in `tokens` the newest n-grams (of each length and kind) that end like the text, `suffix` its last
        MAX_MATCH tokens last first, end: [lengths x 2] indices, -1 for none. A hash collision may give a position
        that does not match: the caller compares the tokens."""
        slot, ok = self.slots_of(suffix)
        lengths = torch.arange(slot.numel(), device=slot.device)
        at = (self.newest[lengths, :, slot].long() - self.base) % WRAP  # [lengths, 2]
        return torch.where(ok[:, None] & (at < self.tokens.numel()), at, -1).flatten()
