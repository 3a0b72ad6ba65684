"""Batched lookahead decoding: one forward a step decodes B sequences, and a finished sequence's row takes the
next prompt (continuous batching).

Every row of the batch is a lane: a FastStep of its own (window, n-gram pool, verification tree, cache length,
positions, mask rows, accepted count, sampling seed) over row `lane` of one shared SlotCache [B, h, capacity, d].
A step prepares every lane's fed tokens, runs ONE forward over [B, T] tokens with a [B, 1, T, capacity] mask,
then verifies and commits each lane: one fixed-shape graph for the whole batch (compiled, CUDA graphs on GPUs),
one device-to-host read of [B, count + accepted + diverged] per step. Each sequence's tokens equal its own greedy
(or seeded sampled) output. In a team (lp > 1) every lane splits its window and tree over the ranks as alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import LookaheadConfig
from .decoding import GenerationResult, cut_at_eos
from .device_pool import DevicePool
from .device_rules import DeviceRules
from .distributed.parallel import DivergenceError
from .fast_decoding import FastDecoder, capacity_bucket
from .fast_step import FastStep, kv_exchange_buffer
from .greedy_rules import greedy_rules
from .slot_cache import SlotCache


class BatchedStep:
    """The lanes' step as one graph: every lane's `prepare`, one batched forward, every lane's `finish`/`commit`."""

    def __init__(self, model, lanes: list[FastStep], cache: SlotCache, cache_arg: str):
        self.model, self.lanes, self.cache, self.cache_arg = model, lanes, cache, cache_arg
        self.capacity = cache.capacity
        self.slots = torch.zeros(len(lanes), lanes[0].tokens, dtype=torch.long, device=lanes[0].device)
        torch._dynamo.mark_static_address(self.slots)
        cache.slots = self.slots  # [B, T]: row b writes its step at its own slots
        self.kv_buffer: torch.Tensor | None = None
        if lanes[0].shape.kv_sync == "gather":  # every lane's entries in one buffer: one all-reduce a batch step
            self.kv_buffer = kv_exchange_buffer(cache, lanes[0].shape.accept, len(lanes))
            for b, lane in enumerate(lanes):
                lane.kv_buffer = self.kv_buffer[b]  # FastStep.start keeps a buffer it was given
                torch._dynamo.mark_static_address(lane.kv_buffer)

    def local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward every lane at once: exchange rows [B, row] and slots to keep [B, K]."""
        fed = self.prepare()
        return self.finish(self.forward(fed.tokens, fed.positions, fed.mask), fed)

    def prepare(self) -> "BatchFed":
        """Every lane's fed tokens, positions and mask rows, stacked; each lane writes its step at its own slots."""
        fed = [lane.prepare() for lane in self.lanes]
        self.slots.copy_(torch.stack([lane.step_slots for lane in self.lanes]))
        return BatchFed(torch.stack([f.tokens for f in fed]), torch.stack([f.positions for f in fed]),
                        torch.cat([f.mask for f in fed]), fed)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model alone over every lane's fed tokens [B, T]: the kept rows' logits [B, rows, V]."""
        out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                         logits_to_keep=self.lanes[0].keep_rows, **{self.cache_arg: self.cache})
        return out.logits

    def finish(self, logits: torch.Tensor, fed: "BatchFed") -> tuple[torch.Tensor, torch.Tensor]:
        """Verify every lane: exchange rows [B, row] and slots to keep [B, K]."""
        rows, keeps = zip(*(lane.finish(logits[b], f) for b, (lane, f) in enumerate(zip(self.lanes, fed.lanes))))
        return torch.stack(rows), torch.stack(keeps)

    def commit(self, table: torch.Tensor, keeps: torch.Tensor) -> torch.Tensor:
        """Commit each lane from the team's table [ranks, B, row]; returns the host-bound [B, accept + 3]."""
        return torch.stack([lane.commit(table[:, b], keeps[b]) for b, lane in enumerate(self.lanes)])

    def solo(self) -> torch.Tensor:
        rows, keeps = self.local()
        return self.commit(rows[None], keeps)


@dataclass
class BatchFed:
    """A batch step's forward inputs, and each lane's own (lp.fast_step.Fed) for verifying its rows."""

    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, 1, T, capacity]
    lanes: list


class BatchedDecoder(FastDecoder):
    """Decodes many prompts `batch_size` at a time with the fast path's step (see the module docstring).

    `generate_many(prompts, max_new_tokens)` returns one GenerationResult per prompt, in order; `on_result`
    receives (index, result) as each one finishes, which for a batch job is the moment to write it."""

    lanes_share_a_forward = True  # so every step runs whole (no plain steps)

    def __new__(cls, *args, **kwargs):  # always this class (Decoder.__new__ picks an engine by config)
        return object.__new__(cls)

    def __init__(self, model, config: LookaheadConfig | None = None, batch_size: int = 4, team=None,
                 compile: bool = True):
        super().__init__(model, config, team, compile)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= 256:
            raise ValueError(f"batch_size must be an integer in [1, 256], got {batch_size!r}")
        self.batch_size = batch_size
        self._batched: dict[int, BatchedStep] = {}
        self._host = torch.zeros(batch_size, self.shape.out_size, dtype=torch.long,
                                 pin_memory=self.device.type == "cuda")

    # -- building -------------------------------------------------------------------------------------------

    def _batch_step(self, capacity: int, template) -> BatchedStep:
        if self._sampling != self._steps_sampling:
            self._batched.clear()
            self._compiled.clear()
            self._graphs.clear()
            self._steps_sampling = self._sampling
        found = self._batched.get(capacity)
        if found is None:
            self._announce(capacity)
            cfg, b = self.config, self.batch_size
            cache = SlotCache(self.layers, capacity, self.device)
            self._allocate(cache, capacity)
            # a job's memory is one pool the lanes share, updated in lane order each step; else a pool a lane
            lanes = [FastStep(self.model, self.shape, capacity, DeviceRules(template, self.vocab, self.dtype, self.device),
                              self.job_pool() if cfg.job_memory else
                              DevicePool(self.vocab, cfg.guess, cfg.ngram - 1, self.device), self.context,
                              self._cache_arg, self.layers, cfg.seed_pool_from_output, self._sampling, cache, lane,
                              job_memory=cfg.job_memory, corpus=self.job_corpus())
                     for lane in range(b)]
            found = self._batched[capacity] = BatchedStep(self.model, lanes, cache, self._cache_arg)
        return found

    def _allocate(self, cache: SlotCache, capacity: int) -> None:
        """One eager one-token forward over every row, so the batch's buffers exist before any row's prefill."""
        b = self.batch_size
        cache.slots = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        mask = torch.zeros(b, 1, 1, capacity, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=torch.zeros(b, 1, dtype=torch.long, device=self.device),
                       position_ids=torch.zeros(b, 1, dtype=torch.long, device=self.device), attention_mask=mask,
                       use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})

    # -- decoding -------------------------------------------------------------------------------------------

    def generate_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int | None] | None = None,
                      seeds: Sequence[int | None] | None = None,
                      on_result: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Decode every prompt (token id lists) to its end, `batch_size` at a time; results in prompt order."""
        prompts = [self.check_prompt(p) for p in prompts]
        n = len(prompts)
        budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        seeds = list(seeds) if seeds is not None else [None] * n
        if len(budgets) != n or len(seeds) != n:
            raise ValueError(f"{n} prompts need {n} max_new_tokens and seeds, got {len(budgets)} and {len(seeds)}")
        results: list[GenerationResult | None] = [None] * n
        jobs = iter(range(n))

        def source() -> Work | None:
            i = next(jobs, None)
            return None if i is None else Work(i, prompts[i], budgets[i], seeds[i])

        def done(key, result: GenerationResult) -> None:
            results[key] = result
            if on_result is not None:
                on_result(key, result)

        if n:
            self.decode(source, done, max(len(p) + self.limit(p, b) for p, b in zip(prompts, budgets)))
        return results

    def limit(self, prompt: list[int], max_new_tokens: int | None) -> int:
        """New tokens a prompt may get: its budget (default: the generation_config's), within the context."""
        return self.plan(prompt, max_new_tokens)[1]

    def decode(self, source: Callable[[], "Work | None"], on_result: Callable[[object, GenerationResult], None],
               longest: int) -> None:
        """Continuous batching: fill every lane from `source` (None: nothing left), decode, hand each finished
        sequence to `on_result(work.key, result)` and refill its lane. `longest` (prompt + new tokens) sizes the
        cache. In a team every rank calls this with sources that agree."""
        from .sampling import sampling_settings

        cfg, team = self.config, self.team
        self._sampling = sampling_settings(self.model.generation_config, cfg)
        idle = _Job(Work(None, [0], 0, 0), 0, 0, greedy_rules(self.model.generation_config, 1, 1), None, 0.0)
        capacity = capacity_bucket(longest + self.shape.widest_step)
        team.begin(cfg.ngram, cfg.window)
        try:
            with torch.inference_mode():
                step = self._batch_step(capacity, idle.rules)
            self._run_batch(step, capacity, lambda: self._job(source()), idle, on_result)
        except Exception as error:
            team.report_failure(f"{type(error).__name__}: {error}")
            raise

    def _job(self, work: "Work | None") -> "_Job | None":
        if work is None:
            return None
        prompt = self.check_prompt(work.prompt)
        rules, limit = self.plan(prompt, work.max_new_tokens)
        result = GenerationResult([], 0, [], 0.0, len(prompt), "max_new_tokens", ranks=self.team.size)
        seed = self.config.seed if work.seed is None else work.seed
        return _Job(Work(work.key, prompt, work.max_new_tokens, seed), limit, rules.max_new_tokens, rules, result, 0.0)

    def _start(self, lane: FastStep, job: "_Job") -> None:
        prompt = job.work.prompt
        host_pool, window = self.initial_state(prompt, job.work.seed)
        with torch.inference_mode():
            lane.rules.load(job.rules)
            lane.start(prompt, host_pool, window, job.work.seed, remember=job.result is not None,  # idle: junk
                       generation=self._next_generation())
        job.started = time.perf_counter()

    def _run_batch(self, step: BatchedStep, capacity: int, next_job: Callable[[], "_Job | None"], idle: "_Job",
                   on_result) -> None:
        a, room = self.shape.accept, capacity - self.shape.widest_step  # the same on every rank
        running: list[_Job | None] = [None] * self.batch_size
        length = [0] * self.batch_size  # committed tokens in each lane's cache, as the host tracks them

        def fill(b: int) -> None:
            job = running[b] = next_job()
            self._start(step.lanes[b], job or idle)
            length[b] = len((job or idle).work.prompt)

        for b in range(self.batch_size):
            fill(b)
        compiled_before = self.compile_time_s
        run = self._runner(step)
        eos = set(idle.rules.eos_ids)
        while any(j is not None for j in running):
            with torch.inference_mode():
                values = self.fetch(run())
            # every lane took part in this step's exchange: each running record is charged all of it, as its latency is
            comm_s, comm_bytes = (self.team.comm.seconds[-1], self.team.comm.bytes[-1]) if self.team.size > 1 else (0, 0)
            if any(v[1 + a] for v in values):
                raise DivergenceError("ranks disagree on the committed tokens/window/pool; the replicas are not "
                                      "identical (same model, dtype and config on every rank?)")
            compile_s = self.compile_time_s - compiled_before
            compiled_before = self.compile_time_s
            charged = False  # one compile is charged to one record, so a job's totals add up
            now = time.perf_counter()
            for b, job in enumerate(running):
                count = values[b][0]
                length[b] += count
                if job is None:
                    if length[b] + 2 * a > room:  # an idle lane decodes junk: keep it inside its cache
                        self._start(step.lanes[b], idle)
                        length[b] = 1
                    continue
                stats = job.result
                emit, ended = cut_at_eos(values[b][1 : 1 + count][: job.limit - stats.new_tokens], eos)
                job.started += compile_s  # compiling is not decoding time
                if compile_s and not charged:
                    stats.compile_time_s, charged = stats.compile_time_s + compile_s, True
                stats.add_step(emit, step.lanes[b].tokens, now - job.started)
                stats.comm_time_s, stats.comm_bytes = stats.comm_time_s + comm_s, stats.comm_bytes + comm_bytes
                if ended:
                    stats.stop_reason = "eos"
                if ended or stats.new_tokens >= job.limit:
                    if not ended and job.limit < job.max_new_tokens:
                        stats.stop_reason = "context"
                    stats.compiled = self.compile and self.compile_error is None
                    self._remember_text(job.work.prompt, stats.token_ids)  # in lane order, alike on every rank
                    on_result(job.work.key, stats)
                    fill(b)


@dataclass
class Work:
    """One prompt to decode: `key` comes back with its result."""

    key: object
    prompt: Sequence[int]
    max_new_tokens: int | None = None
    seed: int | None = None


@dataclass
class _Job:
    work: Work
    limit: int
    max_new_tokens: int
    rules: object
    result: GenerationResult | None
    started: float
