"""Validated settings of lookahead decoding: window W, n-gram size N, guess-set size G and friends."""
from __future__ import annotations

from dataclasses import dataclass, fields


DEFAULT_LOOKUP = 2  # prompt-lookup candidates per step on the fast path
DEFAULT_CHAIN = 2  # continuations chained onto each pool candidate on the fast path


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says which field and what is allowed."""


@dataclass(frozen=True)
class LookaheadConfig:
    """Lookahead decoding settings (the paper's W, N, G).

    window: W, future positions each lookahead level covers (>= 1).
    ngram: N, size of the n-grams harvested and verified (>= 2); N-1 Jacobi levels.
    guess: G, at most G candidate (N-1)-grams verified per step and kept per pool key (0 = lookahead only).
    seed_pool_from_prompt / seed_pool_from_output: also fill the pool with n-grams read off the text.
    lookup, lookup_len: the fast path also verifies the continuations (lookup_len tokens each) of the `lookup`
        best places where the text's last 1-4 tokens occurred before (prompt lookup), ranked before the pool's.
        None = 2 on the fast path; the reference engine (compile off) verifies pool candidates only.
    chain: the fast path continues each pool candidate by the `chain` newest n-grams stored under its last
        token, as deep as the tree goes (lookup_len when prompt lookup is on; no room, no chaining). None = 2 on
        the fast path; the reference engine does not chain.
    budget: tokens the fast path's verification tree feeds per step (None = guess * (ngram - 1) on GPUs, half
        that on CPUs; 0 with no candidate source: `tree_budget`); candidates sharing a prefix share tokens, and the
        best ranked fill the budget.
    plain_steps: a fast-path step whose tree would hold no candidate feeds only the last token, as greedy decoding
        does, and the window waits (one rank, one sequence a forward: teams and batches run every step whole).
        None = on CPUs and where G = 0: `plain_steps_on`.
    sample, temperature, top_k, top_p, min_p: sampling (lp.sampling), exact and keyed by `seed`; None = the
        model's generation_config (do_sample as generate() reads it). sample=False or temperature 0 = greedy.
    seed: seeds the initial guesses of the window so runs are reproducible (and identical on every rank).
    compile: the fast path (static cache, one step shape, device-resident state, torch.compile; CUDA graphs
        on GPUs). True = the fast path; False = the eager reference engine; None = the fast path on CUDA (where
        its split step was exact on an H200 and an eager step is bound by the host) and the reference engine
        elsewhere: `compiled_on`.
    step_graphs: how the fast path compiles a step: "split" = the model's forward as a graph of its own and the
        bookkeeping around it (prepare, finish, commit) as small graphs, so no fusion crosses the forward's
        boundary; "whole" = the entire step as one graph (fewer calls, more fusion). None = split on accelerators
        (where CUDA graphs make the extra calls free), whole on CPUs (where each call costs): `split_step_on`.
    cuda_graphs: on CUDA, replay each step from one captured CUDA graph (one launch, no host work a step). None = on
        for the compiled fast path, off for the eager one.
    memory: "job" (None) = a decoder keeps its n-gram pool from one generation to the next, so what earlier
        records generated becomes candidates for the later ones of a job (steps depend on the order of the
        records, tokens never do); "record" = every generation starts from its own prompt's n-grams alone.
    memory_tokens: with a job's memory, how many tokens of the job's earlier texts (prompts and outputs) the fast
        path's prompt lookup also searches (lp.job_corpus; 0 = the record's own text only). None = 262144 on
        accelerators, 8192 on CPUs (a step reads a few entries of its index, whatever its size).
    """

    window: int = 15
    ngram: int = 5
    guess: int = 15
    seed_pool_from_prompt: bool = True
    seed_pool_from_output: bool = True
    seed: int = 0
    compile: bool | None = None
    lookup: int | None = None
    lookup_len: int = 10
    chain: int | None = None
    budget: int | None = None
    plain_steps: bool | None = None
    sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    step_graphs: str | None = None
    cuda_graphs: bool | None = None
    memory: str | None = None
    memory_tokens: int | None = None

    def __post_init__(self):
        check_int("window", self.window, 1, 1024)
        check_int("ngram", self.ngram, 2, 64)
        check_int("guess", self.guess, 0, 1024)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_bool("seed_pool_from_prompt", self.seed_pool_from_prompt)
        check_bool("seed_pool_from_output", self.seed_pool_from_output)
        if self.lookup is not None:
            check_int("lookup", self.lookup, 0, 64)
        check_int("lookup_len", self.lookup_len, 1, 64)
        if self.chain is not None:
            check_int("chain", self.chain, 0, 16)
        if self.budget is not None:
            check_int("budget", self.budget, 0, 4096)
        if self.plain_steps is not None:
            check_bool("plain_steps", self.plain_steps)
        if self.sample is not None:
            check_bool("sample", self.sample)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 0)
        check_number("temperature", self.temperature, 0, float("inf"), high_open=True)
        check_number("top_p", self.top_p, 0, 1, low_open=True)
        check_number("min_p", self.min_p, 0, 1, high_open=True)
        if self.compile is not None:
            check_bool("compile", self.compile)
        if self.step_graphs not in (None, "split", "whole"):
            raise ConfigError(f"step_graphs must be 'split' or 'whole', got {self.step_graphs!r}")
        if self.cuda_graphs is not None:
            check_bool("cuda_graphs", self.cuda_graphs)
        if self.memory not in (None, "job", "record"):
            raise ConfigError(f"memory must be 'job' or 'record', got {self.memory!r}")
        if self.memory_tokens is not None:
            check_int("memory_tokens", self.memory_tokens, 0, 1 << 26)

    @property
    def levels(self) -> int:
        """Number of Jacobi levels in the lookahead window (N - 1)."""
        return self.ngram - 1

    @property
    def lookup_count(self) -> int:
        """Prompt-lookup candidates per step on the fast path."""
        return DEFAULT_LOOKUP if self.lookup is None else self.lookup

    @property
    def chain_count(self) -> int:
        """Continuations chained onto each pool candidate on the fast path: none when the tree is no deeper than
        a pool n-gram (no room to continue it)."""
        chain = DEFAULT_CHAIN if self.chain is None else self.chain
        return chain if self.tree_depth > self.ngram - 1 else 0

    @property
    def chain_room(self) -> int:
        """Tokens a chained continuation adds on the fast path: up to N-1, as deep as the tree goes (0: none)."""
        return min(self.ngram - 1, self.tree_depth - (self.ngram - 1)) if self.chain_count else 0

    def tree_budget(self, device_type: str) -> int:
        """Tokens the verification tree feeds per step on a device of this type ("cpu", "cuda", ...): `budget`
        when set. By default G*(N-1) on accelerators, where a step of a few hundred tokens costs about what a
        small one does, and half that (rounded up) on CPUs, where every fed token costs: there half the tree
        keeps nearly all the accepted tokens for 25 % fewer fed (benchmarks/README.md (e3)). 0 without a candidate
        source (G = 0 and no prompt lookup), whatever `budget` says: there is nothing to feed."""
        if not (self.guess or self.lookup_count):
            return 0
        if self.budget is not None:
            return self.budget
        full = self.guess * (self.ngram - 1)
        return (full + 1) // 2 if device_type == "cpu" else full

    @property
    def job_memory(self) -> bool:
        """Whether the n-gram pool lives on from one generation of a decoder to the next (`memory`)."""
        return self.memory != "record"

    def corpus_tokens_on(self, device_type: str) -> int:
        """Tokens of a job's corpus prompt lookup searches on this device (`memory_tokens`; 0: none)."""
        if not self.job_memory or not self.lookup_count:
            return 0
        if self.memory_tokens is not None:
            return self.memory_tokens if self.memory_tokens >= 2 else 0  # room for a separator and a token
        return 8192 if device_type == "cpu" else 262144

    def split_step_on(self, device_type: str) -> bool:
        """Whether the compiled fast path compiles its step as several graphs (the forward alone) or as one, on a
        device of this type: `step_graphs` when set, else split everywhere but on CPUs."""
        if self.step_graphs is not None:
            return self.step_graphs == "split"
        return device_type != "cpu"

    def cuda_graphs_on(self, compiled: bool) -> bool:
        """Whether a fast-path step on CUDA replays a captured CUDA graph: `cuda_graphs` when set, else when the
        step is compiled."""
        return compiled if self.cuda_graphs is None else self.cuda_graphs

    @property
    def fast_path_only(self) -> bool:
        """Whether a setting is given that only the fast path applies (a lookup, a chain, a budget, plain steps):
        the eager reference engine refuses such a config. A lookup or chain of 0 and plain_steps=False are its
        own policy, so they are not."""
        return bool(self.lookup or self.chain or self.budget is not None or self.plain_steps)

    def plain_steps_on(self, device_type: str) -> bool:
        """Whether a fast-path step whose tree would hold no candidate feeds only the last token on a device of this
        type: `plain_steps` when set. By default on CPUs, where a token fed costs about the same as any other and a
        one-token step is several times cheaper (benchmarks/README.md (e4)), and wherever G = 0 (the window then
        feeds no pool, so a full step with no candidate is wasted); off on accelerators otherwise, where a full step
        costs about what a one-token one does and keeps the window moving."""
        if self.plain_steps is not None:
            return self.plain_steps
        return device_type == "cpu" or self.guess == 0

    @property
    def tree_depth(self) -> int:
        """The longest candidate: how many tokens past the bonus one a step can accept."""
        return max(self.ngram - 1, self.lookup_len if self.lookup_count else 0)

    def compiled_on(self, device_type: str) -> bool:
        """Whether decoding takes the compiled fast path on a device of this type: `compile` when set, else on CUDA
        only (an H200 found its split step exact, benchmarks/results_published/gpu_h200/; on a CPU compiling pays
        only on long jobs, which self-tuning weighs)."""
        return self.compile if self.compile is not None else device_type == "cuda"

    @classmethod
    def from_dict(cls, values: dict) -> "LookaheadConfig":
        """Build from a plain mapping (a YAML section), refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown lookahead setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**values)


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Refuse anything but an integer (a bool is not one) in [low, high]; high None means no upper bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {allowed}, got {value!r}")


def check_number(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """Refuse anything but None or a real number in the range (open ends excluded)."""
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a number in {allowed}, got {value!r}")


def check_bool(name: str, value) -> None:
    """Refuse anything but True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
