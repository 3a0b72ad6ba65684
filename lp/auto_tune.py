"""Self-tuning: lp picks W, N, G, the tree, plain steps and compile for the device, model and job it runs on.

A menu of settings (arms) per device; for each, expected accepted tokens a step (a prior from benchmarks/README.md
(d) and (e4), scaled by how predictable this job's text proved on the arms that ran) over the step's latency
(lp.step_cost: the measured forward curve, then the arm's observed seconds a step), plus the compile time an
arm not yet compiled would cost, spread over the tokens the job has left. Before each generation the tuner takes
the arm with the least expected time for the rest of the job; at most MAX_ARMS arms are ever built (a bandit that
explores by the prior and keeps by measurement). Outputs never depend on the arm: every arm is exact.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import LookaheadConfig
from .decoding import Decoder, GenerationResult, context_length, prompt_ids, within_context
from .step_cost import CostCurve, CostStore, remember_observed, step_costs

log = logging.getLogger("lp")

MAX_ARMS = 3  # shapes a job may build (each compiled one costs its compile time)
TRIAL_TOKENS = 64  # tokens an arm decodes before it may be left (a switch on one record's noise wastes a compile)
OWN_TOKENS = 2048  # tokens of its own after which an arm's acceptance counts as much as the job's pooled one
PRIOR_HAZARD = 0.8  # before a job shows its own: the chance a candidate right to depth d is right at d + 1 too
PSEUDO_TRIES = 8  # a job's depth statistics are drawn toward the priors by this many tries of them
SHAPE_KEYS = ("window", "ngram", "guess", "lookup", "lookup_len", "chain", "budget", "plain_steps")


@dataclass(frozen=True)
class Arm:
    """One setting the tuner may run. tokens_per_step: prior expected accepted tokens a step; fed_share: prior
    mean tokens fed a step as a share of the full step (plain steps, and the eager engine's partial steps, feed
    less)."""

    name: str
    settings: dict
    tokens_per_step: float
    fed_share: float

    @property
    def compiled(self) -> bool:
        return bool(self.settings.get("compile"))

    def config(self, base: LookaheadConfig) -> LookaheadConfig:
        return dataclasses.replace(base, **self.settings)

    def full_step(self, base: LookaheadConfig, device_type: str, ranks: int = 1) -> float:
        """Tokens a whole step feeds on each rank: the last token, and the rank's share of the window's levels and
        of the tree (the fast path's budget; the reference engine's candidates at most: G of N-1)."""
        cfg = self.config(base)
        tree = cfg.tree_budget(device_type) if self.fast_path(cfg) else cfg.guess * cfg.levels
        return 1 + (cfg.window * cfg.levels + tree) / ranks

    def fast_path(self, cfg: LookaheadConfig) -> bool:
        """Whether the arm runs the fast path's step (compiled, or an eager batch arm), not the reference engine."""
        return self.compiled or cfg.fast_path_only

    def family(self) -> str:
        """Arms whose candidates come from the same sources, and so continue alike with depth: the reference
        engine's pool; the fast path's pool, prompt lookup, or both."""
        cfg = self.config(LookaheadConfig())
        if not self.fast_path(cfg):
            return "reference"
        return f"fast pool={bool(cfg.guess)} lookup={bool(cfg.lookup_count)}"

    def depth(self, base: LookaheadConfig, device_type: str) -> int:
        """The most candidate tokens one step can accept (its bonus token aside)."""
        cfg = self.config(base)
        if not self.fast_path(cfg):
            return cfg.ngram - 1 if cfg.guess else 0
        return min(cfg.tree_depth, cfg.tree_budget(device_type))

    def first_chance(self, base: LookaheadConfig, device_type: str) -> float:
        """The prior chance that a step accepts at least one candidate token: its prior tokens a step, with each
        further depth PRIOR_HAZARD times as likely as the one before."""
        reach = sum(PRIOR_HAZARD ** d for d in range(self.depth(base, device_type)))
        return min(1.0, (self.tokens_per_step - 1) / reach) if reach else 0.0

    def mean_fed(self, base: LookaheadConfig, device_type: str, ranks: int = 1) -> float:
        """Prior mean tokens fed a step on each rank (a team's compiled steps run whole: no plain steps)."""
        share = 1.0 if self.compiled and ranks > 1 else self.fed_share
        return self.full_step(base, device_type, ranks) * share


# Priors: tokens a step and fed share, the means over the default model's code suite and stories260k of
# benchmarks/README.md (d) (the reference engine) and (e4) (the compiled fast path, plain steps on).
REFERENCE = [Arm("reference 2,3,2", dict(window=2, ngram=3, guess=2, compile=False), 1.90, 0.83),
             Arm("reference 3,3,3", dict(window=3, ngram=3, guess=3, compile=False), 2.00, 0.79),
             Arm("reference 5,4,5", dict(window=5, ngram=4, guess=5, compile=False), 2.35, 0.75),
             Arm("reference 7,5,7", dict(window=7, ngram=5, guess=7, compile=False), 2.65, 0.70),
             Arm("reference 15,5,15", dict(window=15, ngram=5, guess=15, compile=False), 2.90, 0.66)]
COMPILED_CPU = [Arm("compiled 1,2,0 lookup 1x10", dict(window=1, ngram=2, guess=0, lookup=1, lookup_len=10, budget=10,
                                                       compile=True), 2.65, 0.65),
                Arm("compiled 7,5,7 budget 14", dict(window=7, ngram=5, guess=7, compile=True), 3.10, 0.65),
                Arm("compiled 15,5,15 budget 30", dict(window=15, ngram=5, guess=15, compile=True), 3.30, 0.66)]
COMPILED_ACCELERATOR = [Arm("compiled 15,5,15", dict(window=15, ngram=5, guess=15, compile=True), 3.80, 1.0),
                        Arm("compiled 7,5,7", dict(window=7, ngram=5, guess=7, compile=True), 3.40, 1.0)]


def menu(device_type: str, compile: bool | None, ranks: int = 1) -> list[Arm]:
    """The arms for a device: compiled ones unless compile=False, eager ones unless compile=True; for a team, those
    with a window column for every rank."""
    compiled = COMPILED_CPU if device_type == "cpu" else COMPILED_ACCELERATOR
    if compile is True:
        arms = list(compiled)
    elif compile is False:
        arms = list(REFERENCE)
    else:
        arms = REFERENCE + compiled
    return [arm for arm in arms if arm.settings["window"] >= ranks]


def batch_menu(device_type: str, compile: bool | None, ranks: int = 1) -> list[Arm]:
    """The arms for a batch, whose lanes share one forward and run the fast path's step whole (no plain steps):
    the device's fast-path shapes with their tree and with half of it (a batch feeds lanes x a lane's step, and
    halving the tree kept 96-101 % of the tokens a step, benchmarks/README.md (e3): prior 2 % fewer), each eager
    and compiled unless compile is given."""
    shapes = []
    for arm in COMPILED_CPU if device_type == "cpu" else COMPILED_ACCELERATOR:
        cfg = arm.config(LookaheadConfig())
        budget = cfg.tree_budget(device_type)
        settings = {k: v for k, v in arm.settings.items() if k != "compile"}
        shape = f"{cfg.window},{cfg.ngram},{cfg.guess}" + (f" lookup {cfg.lookup}x{cfg.lookup_len}" if cfg.lookup else "")
        shapes.append((f"{shape} budget {budget}", dict(settings, budget=budget), arm.tokens_per_step))
        if cfg.guess and budget >= 2:
            shapes.append((f"{shape} budget {budget // 2}", dict(settings, budget=budget // 2),
                           1 + (arm.tokens_per_step - 1) * 0.98))
    kinds = [("compiled", True)] if compile is True else [("eager", False)] if compile is False else \
        [("eager", False), ("compiled", True)]
    arms = [Arm(f"batch {kind} {name}", dict(settings, compile=on), tokens, 1.0)
            for kind, on in kinds for name, settings, tokens in shapes]
    return [arm for arm in arms if arm.settings["window"] >= ranks]


def choose_for_batch(model, base: LookaheadConfig, lanes: int, job_tokens: int, team=None,
                     store: CostStore | None = None, agree=None, shards: int = 1) -> tuple[Arm, "Chooser"]:
    """The arm a batch of `lanes` runs for its whole job (a batch builds one step shape; lanes x its fed tokens
    price each step), by the cost curve and the priors; in a team, rank 0's choice on every rank (`agree`, for a
    model sharded over `shards` tensor-parallel ranks: the replica's first rank's, lp.distributed.agreement)."""
    device_type = next(model.parameters()).device.type
    ranks = team.size if team is not None else 1
    _, curve = step_costs(model, store or CostStore(), agree=agree, shards=shards)
    arms = batch_menu(device_type, base.compile, ranks)
    chooser = Chooser(arms, curve, base, device_type, prior_compile_s(model, device_type), ranks, lanes)
    arm = chooser.choose(max(job_tokens, 1))
    if agree is not None:
        arm = arms[agree.first(arms.index(arm))]
    elif team is not None:
        arm = arms[team.pick(arms.index(arm))]
    return arm, chooser


def prior_compile_s(model, device_type: str) -> float:
    """Seconds compiling an arm's graphs is expected to take before a run has measured it (2 CPU cores: about 5 s
    a layer, benchmarks/README.md (d) and (e4))."""
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return 5.0 + 5.0 * layers if device_type == "cpu" else 30.0 + 2.0 * layers


@dataclass
class Tally:
    """What an arm did in this job. Its first generation counts for acceptance but not for time: it also builds
    what the arm's steps reuse (the reference engine's step layouts, the fast path's buffers), so its steps run
    slower than the arm's later ones (a third slower on stories260k's 5-token prompts)."""

    tokens: int = 0
    steps: int = 0
    fed: int = 0
    timed_steps: int = 0
    seconds: float = 0.0
    compile_s: float = 0.0  # compiling this arm's steps took, all its cache sizes so far
    accepted: Counter = field(default_factory=Counter)  # steps by the tokens each accepted

    def add(self, result: GenerationResult) -> None:
        if self.steps:
            self.timed_steps += result.steps
            self.seconds += result.wall_time_s
        self.compile_s += result.compile_time_s
        self.tokens += result.new_tokens
        self.steps += result.steps
        self.fed += sum(result.tokens_fed_per_step)
        self.accepted.update(result.accepted_per_step)

    def reached(self, depth: int) -> int:
        """Steps that accepted at least `depth` candidate tokens (depth + 1 with the bonus token)."""
        return sum(n for tokens, n in self.accepted.items() if tokens > depth)


class Chooser:
    """Expected seconds for the rest of a job, per arm; picks the least. Pure arithmetic over the cost curve and the
    job's tallies (the tests drive it with synthetic curves)."""

    def __init__(self, arms: list[Arm], curve: CostCurve, base: LookaheadConfig, device_type: str,
                 compile_s: float, ranks: int = 1, lanes: int = 1):
        if not arms:
            raise ValueError("the tuner needs at least one setting to choose from")
        self.arms, self.curve, self.base, self.device_type = arms, curve, base, device_type
        self.prior_compile_s, self.ranks, self.lanes = compile_s, ranks, lanes
        self.tallies = {arm.name: Tally() for arm in arms}
        self.built: list[str] = []  # arms made so far (a compiled one has paid its compile time)

    def predictability(self) -> float:
        """How much better than the priors the arms that ran accepted (1 = as the priors say)."""
        seen = [(arm, self.tallies[arm.name]) for arm in self.arms if self.tallies[arm.name].steps]
        if not seen:
            return 1.0
        got = sum(t.tokens - t.steps for _, t in seen)
        expected = sum((arm.tokens_per_step - 1) * t.steps for arm, t in seen)
        return max(got, 0.0) / expected if expected > 0 else 1.0

    def by_depth(self, arm: Arm) -> float | None:
        """Expected tokens a step from the job's own acceptance by depth, where arms of the arm's family ran (None
        where none did): the chance of a first candidate token is the arm's prior one scaled as the family's first
        tokens beat their priors; each further depth continues as often as the family's steps went on from the
        depth before (censored: only arms that reach a depth count for it), the deepest one seen going on below
        it. So a job whose candidates, once right, stay right rates deeper arms higher than their priors do."""
        family = [(a, t) for a in self.arms if a.family() == arm.family()
                  for t in [self.tallies[a.name]] if t.steps and sum(t.accepted.values()) == t.steps]
        if not family:
            return None
        got = sum(t.reached(1) for _, t in family)
        expected = sum(t.steps * a.first_chance(self.base, self.device_type) for a, t in family)
        first = arm.first_chance(self.base, self.device_type) * (got + PSEUDO_TRIES) / (expected + PSEUDO_TRIES)
        survive = min(first, 1.0)
        total, hazard = 1.0 + survive, PRIOR_HAZARD
        for depth in range(2, arm.depth(self.base, self.device_type) + 1):
            deep = [t for a, t in family if a.depth(self.base, self.device_type) >= depth]
            went_on, tried = sum(t.reached(depth) for t in deep), sum(t.reached(depth - 1) for t in deep)
            if tried:
                hazard = (went_on + PSEUDO_TRIES * PRIOR_HAZARD) / (tried + PSEUDO_TRIES)
            survive *= hazard
            total += survive
        return total

    def tokens_per_step(self, arm: Arm) -> float:
        """The job's acceptance by depth (`by_depth`) where arms of the arm's family ran, else the prior scaled by
        the job's predictability; drawn toward the arm's own figure as it decodes more (half-way at OWN_TOKENS): an
        arm ran on other records than the others did, and records differ far more than arms, so a few records of
        its own say little about the arm."""
        pooled = self.by_depth(arm)
        if pooled is None:
            pooled = 1 + (arm.tokens_per_step - 1) * self.predictability()
        tally = self.tallies[arm.name]
        if not tally.steps:
            return pooled
        weight = tally.tokens / (tally.tokens + OWN_TOKENS)
        return weight * tally.tokens / tally.steps + (1 - weight) * pooled

    def step_seconds(self, arm: Arm) -> float:
        """This job's own figure once the arm ran past its first generation; else what an earlier run observed; else
        the curve's forward at the arm's expected mean fed tokens, times the lanes of a batch (compiled on a CPU:
        less the per-call overhead that compiling removes, about 60 % of a one-token eager forward,
        benchmarks/README.md (d))."""
        tally = self.tallies[arm.name]
        if tally.timed_steps:
            return tally.seconds / tally.timed_steps
        seen = self.curve.observed.get(self.observed_name(arm), {})
        if seen.get("step_s"):
            return float(seen["step_s"])
        forward = self.curve.latency(self.lanes * arm.mean_fed(self.base, self.device_type, self.ranks))
        if arm.compiled:
            one = self.curve.latency(1)
            return max(forward - 0.6 * one, 0.25 * forward) if self.device_type == "cpu" else 0.35 * forward
        return forward

    def observed_name(self, arm: Arm) -> str:
        """The arm's name among what runs observed (a team's step also waits for its exchange: apart per size)."""
        return arm.name if self.ranks == 1 else f"{arm.name} x{self.ranks} ranks"

    def compile_s(self, arm: Arm) -> float:
        if not arm.compiled or arm.name in self.built:
            return 0.0
        seen = self.curve.observed.get(self.observed_name(arm)) or self.curve.observed.get(arm.name, {})
        return float(seen.get("compile_s") or self.prior_compile_s)  # a team records under its own name

    def cost(self, arm: Arm, tokens_left: float) -> float:
        """Expected seconds to decode `tokens_left` more tokens with this arm (a step of a batch decodes for each of
        its lanes), compiling included."""
        return tokens_left * self.step_seconds(arm) / (self.tokens_per_step(arm) * self.lanes) + self.compile_s(arm)

    def choose(self, tokens_left: float, current: str | None = None) -> Arm:
        """The arm with the least expected cost (at most MAX_ARMS ever built); the running arm keeps the job until
        it has decoded TRIAL_TOKENS (a switch on a record's noise would waste a compile)."""
        if current is not None and self.tallies[current].steps and self.tallies[current].tokens < TRIAL_TOKENS:
            return self.by_name(current)
        allowed = [a for a in self.arms if len(self.built) < MAX_ARMS or a.name in self.built]
        return min(allowed, key=lambda arm: self.cost(arm, tokens_left))

    def by_name(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)

    def record(self, arm: Arm, result: GenerationResult) -> None:
        self.tallies[arm.name].add(result)
        tally = self.tallies[arm.name]
        if tally.timed_steps:
            seen = self.curve.observed.setdefault(self.observed_name(arm), {})
            seen["step_s"] = round(tally.seconds / tally.timed_steps, 6)
            seen["fed"] = round(tally.fed / tally.steps, 2)
        if result.compile_time_s > 0:  # this run's figure replaces an earlier run's (a warm compiler cache is quicker)
            seen = self.curve.observed.setdefault(self.observed_name(arm), {})
            seen["compile_s"] = round(tally.compile_s, 2)

    def why(self, tokens_left: float) -> str:
        """Every arm's predicted figures, the chosen first (what --verbose prints)."""
        rows = sorted(self.arms, key=lambda arm: self.cost(arm, tokens_left))
        return "; ".join(f"{arm.name}: {self.tokens_per_step(arm):.2f} tokens/step at {1e3 * self.step_seconds(arm):.2f}"
                         f" ms/step{f' + {self.compile_s(arm):.0f} s compile' if self.compile_s(arm) else ''}"
                         f" = {self.cost(arm, tokens_left):.1f} s" for arm in rows)


class AutoDecoder:
    """A Decoder that tunes itself: runs each generation with the arm the Chooser picks (lp.decoding.Decoder's
    generate, settings, memory and prompt checks, delegated). In a team every rank runs the arm rank 0's chooser
    picks (team.pick), so the ranks agree whatever their own timings say; a model sharded over `shards`
    tensor-parallel ranks is timed by them together and runs the arm its replica's first rank picks (`agree`,
    lp.distributed.agreement, over every rank of the replica). A batch chooses once for its job instead
    (`choose_for_batch`): its lanes share one step shape."""

    def __init__(self, model, config: LookaheadConfig | None = None, job_tokens: int = 0,
                 store: CostStore | None = None, arms: list[Arm] | None = None, team=None, agree=None,
                 shards: int = 1):
        self.model = model
        self.base = config or LookaheadConfig()
        self.device = next(model.parameters()).device
        self.store = store or CostStore()
        self.shared_team = team  # None: one rank
        self.agree = agree  # None: the team's pick, or this process alone
        ranks = team.size if team is not None else 1
        self.key, curve = step_costs(model, self.store, agree=agree, shards=shards)
        arms = arms or menu(self.device.type, self.base.compile, ranks)
        self.chooser = Chooser(arms, curve, self.base, self.device.type, prior_compile_s(model, self.device.type),
                               ranks)
        self.job_tokens = job_tokens  # the job's budget of new tokens not yet started (0: unknown)
        self.budget_seen, self.tokens_seen = 0, 0
        self.decoders: dict[str, Decoder] = {}
        self.current: str | None = None
        self.notify: Callable[[str], None] | None = None
        self.explain: Callable[[str], None] | None = None  # --verbose: every choice's figures
        self._memory: tuple[torch.Tensor, torch.Tensor] | None = None  # a saved memory, for arms made later

    def _tokens_left(self, budget: int) -> float:
        """Expected new tokens of the rest of the job: its budgets, scaled by the share of its budgets the
        generations so far filled (EOS ends some early)."""
        fill = self.tokens_seen / self.budget_seen if self.budget_seen else 1.0
        return max(self.job_tokens, budget) * max(fill, 0.05)

    def _decoder(self, arm: Arm) -> Decoder:
        found = self.decoders.get(arm.name)
        if found is None:
            found = self.decoders[arm.name] = Decoder(self.model, arm.config(self.base), team=self.shared_team)
            self.chooser.built.append(arm.name)
            if self._memory is not None:
                self._load(found, *self._memory)
        self.current = arm.name
        return found

    def generate(self, input_ids, max_new_tokens: int | None = None, tokenizer=None, on_tokens=None,
                 seed: int | None = None) -> GenerationResult:
        budget = within_context(max_new_tokens or 0, len(prompt_ids(input_ids)), context_length(self.model.config))
        left = self._tokens_left(budget)
        arm = self._agreed(self.chooser.choose(left, self.current))
        if self.explain is not None and (arm.name != self.current or not self.chooser.tallies[arm.name].steps):
            self.explain(f"self-tuning, {left:.0f} tokens to go: {self.chooser.why(left)}")
        decoder = self._decoder(arm)
        decoder.notify = self.notify
        result = decoder.generate(input_ids, max_new_tokens, tokenizer=tokenizer, on_tokens=on_tokens, seed=seed)
        self.chooser.record(arm, result)
        self.job_tokens = max(self.job_tokens - budget, 0)
        self.budget_seen += budget
        self.tokens_seen += result.new_tokens
        if self.agree is None or self.agree.leader:  # the leader's figures are the ones that choose
            remember_observed(self.store, self.key, self.chooser.curve)
        text = list(decoder.check_prompt(input_ids)) + result.token_ids
        for name, other in self.decoders.items():  # the arms not running learn the job's text too
            if name != arm.name and other.config.job_memory:
                other.remember(text)
        return result

    def _agreed(self, arm: Arm) -> Arm:
        """The arm every rank runs: the replica's first rank's (sharded), rank 0's of a team, or this one's."""
        arms = self.chooser.arms
        if self.agree is not None:
            return arms[self.agree.first(arms.index(arm))]
        if self.shared_team is not None:
            return arms[self.shared_team.pick(arms.index(arm))]
        return arm

    @property
    def decoder(self) -> Decoder:
        """The arm that ran last (before the first generation: the one the job's budget alone would pick)."""
        if self.current is None:  # every rank alike: no timing of its own counts before the first generation
            shared = self.shared_team is not None or self.agree is not None
            first = self.chooser.arms[0] if shared else self.chooser.choose(self._tokens_left(0))
            return self._decoder(first)
        return self.decoders[self.current]

    @property
    def team(self):
        return self.decoder.team

    @property
    def config(self) -> LookaheadConfig:
        return self.decoder.config

    def check_prompt(self, input_ids) -> list[int]:
        return self.decoder.check_prompt(input_ids)

    def settings(self) -> dict:
        return {**self.decoder.settings(), "chosen_by": "auto", "arm": self.current}

    # -- the job's memory (--memory-file): saved from the arm with the largest n-grams, given to every arm --------

    def remember_grams(self, grams) -> None:
        self._memory = (torch.as_tensor(grams), self._memory[1] if self._memory else torch.zeros(0, dtype=torch.long))
        for decoder in self.decoders.values():
            self._load(decoder, self._memory[0], None)

    def remember_corpus(self, corpus) -> None:
        grams = self._memory[0] if self._memory else torch.zeros(0, self.base.ngram, dtype=torch.long)
        self._memory = (grams, torch.as_tensor(corpus))
        for decoder in self.decoders.values():
            self._load(decoder, None, self._memory[1])

    @staticmethod
    def _load(decoder: Decoder, grams, corpus) -> None:
        cfg = decoder.config
        if grams is not None and cfg.guess:
            decoder.remember_grams(grams)  # cut to the arm's N, or left out (lp.memory_file.fit)
        if corpus is not None and len(corpus) and hasattr(decoder, "remember_corpus"):
            decoder.remember_corpus(corpus)

    def memory_grams(self) -> torch.Tensor:
        """The n-grams of the arm with the longest ones that keeps a pool (the saved file's size), or what was
        loaded when no arm keeps one."""
        pools = [d for d in self.decoders.values() if d.config.guess]
        if not pools:
            return self._memory[0] if self._memory else torch.zeros(0, self.base.ngram, dtype=torch.long)
        return max(pools, key=lambda d: (d.config.ngram, d.config.guess)).memory_grams()

    def memory_corpus(self) -> torch.Tensor:
        corpora = [d.memory_corpus() for d in self.decoders.values() if hasattr(d, "memory_corpus")]
        return max(corpora, key=len) if corpora else torch.zeros(0, dtype=torch.long)
