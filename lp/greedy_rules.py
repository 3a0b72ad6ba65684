"""The parts of a model's generation_config that greedy decoding obeys, applied to many rows at once.

Lookahead decoding scores tokens at many positions in one forward, so a logits rule is exact here only
when it depends on the position alone (suppressed tokens, minimum lengths, forced tokens). Rules that
depend on the text generated so far (repetition penalties, n-gram blocking, ...) are refused, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedGenerationSetting(ValueError):
    """The model's generation_config asks for something lookahead decoding cannot reproduce exactly."""


# setting -> values that mean "off"; anything else is refused with the setting's name.
_REFUSED = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "num_return_sequences": (None, 1),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "constraints": (None,),
    "force_words_ids": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "watermarking_config": (None,),
    "token_healing": (None, False),
    "prompt_lookup_num_tokens": (None,),
}


@dataclass(frozen=True)
class GreedyRules:
    """Position-only logits rules plus the stopping conditions of one generation."""

    prompt_len: int
    max_new_tokens: int
    eos_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    suppress: tuple[int, ...] = ()
    begin_suppress: tuple[int, ...] = ()
    forced_bos: int | None = None
    forced_eos: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        """Whether any logits rule can change an argmax (lets the hot loop skip the work)."""
        return bool(self.suppress or self.begin_suppress or self.forced_bos is not None or self.forced_eos
                    or (self.min_new_tokens and self.eos_ids))

    def apply(self, logits: torch.Tensor, next_index: torch.Tensor) -> torch.Tensor:
        """Mask `logits` [R, V] in place; next_index [R] is the index among new tokens each row predicts."""
        if not self.active:
            return logits
        low = torch.finfo(logits.dtype).min
        if self.suppress:
            logits[:, list(self.suppress)] = low
        if self.begin_suppress:
            first = (next_index == 0).unsqueeze(1)
            cols = list(self.begin_suppress)
            logits[:, cols] = logits[:, cols].masked_fill(first, low)
        if self.min_new_tokens and self.eos_ids:
            early = (next_index < self.min_new_tokens).unsqueeze(1)
            cols = list(self.eos_ids)
            logits[:, cols] = logits[:, cols].masked_fill(early, low)
        if self.forced_bos is not None and self.prompt_len == 1:
            _force(logits, next_index == 0, [self.forced_bos], low)
        if self.forced_eos:
            _force(logits, next_index == self.max_new_tokens - 1, list(self.forced_eos), low)
        return logits


def _force(logits: torch.Tensor, rows: torch.Tensor, tokens: list[int], low: float) -> None:
    """As transformers' forced-token processors: the row becomes 0 on `tokens`, the minimum elsewhere."""
    forced = torch.full((logits.shape[-1],), low, dtype=logits.dtype, device=logits.device)
    forced[tokens] = 0
    logits.copy_(torch.where(rows.unsqueeze(1), forced, logits))


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def greedy_rules(generation_config, prompt_len: int, max_new_tokens: int | None) -> GreedyRules:
    """Read a transformers GenerationConfig the way `generate(do_sample=False)` would, or refuse it."""
    gc = generation_config
    for name, neutral in _REFUSED.items():
        value = getattr(gc, name, None)
        if value not in neutral:
            raise UnsupportedGenerationSetting(
                f"generation_config.{name}={value!r} cannot be reproduced exactly by lookahead decoding; "
                f"set it to {neutral[-1]!r} (for example model.generation_config.{name} = {neutral[-1]!r})")
    if max_new_tokens is None:
        if gc.max_new_tokens is not None:
            max_new_tokens = gc.max_new_tokens
        elif gc.max_length is not None:
            max_new_tokens = max(gc.max_length - prompt_len, 0)
        else:
            max_new_tokens = 20
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    suppress = list(_as_ids(gc.suppress_tokens))
    for words in gc.bad_words_ids or ():
        if len(words) != 1:
            raise UnsupportedGenerationSetting(
                "generation_config.bad_words_ids with multi-token entries cannot be reproduced exactly; "
                "keep single-token entries only")
        suppress.append(int(words[0]))
    eos = _as_ids(gc.eos_token_id)
    min_new = max(gc.min_new_tokens or 0, (gc.min_length or 0) - prompt_len)
    forced_eos = _as_ids(gc.forced_eos_token_id)
    return GreedyRules(
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        min_new_tokens=min_new,
        suppress=tuple(sorted(set(suppress))),
        begin_suppress=_as_ids(gc.begin_suppress_tokens),
        forced_bos=gc.forced_bos_token_id,
        forced_eos=forced_eos,
    )
