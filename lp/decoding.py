"""Exact lookahead decoding: one forward per step over [pending | lookahead window | candidates]."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .config import ConfigError, LookaheadConfig, check_int
from .distributed.partition import rank_shape, split_step
from .distributed.team import SoloTeam
from .greedy_rules import GreedyRules, greedy_rules
from . import memory_file
from .kv_cache import InPlaceCache
from .ngram_pool import NGramPool
from .sampling import Sampling, sample, sampling_settings
from .step_layout import StepShape, build_layout, step_mask, tokens_fed
from .window import LookaheadWindow


class PromptError(ValueError):
    """The prompt cannot be decoded (empty, batched, or no room left in the model's context)."""


@dataclass
class GenerationResult:
    """Outcome of one generation on this rank."""

    token_ids: list[int]
    steps: int
    accepted_per_step: list[int]
    wall_time_s: float
    prompt_tokens: int
    stop_reason: str  # "eos", "max_new_tokens" or "context"
    text: str | None = None
    tokens_fed_per_step: list[int] = field(default_factory=list)
    comm_time_s: float = 0.0
    comm_bytes: int = 0
    ranks: int = 1
    compiled: bool = False  # the compiled fast path ran this generation
    compile_time_s: float = 0.0  # compiling its step (the first generation of a cache-size bucket); not in wall_time_s

    def add_step(self, emit: list[int], fed: int, elapsed_s: float) -> None:
        """Record one step that committed `emit` after feeding `fed` tokens, `elapsed_s` into the generation."""
        self.token_ids.extend(emit)
        self.steps += 1
        self.accepted_per_step.append(len(emit))
        self.tokens_fed_per_step.append(fed)
        self.wall_time_s = elapsed_s

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_step(self) -> float:
        return len(self.token_ids) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def summary(self) -> dict:
        """Plain-JSON view of the result."""
        fed = self.tokens_fed_per_step
        return {
            "new_tokens": self.new_tokens, "steps": self.steps, "tokens_per_step": round(self.tokens_per_step, 4),
            "latency_s": round(self.wall_time_s, 6), "tokens_per_second": round(self.tokens_per_second, 3),
            "stop_reason": self.stop_reason, "ranks": self.ranks,
            "tokens_fed_per_step": round(sum(fed) / len(fed), 2) if fed else 0.0,
            "comm_time_s": round(self.comm_time_s, 6), "comm_bytes": self.comm_bytes,
            "compiled": self.compiled, "compile_time_s": round(self.compile_time_s, 3),
        }


def context_length(config) -> int | None:
    """The longest sequence the model's positions allow, when its config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers 5.x, `past_key_values` in models of
    earlier 5.x releases (GPT-2 in 5.17, say), where an unknown `cache=` would be swallowed silently."""
    for forward in (model.forward, type(model).forward):  # a wrapper taking **kwargs: its model's class says
        params = inspect.signature(forward).parameters
        if "cache" in params or "past_key_values" in params:
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


def within_context(budget: int, prompt_len: int, context: int | None) -> int:
    """The new tokens a generation may make: its budget, within the room its prompt leaves in the model's context
    (a budget of 10**30 is decoded to the context)."""
    return budget if context is None else max(0, min(budget, context - prompt_len))


def prompt_ids(input_ids) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise PromptError(f"a decoder takes one sequence: input_ids has batch size {input_ids.shape[0]}; pass "
                                  "input_ids[i:i+1], or the prompts as a list to lp.generate to decode them batched")
            input_ids = input_ids[0]
        ids = [int(t) for t in input_ids.tolist()]
    else:
        ids = [int(t) for t in input_ids]
    if not ids:
        raise PromptError("the prompt is empty: give at least one token")
    return ids


def _refuse_unsupported_model(model) -> None:
    config = model.config
    if config.is_encoder_decoder:
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; lookahead decoding needs a decoder-only model")
    attention = str(getattr(config, "_attn_implementation", None) or "")
    if attention.startswith("flash_attention") or "flash" in attention:
        raise ValueError(f"{type(model).__name__} uses attn_implementation={attention!r}, which reads a 4-D mask as "
                         "padding and would give wrong tokens; load it with attn_implementation='sdpa' (or 'eager')")
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ()
    if window or any("sliding" in str(t) for t in types):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention (sliding_window={window}), which the "
                         "lookahead mask does not reproduce; set config.sliding_window = None or use another model")


def _device_type(model) -> str:
    """The type ("cpu", "cuda", ...) of the device holding the model's first parameter."""
    return next(model.parameters()).device.type


class Decoder:
    """Runs lookahead decoding of `model` with `config`, alone or as one rank of a team.

    `Decoder(model, config)` is the compiled fast path (lp.fast_decoding.FastDecoder) where
    `config.compiled_on(device)` (compile=True, or by default on CUDA) and this eager reference engine otherwise
    (by default on CPUs); both give greedy decoding's tokens."""

    def __new__(cls, model, config: LookaheadConfig | None = None, team=None, **kwargs):
        if cls is Decoder and (config or LookaheadConfig()).compiled_on(_device_type(model)):
            from .fast_decoding import FastDecoder
            return super().__new__(FastDecoder)
        return super().__new__(cls)

    def __init__(self, model, config: LookaheadConfig | None = None, team=None):
        _refuse_unsupported_model(model)
        self.model = model
        self.config = config or LookaheadConfig()
        if type(self) is Decoder and self.config.fast_path_only:
            raise ConfigError("lookup, chain, budget and plain_steps shape the fast path's steps; the reference "
                              "engine verifies pool candidates only, in steps of every shape: turn compile on "
                              "(--compile) or drop them")
        self.team = team or SoloTeam()
        self.chosen_by = "user" if config is not None else "default"  # who picked the settings (lp.auto_tune: "auto")
        self.arm: str | None = None  # the tuner's name for the settings, when it chose them
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context = context_length(model.config)
        self._cache_arg = cache_argument(model)
        self._layouts: dict[StepShape, _DeviceLayout] = {}
        self._sampling: Sampling | None = None  # this generation's sampling (None: greedy), set by stream
        self.seed = self.config.seed  # this generation's seed (keys the sampling draws), set by stream
        self.memory = NGramPool(self.config.guess, self.config.ngram - 1)  # the job's pool (config.memory == "job")

    def remember(self, token_ids: Sequence[int]) -> None:
        """Add the n-grams of a text (token ids) to the job's memory, as if a generation had produced it: a job can
        start warm from texts of its kind. Changes steps, never tokens."""
        self.memory.add_sequence([int(t) for t in token_ids])

    def settings(self) -> dict:
        """What this decoder runs, resolved for its device (every output record says it, beside its `ranks`)."""
        cfg = self.config
        return {"engine": "reference", "window": cfg.window, "ngram": cfg.ngram, "guess": cfg.guess,
                "compiled": False, "memory": "job" if cfg.job_memory else "record", "chosen_by": self.chosen_by,
                **({"arm": self.arm} if self.arm else {})}

    def memory_grams(self) -> torch.Tensor:
        """The job's memory as n-grams [M, N], each key's oldest first (what lp.memory_file saves)."""
        rows = [[key, *entry] for key, entry in self.memory.entries()]
        return torch.tensor(rows, dtype=torch.long).view(-1, self.config.ngram)

    def remember_grams(self, grams) -> None:
        """Add n-grams [M, N'], each key's oldest first (a saved memory), to the job's memory: cut to N when longer,
        left out when shorter (lp.memory_file.fit)."""
        for key, *continuation in memory_file.fit(grams, self.config.ngram).tolist():
            self.memory.add(key, continuation)

    def memory_corpus(self) -> torch.Tensor:
        """The job's earlier texts that prompt lookup searches (the fast path's; this engine keeps none)."""
        return torch.zeros(0, dtype=torch.long)

    def remember_corpus(self, corpus) -> None:
        """Add the texts of a saved corpus (each after a -1) to the job's corpus (the fast path's)."""

    def stream(self, input_ids, max_new_tokens: int | None = None, result: GenerationResult | None = None,
               seed: int | None = None) -> Iterator[list[int]]:
        """Yield the tokens committed by each step (1..N of them); fills `result` as it goes. `seed` (default:
        config.seed) keys this generation's sampling draws and first window guesses."""
        cfg, team = self.config, self.team
        if seed is not None:
            check_int("seed", seed, 0, 2**63 - 1)
        self.seed = cfg.seed if seed is None else seed
        prompt = self.check_prompt(input_ids)
        rules, limit = self.plan(prompt, max_new_tokens)
        self._sampling = sampling_settings(self.model.generation_config, cfg)
        stats = result if result is not None else GenerationResult([], 0, [], 0.0, len(prompt), "max_new_tokens")
        stats.prompt_tokens, stats.ranks = len(prompt), team.size
        team.begin(cfg.ngram, cfg.window)
        try:
            yield from self._decode(prompt, rules, limit, stats)
        except Exception as error:
            team.report_failure(f"{type(error).__name__}: {error}")
            raise
        if stats.stop_reason != "eos" and limit < rules.max_new_tokens:
            stats.stop_reason = "context"
        stats.comm_time_s, stats.comm_bytes = sum(team.comm.seconds), sum(team.comm.bytes)

    def check_prompt(self, input_ids) -> list[int]:
        """The prompt as a list of ids, or PromptError saying what to change (empty, batched, no room left)."""
        prompt = prompt_ids(input_ids)
        if self.context is not None and len(prompt) >= self.context:
            raise PromptError(f"the prompt has {len(prompt)} tokens but the model's context is {self.context}; "
                              f"shorten it to at most {self.context - 1} tokens")
        return prompt

    def plan(self, prompt: list[int], max_new_tokens: int | None) -> tuple[GreedyRules, int]:
        """The generation's rules, and how many new tokens it may make: its budget, within the model's context."""
        rules = greedy_rules(self.model.generation_config, len(prompt), max_new_tokens)
        return rules, within_context(rules.max_new_tokens, len(prompt), self.context)

    def _decode(self, prompt: list[int], rules: GreedyRules, limit: int, stats: GenerationResult
                ) -> Iterator[list[int]]:
        cfg, team = self.config, self.team
        start = time.perf_counter()

        pool = self.memory if cfg.job_memory else NGramPool(cfg.guess, cfg.ngram - 1)
        if cfg.seed_pool_from_prompt:
            pool.add_sequence(prompt)
        window = LookaheadWindow(cfg.levels, cfg.window, prompt, self.seed)
        seed = torch.tensor(self.seed, device=self.device)
        widest_step = cfg.ngram + cfg.window * cfg.levels + cfg.guess * (cfg.ngram - 1)  # pending, window, candidates
        cache = InPlaceCache(capacity=_round_up(len(prompt) + limit + widest_step))
        committed = list(prompt)
        pending = [prompt[-1]]
        pending_per_rank = [1] * team.size
        state_hash = 0
        self._prefill(prompt[:-1], cache)

        while len(stats.token_ids) < limit:
            remaining = limit - len(stats.token_ids)
            cached = cache.length
            last_pos = cached + len(pending) - 1
            cand_len = min(cfg.ngram - 1, remaining - 1)
            candidates = _unique_prefixes(pool.candidates(pending[-1], cfg.guess), cand_len) if cand_len > 0 else []
            fits = self.context is None or last_pos + cfg.window + window.filled - 1 < self.context
            levels = window.filled if fits else 0
            slices = split_step(cfg.window, levels, len(candidates), cand_len, pending_per_rank)
            mine = slices[team.rank]
            my_cands = candidates[mine.cand_start : mine.cand_end]
            shape = rank_shape(mine, levels, cand_len, len(pending))
            preds = self._forward(shape, pending, window, my_cands, cache, rules, seed)

            cols = mine.columns if shape.levels else 0
            pred0, top, cand_preds = preds[0], preds[1 : 1 + cols], preds[1 + cols :]
            best, best_len = _longest_match(my_cands, pred0, cand_preds, cand_len)
            accepted = [pred0] + (cand_preds[best * cand_len : best * cand_len + best_len] if best_len else [])
            agreed = team.agree(accepted, top, slices if levels else [], state_hash)

            # Keep the KV of what this rank verified (its pending tokens, then its winning candidate's tokens).
            base = cached + len(pending)
            if agreed.winner == team.rank and len(agreed.accepted) > 1:
                rows = self._device_layout(shape).candidate_rows[best, : len(agreed.accepted) - 1] + cached
                cache.keep(base, rows)
            else:
                cache.crop_to(base)
            m = len(agreed.accepted) - 1
            if team.kv_sync == "gather":
                team.share_kv(cache, cached, len(pending) + m, agreed.winner)
                pending = [agreed.accepted[-1]]
                pending_per_rank = [1] * team.size
            else:
                pending = agreed.accepted if agreed.winner != team.rank else [agreed.accepted[-1]]
                pending_per_rank = [1 if r == agreed.winner else m + 1 for r in range(team.size)]

            if levels:
                for gram in window.advance(agreed.top):
                    pool.add(gram[0], gram[1:])
            emit, ended = cut_at_eos(agreed.accepted[:remaining], rules.eos_ids)
            if ended:
                stats.stop_reason = "eos"
            before = len(committed)
            committed.extend(emit)
            if cfg.seed_pool_from_output:
                pool.add_sequence(committed, start=before - (cfg.ngram - 1))
            state_hash = _mix(state_hash, emit, window, len(pool))
            stats.add_step(emit, tokens_fed(shape), time.perf_counter() - start)
            yield emit
            if ended:
                break

    def generate(self, input_ids, max_new_tokens: int | None = None, tokenizer=None,
                 on_tokens: Callable[[list[int]], None] | None = None, seed: int | None = None) -> GenerationResult:
        """Decode to the end; `on_tokens` receives each step's committed tokens as the step ends; `seed` overrides
        config.seed for this generation."""
        result = GenerationResult([], 0, [], 0.0, 0, "max_new_tokens")
        with torch.inference_mode():
            for tokens in self.stream(input_ids, max_new_tokens, result, seed):
                if on_tokens is not None:
                    on_tokens(tokens)
        if tokenizer is not None:
            result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return result

    def _prefill(self, tokens: list[int], cache: InPlaceCache) -> None:
        if not tokens:
            return
        n = len(tokens)
        ids = torch.tensor([tokens], device=self.device)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        mask = torch.full((n, n), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device).triu_(1)
        self.model(input_ids=ids, position_ids=positions, attention_mask=mask[None, None], use_cache=True,
                   logits_to_keep=1, **{self._cache_arg: cache})

    def _device_layout(self, shape: StepShape) -> "_DeviceLayout":
        """The step layout's tensors on the model's device, made once per shape (shapes repeat)."""
        found = self._layouts.get(shape)
        if found is None:
            layout = build_layout(shape)
            keep = [layout.last_pending]
            if shape.levels:
                keep += layout.window_rows[shape.levels - 1].tolist()
            keep += layout.candidate_rows.flatten().tolist()
            to = dict(device=self.device)
            found = self._layouts[shape] = _DeviceLayout(
                layout.depth.to(**to).unsqueeze(0), torch.tensor(keep, **to),
                layout.depth[keep].to(**to), ~layout.allowed.to(**to), layout.candidate_rows.to(**to))
        return found

    def _forward(self, shape: StepShape, pending: list[int], window: LookaheadWindow,
                 candidates: Sequence[tuple[int, ...]], cache: InPlaceCache, rules: GreedyRules,
                 seed: torch.Tensor) -> list[int]:
        """One forward of the step; returns argmax at [last pending, top window row, candidate rows]."""
        plan = self._device_layout(shape)
        tokens = list(pending)
        if shape.levels:
            tokens += window.rows[0][: shape.col_end]
            for j in range(1, shape.levels):
                tokens += window.rows[j][shape.col_start : shape.col_end]
        for cand in candidates:
            tokens += cand
        cached = cache.length
        ids = torch.tensor([tokens], dtype=torch.long).to(self.device, non_blocking=True)
        mask = step_mask(plan.hidden, cached, self.dtype)
        out = self.model(input_ids=ids, position_ids=plan.depth + cached, attention_mask=mask, use_cache=True,
                         logits_to_keep=plan.keep_rows, **{self._cache_arg: cache})
        logits = out.logits[0]
        if logits.shape[0] != plan.keep_rows.numel() or cache.length != cached + ids.shape[1]:
            raise RuntimeError(f"{type(self.model).__name__} returned {logits.shape[0]} logits rows for "
                               f"{plan.keep_rows.numel()} requested and grew the cache by {cache.length - cached} for "
                               f"{ids.shape[1]} tokens fed: it does not honour logits_to_keep or the given cache")
        if rules.active:
            logits = rules.apply(logits, plan.keep_depth + (cached + 1 - rules.prompt_len))
        if self._sampling is not None:  # the draw for the position each row predicts
            return sample(logits, plan.keep_depth + cached + 1, seed, self._sampling).tolist()
        return logits.argmax(-1).tolist()


@dataclass(frozen=True)
class _DeviceLayout:
    depth: torch.Tensor  # [1, T] position offsets
    keep_rows: torch.Tensor  # rows whose logits are needed: last pending, top window level, candidates
    keep_depth: torch.Tensor  # position offsets of those rows
    hidden: torch.Tensor  # [T, T] True where attention is masked within the step
    candidate_rows: torch.Tensor


def cut_at_eos(tokens: list[int], eos_ids) -> tuple[list[int], bool]:
    """The tokens up to and including the first EOS, and whether there was one (nothing after it is emitted)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


def _longest_match(candidates, pred0: int, cand_preds: list[int], cand_len: int) -> tuple[int, int]:
    """Index and length of the candidate whose prefix the model confirms longest (first wins ties)."""
    best, best_len = 0, 0
    for k, cand in enumerate(candidates):
        expect, n = pred0, 0
        while n < cand_len and cand[n] == expect:
            expect = cand_preds[k * cand_len + n]
            n += 1
        if n > best_len:
            best, best_len = k, n
    return best, best_len


def _unique_prefixes(candidates, length: int) -> list[tuple[int, ...]]:
    seen, out = set(), []
    for cand in candidates:
        prefix = cand[:length]
        if prefix not in seen:
            seen.add(prefix)
            out.append(prefix)
    return out


def _mix(state: int, tokens: Sequence[int], window: LookaheadWindow, pool_size: int) -> int:
    """A running fingerprint of what every rank must hold identically (tokens, window, pool size)."""
    h = state
    for t in tokens:
        h = (h * 1000003 + t + 1) & 0x7FFFFFFFFFFFFFFF
    h ^= hash(tuple(window.rows[-1])) & 0x7FFFFFFFFFFFFFFF
    return (h * 31 + pool_size) & 0x7FFFFFFFFFFFFFFF


def _round_up(n: int) -> int:
    size = 64
    while size < n:
        size *= 2
    return size


def generate(model, input_ids, config: LookaheadConfig | None = None, max_new_tokens: int | None = None,
             tokenizer=None, on_tokens: Callable[[list[int]], None] | None = None, team=None,
             seed: int | None = None, batch_size: int | None = None):
    """Exact lookahead decoding of one sequence (greedy, or sampling keyed by the seed):
    `lp.generate(model, ids, LookaheadConfig(), 256)`. Given a list of prompts (lists of ids, or a 2-D tensor of
    several rows) it decodes them `batch_size` at a time (default: up to 8) in one forward a step and returns
    a list of results, in order (`seed` then keys every one of them)."""
    if _is_batch(input_ids):
        from .batched_decoding import BatchedDecoder

        if on_tokens is not None:
            raise ValueError("on_tokens streams one sequence; with several prompts read each result's token_ids")
        prompts = [prompt_ids(p if not isinstance(p, torch.Tensor) else p.reshape(1, -1)) for p in input_ids]
        cfg = config or LookaheadConfig()
        decoder = BatchedDecoder(model, cfg, batch_size or min(len(prompts), 8) or 1, team,
                                 compile=cfg.compiled_on(_device_type(model)))
        results = decoder.generate_many(prompts, max_new_tokens, [seed] * len(prompts))
        if tokenizer is not None:
            for r in results:
                r.text = tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return results
    if batch_size is not None:
        raise ValueError("batch_size applies to a list of prompts; give several prompts or drop it")
    return Decoder(model, config, team).generate(input_ids, max_new_tokens, tokenizer, on_tokens, seed)


def _is_batch(input_ids) -> bool:
    """Several prompts: a list of id lists (or of tensors), or a 2-D tensor of more than one row."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return isinstance(input_ids, (list, tuple)) and bool(input_ids) and not isinstance(input_ids[0], int) and \
        isinstance(input_ids[0], (list, tuple, torch.Tensor))


def stream(model, input_ids, config: LookaheadConfig | None = None, max_new_tokens: int | None = None,
           team=None) -> Iterator[list[int]]:
    """Iterate over the tokens each step commits (a list of 1..N ids per step)."""
    steps = Decoder(model, config, team).stream(input_ids, max_new_tokens)
    while True:
        with torch.inference_mode():  # only while a step runs: the caller's code between steps runs as usual
            tokens = next(steps, None)
        if tokens is None:
            return
        yield tokens
