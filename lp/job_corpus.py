"""A job's corpus: the texts (prompts and outputs) of the records a decoder has decoded, oldest first, in one
fixed-size device tensor that the fast path's prompt lookup searches beside the record's own text
(LookaheadConfig.memory_tokens): a job of one kind repeats its keys, phrases and code verbatim."""
from __future__ import annotations

import torch


class JobCorpus:
    """The last `size` tokens of the job's texts, each after a -1 (which no match crosses; -1 where none yet), and
    for each position how many tokens follow it within its text (`room`: a step reads it instead of scanning)."""

    def __init__(self, size: int, device: torch.device):
        self.tokens = torch.full((size,), -1, dtype=torch.long, device=device)
        self.room = torch.zeros(size, dtype=torch.long, device=device)
        for t in (self.tokens, self.room):
            torch._dynamo.mark_static_address(t)

    @property
    def searched(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What prompt lookup searches (lp.candidate_tree.prompt_lookup's `corpus`)."""
        return self.tokens, self.room

    def add(self, text) -> None:
        """Append a text (token ids) after a -1; the oldest tokens make room. Eager, once a record."""
        self.add_texts(torch.as_tensor(text, dtype=torch.long).flatten())

    def add_texts(self, corpus) -> None:
        """Append another corpus as it is (texts each after a -1, as `tokens` holds them; its first text may be cut)
        after a -1, in one pass."""
        corpus = torch.as_tensor(corpus, dtype=torch.long).flatten().to(self.tokens.device)
        if corpus.numel() == 0:  # (decided on the host: the device is never read)
            return
        size = self.tokens.numel()
        self.tokens.copy_(torch.cat([self.tokens, self.tokens.new_full((1,), -1), corpus])[-size:])
        at = torch.arange(size, device=self.tokens.device)
        stop = torch.where(self.tokens < 0, at, size)  # a separator, or the corpus' end
        stop = torch.cat([stop[1:], stop.new_full((1,), size)]).flip(0).cummin(0).values.flip(0)  # the next one after
        self.room.copy_(stop - at - 1)
