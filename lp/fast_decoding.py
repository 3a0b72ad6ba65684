"""The fast path: lookahead decoding with a static KV cache, one step shape and a compiled step.

Same contract as lp.decoding.Decoder (same GenerationResult, same generation rules, the same tokens as
greedy decoding), but each step is a fixed-shape, device-resident graph: `torch.compile`d (CUDA graphs on
GPUs), replayed with no Python work per token; the host reads one small tensor per step (the accepted
tokens, and whether the next step has candidates: if not, and plain steps are on, it runs the one-token plain
step instead). Caches are sized in power-of-two capacity buckets, so a batch of prompts compiles once a bucket.
"""
from __future__ import annotations

import logging
import random
import time
import types
from typing import Callable, Iterator

import torch

from . import memory_file
from .config import LookaheadConfig
from .cuda_graph import CapturedStep
from .decoding import Decoder, PromptError, cut_at_eos
from .device_pool import DevicePool
from .device_rules import DeviceRules
from .distributed.parallel import DivergenceError
from .distributed.partition import split_step
from .fast_step import FastShape, FastStep
from .graph_check import StaleReadCheck
from .job_corpus import JobCorpus
from .ngram_pool import NGramPool
from .progress import ticking
from .step_layout import tokens_fed

log = logging.getLogger("lp")
# Three H200 runs (torch 2.11) found the step compiled as ONE graph not exact at (15,5,15) with prompt lookup, while
# the split step (the forward a graph of its own) was exact at every setting tried: benchmarks/results_published/
# gpu_h200/. CUDA therefore compiles split by default; whole is for comparing.
CUDA_WHOLE_STEP_WARNING = ("lp: on CUDA the step compiled as one graph (step_graphs='whole') gave tokens different "
                           "from greedy decoding at (15,5,15) with prompt lookup on an H200; leave step_graphs unset "
                           "(split) unless you are checking it")

# plain_steps asked for where every step must run whole (the ranks exchange every step; a batch shares a forward)
PLAIN_STEPS_IGNORED = "lp: plain_steps applies to one rank decoding one sequence a forward; %s runs every step whole"

MIN_CAPACITY = 256


def capacity_bucket(tokens: int) -> int:
    """The smallest power of two (at least MIN_CAPACITY) that holds `tokens` cache entries."""
    size = MIN_CAPACITY
    while size < tokens:
        size *= 2
    return size


class FastDecoder(Decoder):
    """Runs the fixed-shape step of `model` under `config`, alone or as one rank of a team.

    compile=False runs the same step eagerly (for debugging: same tokens, no compile time, slower steps)."""

    def __init__(self, model, config: LookaheadConfig | None = None, team=None, compile: bool = True):
        super().__init__(model, config, team)
        self.compile = compile
        self.compile_error: str | None = None
        self.compile_backend = "inductor"  # torch.compile's backend (benchmarks/cuda_exactness.py tries "aot_eager")
        self.notify: Callable[[str], None] | None = None  # told before a cache size's step compiles (the command line)
        self.host_reads = 0  # device-to-host copies made by the step loop (one per step)
        self.compile_time_s = 0.0  # spent compiling steps, all buckets together
        self._step_s: dict[str, float] = {}  # running averages of full and plain steps' seconds (plain steps on)
        self._timed_steps = 0
        self.cost_ratio: float | None = None  # what a full step costs in plain ones, as last told to the pool
        cfg, team = self.config, self.team
        kv_sync = "none" if team.size == 1 else team.kv_sync
        depth = cfg.tree_depth
        pending = depth + 1 if kv_sync == "recompute" else 1
        slices = tuple(split_step(cfg.window, cfg.levels, cfg.tree_budget(self.device.type), 1, [pending] * team.size))
        self.shape = FastShape(cfg.window, cfg.ngram, cfg.guess, cfg.lookup_count, cfg.lookup_len, depth, pending, slices,
                               team.rank, kv_sync, cfg.chain_count, cfg.chain_room,
                               plain=self._alone() and cfg.plain_steps_on(self.device.type))
        if cfg.plain_steps and not self._alone():
            log.warning(PLAIN_STEPS_IGNORED, "a batch (its lanes share one forward)" if self.lanes_share_a_forward
                        else f"a team of {team.size} ranks")
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self._pool: DevicePool | None = None  # made with the first step (a batch's lanes have pools of their own)
        self._corpus: JobCorpus | None = None  # the job's earlier texts for prompt lookup (made with the pool)
        self._rules: DeviceRules | None = None
        self._steps: dict[int, FastStep] = {}
        self._steps_sampling = None
        self._compiled: dict[tuple[int, str], Callable] = {}
        self._graphs: dict[tuple[int, str], CapturedStep] = {}  # captured CUDA graphs of whole steps
        self.split = not compile or cfg.split_step_on(self.device.type)  # eager: the same pieces, called in turn
        if not self.split and self.device.type == "cuda":
            log.warning(CUDA_WHOLE_STEP_WARNING)
        self._graph_pool = None
        self._generations = 0
        self._host = torch.zeros(self.shape.out_size, dtype=torch.long, pin_memory=self.device.type == "cuda")

    lanes_share_a_forward = False  # lp.batched_decoding.BatchedDecoder: every lane's step runs in one forward

    def _alone(self) -> bool:
        """One rank decoding one sequence a forward: the only case where a step may run as a plain step."""
        return self.team.size == 1 and not self.lanes_share_a_forward

    @property
    def step_tokens(self) -> int:
        """Tokens this rank feeds every step (fixed by W, N, G and the team)."""
        return tokens_fed(self.shape.step_shape)

    # -- the loop -----------------------------------------------------------------------------------------

    def check_prompt(self, input_ids) -> list[int]:
        prompt = super().check_prompt(input_ids)
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise PromptError(f"prompt token ids must be in [0, {self.vocab}) for this model, got {bad}")
        return prompt

    def initial_state(self, prompt: list[int], seed: int) -> tuple[NGramPool, list[list[int]]]:
        """A generation's starting pool (the prompt's n-grams) and window (prompt tokens drawn by `seed`)."""
        cfg = self.config
        host_pool = NGramPool(cfg.guess, cfg.ngram - 1)
        if cfg.seed_pool_from_prompt:
            host_pool.add_sequence(prompt)
        rng = random.Random(seed)
        return host_pool, [[prompt[rng.randrange(len(prompt))] for _ in range(cfg.window)] for _ in range(cfg.levels)]

    def fetch(self, out: torch.Tensor) -> list:
        """The step's one device-to-host copy, as Python values."""
        self.host_reads += 1
        self._host.copy_(out, non_blocking=True)
        if out.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return self._host.tolist()

    def _decode(self, prompt, rules, limit, stats) -> Iterator[list[int]]:
        start, compiled_before = time.perf_counter(), self.compile_time_s  # this generation's compiling starts here
        if limit == 0:
            return
        host_pool, window = self.initial_state(prompt, self.seed)
        with torch.inference_mode():  # entered per step, never across a yield: the caller's code runs as usual
            step = self._step(len(prompt) + limit, rules)
            step.start(prompt, host_pool, window, self.seed, generation=self._next_generation())
        run = self._runner(step)
        plain = self._plain_runner(step) if self.shape.plain else None
        if plain is not None and self._uncompiled(step, "plain-forward" if self.split else "plain"):
            self._compile_plain(step, plain, prompt, host_pool, window)

        eos = set(rules.eos_ids)
        ready = True  # the first step runs whole; then each step's output says whether the next tree has candidates
        while len(stats.token_ids) < limit:
            full = ready or plain is None
            began, compiled_so_far = time.perf_counter(), self.compile_time_s
            with torch.inference_mode():
                count, accepted, diverged, ready = self._read(run() if full else plain())
            if plain is not None and stats.steps and self.compile_time_s == compiled_so_far:
                self._time_step(full, time.perf_counter() - began)
            if diverged:
                raise DivergenceError("ranks disagree on the committed tokens/window/pool; the replicas are not "
                                      "identical (same model, dtype and config on every rank?)")
            emit, ended = cut_at_eos(accepted[:count][: limit - len(stats.token_ids)], eos)
            if ended:
                stats.stop_reason = "eos"
            stats.compile_time_s = self.compile_time_s - compiled_before
            stats.add_step(emit, step.tokens if full else 1, time.perf_counter() - start - stats.compile_time_s)
            yield emit
            if ended:
                break
        stats.compiled = self.compile and self.compile_error is None
        self._remember_text(prompt, stats.token_ids)

    def _time_step(self, full: bool, seconds: float) -> None:
        """Keep a running average of full and plain steps' seconds; every few steps tell the pool what a full step
        costs in plain ones (the bar a job's memory must clear for a full step: DevicePool.worth_a_step)."""
        kind = "full" if full else "plain"
        before = self._step_s.get(kind)
        self._step_s[kind] = seconds if before is None else 0.9 * before + 0.1 * seconds
        self._timed_steps += 1
        if self._timed_steps % 8 == 0 and len(self._step_s) == 2:
            self.cost_ratio = self._step_s["full"] / self._step_s["plain"]
            with torch.inference_mode():  # the pool's tensors are inference tensors
                self.job_pool().set_cost_ratio(self.cost_ratio)

    def _read(self, out: torch.Tensor) -> tuple[int, list[int], bool, bool]:
        """The step's one device-to-host copy: count, accepted tokens, diverged, ready (the next tree has a
        candidate, so the next step runs whole)."""
        values = self.fetch(out)
        a = self.shape.accept
        return values[0], values[1 : 1 + a], bool(values[1 + a]), bool(values[2 + a])

    # -- building and compiling the step --------------------------------------------------------------------

    def _step(self, tokens: int, rules) -> FastStep:
        if self._rules is None or not self._rules.matches(rules) or self._sampling != self._steps_sampling:
            self._rules = DeviceRules(rules, self.vocab, self.dtype, self.device)
            self._steps_sampling = self._sampling  # the steps are built (and compiled) for one sampling setting
            self._steps.clear()
            self._compiled.clear()
            self._graphs.clear()
        self._rules.load(rules)
        self.job_pool()
        capacity = capacity_bucket(tokens + self.shape.widest_step)  # the same bucket on every rank
        found = self._steps.get(capacity)
        if found is None:
            self._announce(capacity)
            found = self._steps[capacity] = FastStep(
                self.model, self.shape, capacity, self._rules, self._pool, self.context, self._cache_arg,
                self.layers, self.config.seed_pool_from_output, self._sampling, job_memory=self.config.job_memory,
                corpus=self.job_corpus())
        return found

    def _next_generation(self) -> int:
        """A number for each generation of this decoder (every rank of a team counts alike)."""
        self._generations += 1
        return self._generations

    def job_corpus(self) -> JobCorpus | None:
        """The job's earlier texts that prompt lookup searches (LookaheadConfig.memory_tokens), made once; None
        when there are none to keep."""
        size = self.config.corpus_tokens_on(self.device.type)
        if self._corpus is None and size:
            self._corpus = JobCorpus(size, self.device, continuation=self.shape.lookup_len)
        return self._corpus

    def _remember_text(self, prompt, token_ids) -> None:
        """A finished generation's text joins the job's corpus (every rank of a team adds the same text)."""
        if self.job_corpus() is not None:
            with torch.inference_mode():
                self._corpus.add(list(prompt) + list(token_ids))

    def job_pool(self) -> DevicePool:
        """The pool every step of this decoder shares: the job's memory (LookaheadConfig.memory), made once."""
        if self._pool is None:
            self._pool = DevicePool(self.vocab, self.config.guess, self.config.ngram - 1, self.device)
        return self._pool

    def remember(self, token_ids) -> None:
        """Add the n-grams of a text (token ids) to the job's memory (see lp.decoding.Decoder.remember)."""
        with torch.inference_mode():
            self.job_pool().remember(token_ids)
        self._remember_text([], token_ids)

    def settings(self) -> dict:
        """What this decoder runs, resolved for its device and team: the tree (its whole budget), plain steps,
        whether the step is compiled (false once it fell back to eager), the job's corpus."""
        shape = self.shape
        return {**super().settings(), "engine": "fast", "lookup": shape.lookup, "lookup_len": shape.lookup_len,
                "chain": shape.chain, "budget": self.config.tree_budget(self.device.type),
                "plain_steps": shape.plain and not self.lanes_share_a_forward,
                "compiled": bool(self.compile and self.compile_error is None),
                "memory_tokens": self.config.corpus_tokens_on(self.device.type)}

    def memory_grams(self) -> torch.Tensor:
        """The job's memory as n-grams [M, N] on the host, each key's oldest first (see lp.decoding.Decoder)."""
        with torch.inference_mode():
            return self.job_pool().grams().cpu().clone()

    def remember_grams(self, grams) -> None:
        """Add n-grams [M, N'], each key's oldest first (a saved memory), to the job's memory (lp.memory_file.fit)."""
        with torch.inference_mode():
            self.job_pool().insert_all(memory_file.fit(grams, self.config.ngram))

    def memory_corpus(self) -> torch.Tensor:
        """The job's corpus on the host: its texts, each after a -1 (empty without one)."""
        corpus = self.job_corpus()
        return torch.zeros(0, dtype=torch.long) if corpus is None else corpus.tokens.cpu().clone()

    def remember_corpus(self, corpus) -> None:
        """Add the texts of a saved corpus (each after a -1), oldest first, to the job's corpus."""
        if self.job_corpus() is not None:
            with torch.inference_mode():
                self._corpus.add_texts(corpus)

    def _announce(self, capacity: int) -> None:
        """Say that a step is about to compile (it takes a while, and nothing else is printed meanwhile)."""
        if self.compile and self.compile_error is None and self.notify is not None:
            self.notify(f"compiling the fast path's step for a {capacity}-slot cache (once per cache size: later "
                        f"prompts of this size reuse it; a minute or two on a CPU)")

    def _runner(self, step) -> Callable[[], torch.Tensor]:
        """One call runs one full step of `step` (a FastStep, or a batch's BatchedStep) and returns its host-bound
        tensor: its compiled graphs (split or whole), with the team's collectives between its halves, each half
        replayed from one CUDA graph where that is on."""
        team, prefix = self.team, "batch-" if self.lanes_share_a_forward else ""
        local, commit = self.halves(step)
        if team.size == 1:
            if self.split:
                def solo() -> torch.Tensor:
                    row, keep = local()
                    return commit(row[None], keep)
            else:
                solo = self._compiled_fn(step, prefix + "solo", step.solo)
            return self._captured(step, prefix + "solo", solo)
        local = self._captured(step, prefix + "local-step", local)
        commit = self._captured(step, prefix + "commit-step", commit)

        def run() -> torch.Tensor:
            row, keep = local()
            table = team.gather_rows(row.flatten()).view(team.size, *row.shape)
            out = commit(table, keep)
            if step.kv_buffer is not None:
                team.sum_kv(step.kv_buffer)
            return out
        return run

    def halves(self, step) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], Callable]:
        """The step's two halves as this decoder runs them (compiled split or whole, or eager): `local()` gives
        this rank's exchange row(s) and slots to keep, `commit(table, keep)` applies the team's table."""
        prefix = "batch-" if self.lanes_share_a_forward else ""
        if self.split:
            prepare = self._compiled_fn(step, prefix + "prepare", step.prepare)
            forward = self._compiled_fn(step, prefix + "forward", step.forward)
            finish = self._compiled_fn(step, prefix + "finish", step.finish)

            def local() -> tuple[torch.Tensor, torch.Tensor]:
                fed = prepare()
                return finish(forward(fed.tokens, fed.positions, fed.mask), fed)
        else:
            local = self._compiled_fn(step, prefix + "local", step.local)
        return local, self._compiled_fn(step, prefix + "commit", step.commit)

    def _plain_runner(self, step: FastStep) -> Callable[[], torch.Tensor]:
        """One call runs one plain (one-token) step: the cache writes at its one slot for the call's length."""
        if self.split:
            prepare = self._compiled_fn(step, "plain-prepare", step.plain_prepare)
            forward = self._compiled_fn(step, "plain-forward", step.forward)
            finish = self._compiled_fn(step, "plain-finish", step.plain_finish)

            def plain() -> torch.Tensor:
                token, position, mask = prepare()
                return finish(forward(token, position, mask, step.plain_keep), position)
        else:
            plain = self._compiled_fn(step, "plain", step.plain)

        def swapped() -> torch.Tensor:
            step.cache.slots = step.plain_slots
            try:
                return plain()
            finally:
                step.cache.slots = step.step_slots
        return self._captured(step, "plain", swapped)

    def _captured(self, step, name: str, fn: Callable) -> Callable:
        """`fn` replayed from a CUDA graph (lp.cuda_graph) when the step runs on CUDA with CUDA graphs on."""
        if self.device.type != "cuda" or not self.config.cuda_graphs_on(self.compile and self.compile_error is None):
            return fn
        key = (step.capacity, name)
        if key not in self._graphs:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = CapturedStep(fn, self._graph_pool)
        return self._graphs[key]

    def _uncompiled(self, step: FastStep, name: str) -> bool:
        """Whether the graph `name` of this step's bucket is still to be compiled."""
        found = self._compiled.get((step.capacity, name))
        return self.compile and self.compile_error is None and (found is None or found.compile_time_s is None)

    def _compile_plain(self, step: FastStep, plain: Callable, prompt, host_pool, window) -> None:
        """Compile the plain step before the first step, so that no later step of any generation compiles: run it
        once on the fresh state, then start again. All of it counts as compile time (the full step compiles in the
        generation's first step, which is always a full one)."""
        began, before = time.perf_counter(), self.compile_time_s
        with torch.inference_mode():
            plain()
            step.start(prompt, host_pool, window, self.seed, generation=self._generations)
        self.compile_time_s = before + time.perf_counter() - began

    def _compiled_fn(self, step, name: str, fn: Callable) -> Callable:
        if not self.compile or self.compile_error is not None:
            return fn
        key = (step.capacity, name)
        found = self._compiled.get(key)
        if found is None:
            began = time.perf_counter()  # the first torch.compile of a process imports the compiler: compile time too
            # CUDA graphs, where on, are captured around the whole step (lp.cuda_graph), not per graph
            options = {"post_grad_custom_post_pass": StaleReadCheck(), "triton.cudagraphs": False}
            if self.compile_backend != "inductor":  # a diagnosis: another backend takes no inductor options
                compiled = torch.compile(_own_code(fn), fullgraph=True, dynamic=False, backend=self.compile_backend)
            else:
                compiled = torch.compile(_own_code(fn), fullgraph=True, dynamic=False, options=options)
            found = self._compiled[key] = _FallBack(compiled, fn, self)
            self.compile_time_s += time.perf_counter() - began
        return found


def _own_code(method: Callable) -> Callable:
    """`method` on a copy of its code object. Dynamo keeps compiled graphs per code object and stops compiling
    past its recompile limit (8), so every (decoder, bucket) step gets a code object, and a cache, of its own."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


class _FallBack:
    """Calls the compiled step; if compiling fails, logs one line naming why and runs the same step eagerly."""

    def __init__(self, compiled: Callable, eager: Callable, owner: FastDecoder):
        self.compiled, self.eager, self.owner = compiled, eager, owner
        self.compile_time_s: float | None = None

    def __call__(self, *args):
        if self.owner.compile_error is not None:
            return self.eager(*args)
        if self.compile_time_s is not None:
            return self.compiled(*args)
        began = time.perf_counter()
        try:
            with ticking(self.owner.notify, "still compiling the fast path's step"):
                out = self.compiled(*args)
        except Exception as error:  # dynamo/inductor cannot take this model: stay exact, run eagerly
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            self.owner.compile_error = f"{type(error).__name__}: {first}"
            log.warning("lp: torch.compile failed for %s (%s); running the fast path eagerly",
                        type(self.owner.model).__name__, self.owner.compile_error)
            return self.eager(*args)
        self.compile_time_s = time.perf_counter() - began
        self.owner.compile_time_s += self.compile_time_s
        return out
