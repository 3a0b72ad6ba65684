"""What a step costs on this machine: model-forward latency against tokens fed, measured once and kept on disk.

The self-tuner (lp.auto_tune) divides expected accepted tokens by this latency. A curve is measured in a second or
a few at first use (an eager forward of T tokens through a static cache, median of a few calls per T) and cached
under the user's cache folder, keyed by device name, thread count, model config, dtype and torch version; what
a run then observes (an arm's real seconds a step, its compile time) is added to the same entry for later runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decoding import cache_argument
from .distributed.agreement import Alone
from .slot_cache import SlotCache

log = logging.getLogger("lp")

CPU_SIZES = (1, 4, 16, 32, 64, 128)  # tokens fed per forward where the curve is measured
ACCEL_SIZES = (1, 16, 64, 128, 256, 512)
PREFIX = 192  # cache entries before the measured tokens (a prompt and some output: a typical decoding context)
CALLS = 7  # timed calls per size (median), after a warm-up call, unless BUDGET_S runs out first (3 at least)
BUDGET_S = 2.0  # seconds the timed calls may take together
# A size whose warm-up call takes longer than SLOW_CALL_S is the last one measured (the curve goes on linearly), once
# MIN_SIZES are, unless a call takes TOO_SLOW_S: from two points one slow call sets the slope (SmolLM2-135M here:
# 87 ms for 1 token and 137 for 4 in one run, benchmarks/results_published/auto_tune_fair_smollm2_chat_2points).
SLOW_CALL_S = 0.1
MIN_SIZES = 3
TOO_SLOW_S = 1.0
CACHE_FILE = "step_costs.json"


def cache_dir() -> Path:
    """Where lp keeps what it measured: $LP_CACHE_DIR, else $XDG_CACHE_HOME/lp, else ~/.cache/lp."""
    if os.environ.get("LP_CACHE_DIR"):
        return Path(os.environ["LP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lp"


def device_name(device: torch.device) -> str:
    """The device as the cache names it: the GPU's product name, or the CPU's with the torch threads it runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor() or 'cpu'} x{os.cpu_count()} threads={torch.get_num_threads()}"


def cost_key(model, device: torch.device, dtype: torch.dtype, shards: int = 1) -> str:
    """The cache key of a curve: device name, model config, dtype, torch version and, for a model sharded over
    tensor-parallel ranks, their number (a short hash of them)."""
    config = model.config.to_dict()
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype",
                                                           "dtype", "generation_config")}
    parts = [device_name(device), config, str(dtype), torch.__version__] + ([f"tp={shards}"] if shards > 1 else [])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class CostCurve:
    """Seconds a forward takes against tokens fed (measured points, linear between them and past the last two),
    and what runs observed: per arm (lp.auto_tune.Arm.name) seconds a step at a mean of tokens fed, and compile
    seconds."""

    points: dict[int, float]
    observed: dict[str, dict] = field(default_factory=dict)

    def latency(self, fed: float) -> float:
        """Predicted seconds of a forward of `fed` tokens (fed may be a mean, so fractional)."""
        sizes = sorted(self.points)
        if fed <= sizes[0] or len(sizes) == 1:
            return self.points[sizes[0]]
        for low, high in zip(sizes, sizes[1:]):
            if fed <= high:
                break
        share = (fed - low) / (high - low)  # past the last size: the last segment's slope goes on
        return self.points[low] + share * (self.points[high] - self.points[low])

    def to_json(self) -> dict:
        return {"points": {str(k): v for k, v in self.points.items()}, "observed": self.observed}

    @classmethod
    def from_json(cls, value: dict) -> "CostCurve":
        points = {int(k): float(v) for k, v in value["points"].items()}
        if not points or any(not 0 < v < 3600 for v in points.values()):
            raise ValueError("a curve needs positive latencies")
        observed = value.get("observed") or {}
        if not isinstance(observed, dict):
            raise ValueError("observed must be a mapping")
        return cls(points, observed)


def measure(model, sizes: tuple[int, ...] | None = None, calls: int = CALLS, agree=None) -> dict[int, float]:
    """Median seconds of an eager forward of T tokens for each T in `sizes` (a static cache of PREFIX entries
    before them, logits for every row, as a fast-path step feeds), in about BUDGET_S at most. The sizes take turns
    call by call, so a burst of load elsewhere slows them alike, and the curve is made non-decreasing from the top
    (a forward of more tokens never costs less: a size that measured slower than a larger one was disturbed).
    `agree` (lp.distributed.agreement): whose clock decides when to stop, for ranks that run a sharded forward
    together (default: this process's)."""
    agree = agree or Alone()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    sizes = sizes or default_sizes(device)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    sizes = tuple(t for t in sizes if PREFIX + t <= context) or (1,)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    vocab = model.get_output_embeddings().weight.shape[0]
    capacity = 1 << (PREFIX + max(sizes) - 1).bit_length()
    argument = cache_argument(model)
    calls_of = {}
    for t in sizes:
        cache = SlotCache(layers, capacity, device)
        cache.length.fill_(PREFIX)
        cache.slots = torch.arange(PREFIX, PREFIX + t, device=device)
        ids = torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(t)).to(device)
        positions = cache.slots[None].clone()
        visible = torch.arange(capacity, device=device)[None, :] <= positions[0, :, None]
        mask = torch.zeros(t, capacity, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
        calls_of[t] = dict(input_ids=ids, position_ids=positions, attention_mask=mask[None, None], use_cache=True,
                           **{argument: cache})
    times = {t: [] for t in sizes}
    with torch.inference_mode():
        for n, t in enumerate(sizes, 1):  # the warm-up calls (they also fill each cache's buffers), smallest first
            seconds = _timed(model, calls_of[t], device)
            slow = seconds > SLOW_CALL_S and (n >= MIN_SIZES or seconds > TOO_SLOW_S)
            if agree.first(slow and n > 1):  # a large model on a CPU: larger sizes would take seconds
                sizes = sizes[:n]
                break
        started = time.perf_counter()
        for call in range(calls):
            if call >= 3 and agree.first(time.perf_counter() - started > BUDGET_S):
                break
            for t in sizes:
                times[t].append(_timed(model, calls_of[t], device))
    out, lowest = {}, float("inf")
    for t in sorted(sizes, reverse=True):
        lowest = min(lowest, statistics.median(times[t]))
        out[t] = lowest
    return dict(sorted(out.items()))


def default_sizes(device: torch.device) -> tuple[int, ...]:
    return CPU_SIZES if device.type == "cpu" else ACCEL_SIZES


def _timed(model, call: dict, device: torch.device) -> float:
    """Seconds of one forward, the device synchronised before and after."""
    _sync(device)
    began = time.perf_counter()
    model(**call)
    _sync(device)
    return time.perf_counter() - began


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CostStore:
    """The cached curves in one JSON file (written whole through a temporary file, so a reader never sees half of
    one); a damaged file is set aside with one log line and measured again."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / CACHE_FILE

    def read(self, warn: bool = True) -> dict:
        """The whole cache ({} when absent or damaged; damage is logged once, by the read that finds it)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a mapping")
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            if warn:
                log.warning("lp: the step-cost cache %s is damaged (%s); measuring again", self.path, exc)
            return {}

    def curve(self, key: str) -> CostCurve | None:
        value = self.read().get(key)
        if value is None:
            return None
        try:
            return CostCurve.from_json(value)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("lp: the step-cost cache %s holds a damaged curve (%s); measuring again", self.path, exc)
            return None

    def write(self, key: str, curve: CostCurve, about: dict | None = None) -> None:
        """Store `curve` under `key` (other keys kept); a cache folder that cannot be written is logged, not fatal."""
        data = self.read(warn=False)
        data[key] = {**curve.to_json(), **(about or {})}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".step_costs.", delete=False,
                                             encoding="utf-8") as tmp:
                json.dump(data, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)
        except OSError as exc:
            log.warning("lp: cannot write the step-cost cache %s (%s); the next run measures again", self.path, exc)


def step_costs(model, store: CostStore | None = None, refresh: bool = False, agree=None,
               shards: int = 1) -> tuple[str, CostCurve]:
    """This model's key and curve on its device: from the cache, else measured now and cached (`refresh`: measured
    again, keeping what runs observed). A model sharded over `shards` tensor-parallel ranks is measured by all of
    them together, `agree` (lp.distributed.agreement) making every choice from its leader's cache and clock; every
    rank gets the leader's curve, and only the leader writes the cache."""
    agree = agree or Alone()
    store = store or CostStore()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    key = cost_key(model, device, dtype, shards)
    found = store.curve(key) if agree.leader else None  # the others follow: their cache may differ (another node)
    cached = agree.first(found is not None and not refresh)
    if not cached:
        points = measure(model, agree=agree)
    else:  # a follower without the leader's cache gets its points just below
        points = found.points if found is not None else {}
    if agree.size > 1:  # the leader's points, size by size (0: not measured)
        sizes = default_sizes(device)
        leaders = agree.first_floats([points.get(t, 0.0) for t in sizes])
        points = {t: v for t, v in zip(sizes, leaders) if v > 0}
    curve = CostCurve(points, {} if found is None else found.observed)
    if not cached and agree.leader:
        store.write(key, curve, {"device": device_name(device), "dtype": str(dtype), "torch": torch.__version__,
                                 "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
                                 **({"tensor_parallel": shards} if shards > 1 else {}),
                                 "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return key, curve


def remember_observed(store: CostStore, key: str, curve: CostCurve) -> None:
    """Save what a run observed (curve.observed) beside the measured points, for the next run of this model."""
    stored = store.read(warn=False).get(key)
    about = {k: v for k, v in stored.items() if k not in ("points", "observed")} if isinstance(stored, dict) else {}
    store.write(key, curve, about)
