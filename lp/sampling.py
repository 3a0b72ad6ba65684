"""Sampling that lookahead verification can check exactly: the token at each position is a fixed function of
(seed, position, logits).

Each position gets one uniform number from a counter-based hash of (seed, position), so every rank and every
step draws the same number for it without communicating, and the token is the inverse of the processed
distribution's CDF at that number. A sampled sequence is then the greedy sequence of a deterministic rule,
lookahead verifies it unchanged, and it equals a plain one-token-at-a-time sampler with the same seed.
The logits are processed as transformers' `generate(do_sample=True)` does: temperature, top-k, top-p, min-p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import check_int, check_number
from .greedy_rules import refuse

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """Sampling settings: temperature > 0, top_k (0 = off), top_p in (0, 1] (1 = off), min_p in [0, 1) (0 = off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


# generation_config settings a sampler would have to reproduce but this one does not: refused by name, as
# greedy_rules refuses the ones no lookahead decoding reproduces
_UNSUPPORTED = {"typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,)}


def sampling_settings(generation_config, config) -> Sampling | None:
    """The sampling a generation uses, or None for greedy: LookaheadConfig's fields where set, else the model's
    generation_config (do_sample honoured as generate() does). A temperature of 0 means greedy."""
    gc = generation_config
    sample = config.sample if config.sample is not None else bool(getattr(gc, "do_sample", False))
    if not sample:
        return None

    def pick(name: str, off):
        mine = getattr(config, name)
        value = mine if mine is not None else getattr(gc, name, None)
        return off if value is None else value

    temperature = float(pick("temperature", 1.0))
    if temperature == 0:
        return None
    refuse(gc, _UNSUPPORTED)
    settings = Sampling(temperature, int(pick("top_k", 0)), float(pick("top_p", 1.0)), float(pick("min_p", 0.0)))
    check_sampling(settings)
    return settings


def check_sampling(s: Sampling) -> None:
    """Refuse values outside their ranges (those read from a generation_config too), as LookaheadConfig does."""
    check_number("temperature", s.temperature, 0, float("inf"), low_open=True, high_open=True)
    check_int("top_k", s.top_k, 0)
    check_number("top_p", s.top_p, 0, 1, low_open=True)
    check_number("min_p", s.min_p, 0, 1, high_open=True)


def uniforms(seed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1) per position [R], a hash (splitmix64) of (seed, position): the same on every device."""
    x = seed * -7046029254386353131 + positions * -4658895280553007687 + 1  # odd constants, int64 wrap-around
    x = _mix(x)
    x = _mix(x ^ seed)
    bits = _shift_right(x, 11)  # 53 random bits
    return (bits.double() + 0.5) * (1.0 / (1 << 53))


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * -4658895280553007687
    x = (x ^ _shift_right(x, 27)) * -7723592293110705685
    return x ^ _shift_right(x, 31)


def process(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on logits [R, V], as transformers' warpers apply them (float64)."""
    x = logits.double() / s.temperature
    low = -torch.inf
    if s.top_k:
        kth = x.topk(min(s.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, low)
    if s.top_p < 1:
        ascending, order = x.sort(dim=-1)
        cut = ascending.softmax(-1).cumsum(-1) <= 1 - s.top_p
        cut[:, -1] = False  # the most likely token always stays
        x = x.masked_fill(cut.scatter(1, order, cut), low)
    if s.min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), low)
    return x


def sample(logits: torch.Tensor, positions: torch.Tensor, seed: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The token each row [R, V] draws for the absolute position it predicts (positions [R]), under `seed` (0-d)."""
    cdf = process(logits, s).softmax(-1).cumsum(-1)
    target = uniforms(seed, positions) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None]).squeeze(1).clamp(max=logits.shape[-1] - 1)


def reference_sample(model, prompt: list[int], max_new_tokens: int, settings: Sampling, seed: int,
                     rules=None) -> list[int]:
    """The plain sampler lookahead sampling must equal: one token per forward, the same draw per position.
    `rules` (GreedyRules) applies the generation_config's position rules first, as generate() does."""
    from transformers import DynamicCache

    from .decoding import cache_argument  # (decoding imports this module)

    cache_arg = cache_argument(model)
    device = next(model.parameters()).device
    seed_t = torch.tensor(seed, device=device)
    ids = torch.tensor([list(prompt)], device=device)
    out, past = [], DynamicCache()  # filled in place
    eos = set(rules.eos_ids) if rules is not None else set()
    with torch.inference_mode():
        for i in range(max_new_tokens):
            result = model(input_ids=ids, use_cache=True, **{cache_arg: past})
            logits = result.logits[0, -1:].clone()
            if rules is not None:
                logits = rules.apply(logits, torch.tensor([i], device=device))
            position = torch.tensor([len(prompt) + i], device=device)
            token = int(sample(logits, position, seed_t, settings)[0])
            out.append(token)
            if token in eos:
                break
            ids = torch.tensor([[token]], device=device)
    return out
