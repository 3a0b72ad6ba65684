"""The parts of a model's generation_config that greedy decoding obeys, applied to many rows at once.

Lookahead decoding scores tokens at many positions in one forward, so a logits rule is exact here only
when it depends on the position alone (suppressed tokens, minimum lengths, forced tokens). Rules that
depend on the text generated so far (repetition penalties, n-gram blocking, ...) are refused, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)  # device copies, see _on

    @property
    def active(self) -> bool:
        """Whether any logits rule can change an argmax (lets the hot loop skip the work)."""
        return bool(self.suppress or self.begin_suppress or self.forced_bos is not None or self.forced_eos
                    or (self.min_new_tokens and self.eos_ids))

    def apply(self, logits: torch.Tensor, next_index: torch.Tensor) -> torch.Tensor:
        """Mask `logits` [R, V] in place; next_index [R] is the index among new tokens each row predicts.

        Token ids and forced rows live on the logits' device, made once per generation (`_on`), so a step
        adds no host-to-device copies."""
        if not self.active:
            return logits
        low = torch.finfo(logits.dtype).min
        if self.suppress:
            logits.index_fill_(1, self._on("suppress", logits), low)
        if self.begin_suppress:
            _fill_rows(logits, self._on("begin_suppress", logits), next_index == 0, low)
        if self.min_new_tokens and self.eos_ids:
            _fill_rows(logits, self._on("eos_ids", logits), next_index < self.min_new_tokens, low)
        if self.forced_bos is not None and self.prompt_len == 1:
            _force(logits, next_index == 0, self._on("forced_bos", logits, forced=True))
        if self.forced_eos:
            _force(logits, next_index == self.max_new_tokens - 1, self._on("forced_eos", logits, forced=True))
        return logits

    def _on(self, name: str, logits: torch.Tensor, forced: bool = False) -> torch.Tensor:
        """The ids of rule `name` as a device index, or with `forced` as a [V] row: 0 on them, the minimum elsewhere
        (what transformers' forced-token processors produce)."""
        key = (name, forced, logits.device, logits.dtype)
        found = self._tensors.get(key)
        if found is None:
            ids = torch.tensor(_as_ids(getattr(self, name)), dtype=torch.long, device=logits.device)
            if forced:
                row = torch.full((logits.shape[-1],), torch.finfo(logits.dtype).min, dtype=logits.dtype,
                                 device=logits.device)
                ids = row.index_fill_(0, ids, 0)
            found = self._tensors[key] = ids
        return found


def _fill_rows(logits: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, low: float) -> None:
    """Set logits[r, cols] = low for the rows r where `rows` is true."""
    logits[:, cols] = logits[:, cols].masked_fill(rows.unsqueeze(1), low)


def _force(logits: torch.Tensor, rows: torch.Tensor, forced_row: torch.Tensor) -> None:
    logits.copy_(torch.where(rows.unsqueeze(1), forced_row, logits))


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, **generate_kwargs) -> list[int]:
    """transformers' own `generate(do_sample=False)` on one prompt, new tokens only: the output lookahead decoding
    reproduces. Extra keyword arguments go to generate (a streamer, prompt_lookup_num_tokens, ...)."""
    ids = torch.tensor([list(prompt)], device=next(model.parameters()).device)
    gc = model.generation_config
    if gc.pad_token_id is None and gc.eos_token_id is not None:  # generate's own choice, minus its warning
        generate_kwargs.setdefault("pad_token_id", _as_ids(gc.eos_token_id)[0])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             **generate_kwargs)
    return out[0, ids.shape[1]:].tolist()


def refuse(generation_config, refused: dict) -> None:
    """Raise UnsupportedGenerationSetting naming the first setting in `refused` (name -> values meaning "off") that
    the generation_config turns on."""
    for name, neutral in refused.items():
        value = getattr(generation_config, name, None)
        if value not in neutral:
            raise UnsupportedGenerationSetting(
                f"generation_config.{name}={value!r} cannot be reproduced exactly by lookahead decoding; "
                f"set it to {neutral[-1]!r} (for example model.generation_config.{name} = {neutral[-1]!r})")


def greedy_rules(generation_config, prompt_len: int, max_new_tokens: int | None) -> GreedyRules:
    """Read a transformers GenerationConfig the way `generate(do_sample=False)` would, or refuse it."""
    gc = generation_config
    refuse(gc, _REFUSED)
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
