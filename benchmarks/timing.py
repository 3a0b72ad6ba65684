"""Timed single runs: HF generate (greedy or prompt lookup) and lp's Decoder.stream, each step timed."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch

from lp.decoding import Decoder, GenerationResult
from lp.greedy_rules import hf_greedy


@dataclass
class Run:
    """One timed generation of one prompt. step_s[0] includes the prefill; comm_s is per step (zeros alone)."""

    tokens: list[int]
    wall_s: float
    step_s: list[float]
    accepted: list[int]
    fed: list[int] = field(default_factory=list)
    comm_s: list[float] = field(default_factory=list)
    comm_bytes: int = 0
    compile_s: float = 0.0  # compiling inside this run (lp's fast path reports it; 0 once warmed up)

    def record(self, keep_tokens: bool = True) -> dict:
        out = asdict(self)
        if not keep_tokens:
            out["tokens"] = []
        return out


class StepClock:
    """A transformers streamer that stamps each put(): the first is the prompt, each later one ends a step."""

    def __init__(self):
        self.stamps: list[float] = []
        self.counts: list[int] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())
        self.counts.append(int(value.numel()))

    def end(self) -> None:
        pass


@contextmanager
def counting_lookup_candidates(counts: list[int]):
    """While inside, every PromptLookupCandidateGenerator.get_candidates call appends the number of candidate
    tokens it proposed to `counts` (transformers' assisted decoding then feeds those + 1 tokens in one forward)."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator as Generator

    original = Generator.get_candidates

    def get_candidates(self, input_ids, *args, **kwargs):
        out = original(self, input_ids, *args, **kwargs)
        counts.append(int(out[0].shape[-1] - input_ids.shape[-1]))
        return out

    Generator.get_candidates = get_candidates
    try:
        yield
    finally:
        Generator.get_candidates = original


def hf_compile_config(model):
    """What generate() compiles its decoding forward with: one static-shape graph, CUDA graphs on a GPU."""
    from transformers import CompileConfig

    cuda = next(model.parameters()).device.type == "cuda"
    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else "default")
    # generate() auto-compiles only on accelerators (GenerationMixin._valid_auto_compile_criteria); this flag, which
    # transformers documents in CompileConfig as its switch "to compile on e.g. CPU ... for testing purposes", makes
    # it compile on the CPU too. It is a class attribute, not a field: set it on the instance.
    config._compile_all_devices = True
    return config


def time_hf(model, prompt: list[int], max_new_tokens: int, prompt_lookup: int = 0, **generate_kwargs) -> Run:
    """transformers generate(do_sample=False), plain greedy or with prompt_lookup_num_tokens=prompt_lookup; other
    keyword arguments go to generate (cache_implementation, compile_config, ...). Tokens fed per step: 1 for
    greedy, 1 + the candidates proposed for prompt lookup (counted as its candidate generator returns them)."""
    extra = dict(generate_kwargs, prompt_lookup_num_tokens=prompt_lookup) if prompt_lookup else dict(generate_kwargs)
    clock, proposed = StepClock(), []
    with counting_lookup_candidates(proposed) if prompt_lookup else nullcontext():
        start = time.perf_counter()
        tokens = hf_greedy(model, prompt, max_new_tokens, streamer=clock, **extra)
        wall = time.perf_counter() - start
    stamps = [start] + clock.stamps[1:]
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    fed = [1 + c for c in proposed] if prompt_lookup else [1] * len(steps)
    return Run(tokens, wall, steps, clock.counts[1:], fed, [0.0] * len(steps))


def time_lookahead(decoder: Decoder, prompt: list[int], max_new_tokens: int) -> Run:
    """lp decoding through Decoder.stream, stamping each step as it yields; comm per step from the team."""
    result = GenerationResult([], 0, [], 0.0, 0, "max_new_tokens")
    steps = []
    with torch.inference_mode():
        start = last = time.perf_counter()
        for _ in decoder.stream(prompt, max_new_tokens, result):
            now = time.perf_counter()
            steps.append(now - last)
            last = now
    comm = list(decoder.team.comm.seconds) or [0.0] * len(steps)
    return Run(list(result.token_ids), last - start, steps, list(result.accepted_per_step),
               list(result.tokens_fed_per_step), comm, int(result.comm_bytes), float(result.compile_time_s))
