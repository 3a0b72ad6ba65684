"""Run settings of the command line: defaults < YAML file (--config) < --set key=value < dedicated flags."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..auto_tune import SHAPE_KEYS
from ..config import ConfigError, LookaheadConfig, check_bool, check_int
from ..distributed.parallel import KV_SYNC

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
BACKENDS = ("auto", "gloo", "nccl")
MIN_FAULT_TIMEOUT = 1.0
MAX_FAULT_TIMEOUT = 7 * 24 * 3600  # inf or 1e300 would overflow the process group's timedelta on every rank


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides its prompts. model None means the embedded default model."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_new_tokens: int = 128
    kv_sync: str = "recompute"
    backend: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    fault_timeout: float = 60.0
    tp: int = 1
    lp: int | None = None  # ranks per lookahead team; None = world size // (tp x replicas)
    replicas: int | None = None  # independent lookahead teams sharing one queue; None = world // (lp x tp), or 1
    batch_size: int = 1  # sequences one forward decodes (batched lookahead, continuous batching)
    chat: bool = False
    memory_file: str | None = None  # a job's memory on disk: read at the start if there, written at the end
    auto_tune: bool | None = None  # lp.auto_tune picks the settings; None = when no shape setting is given
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    generation: dict = field(default_factory=dict)  # overrides of the model's generation_config
    shape_given: bool = False  # the settings named a step shape (W, N, G, lookup, budget, ...): not a config key

    @property
    def chosen_by(self) -> str:
        """Who picks the lookahead settings: "user" (a shape setting was given), "auto" (lp tunes them; with --tp
        the defaults run instead: see lp.cli.main._decoder) or "default" (auto_tune off)."""
        if self.shape_given:
            return "user"
        return "default" if self.auto_tune is False else "auto"


KNOWN = tuple(f.name for f in fields(RunConfig) if f.name != "shape_given")
LOOKAHEAD_KNOWN = tuple(f.name for f in fields(LookaheadConfig))


def load_yaml(path: str | Path) -> dict:
    """Read a run config file with yaml.safe_load; a one-line ConfigError for every way it can be wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; check the --config path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (key: value), got {type(values).__name__}")
    check_keys(values, str(path))
    return values


def check_keys(values: dict, source: str) -> None:
    """Refuse unknown keys by name, listing the known ones."""
    for key in values:
        if key not in KNOWN:
            raise ConfigError(f"unknown config key {key!r} in {source}; known keys: {', '.join(KNOWN)}")
    generation = values.get("generation")
    if generation is not None and not isinstance(generation, dict):
        raise ConfigError(f"'generation' in {source} must be a mapping like {{repetition_penalty: 1.0}}")
    for key in generation or ():
        if not hasattr(_generation_defaults(), key):
            raise ConfigError(f"unknown config key 'generation.{key}' in {source}; it must be a field of "
                              "transformers.GenerationConfig (e.g. repetition_penalty, eos_token_id)")
    section = values.get("lookahead")
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"'lookahead' in {source} must be a mapping like {{window: 15, ngram: 5, guess: 15}}")
    for key in section:
        if key not in LOOKAHEAD_KNOWN:
            raise ConfigError(f"unknown config key 'lookahead.{key}' in {source}; "
                              f"known lookahead keys: {', '.join(LOOKAHEAD_KNOWN)}")


def _generation_defaults():
    from transformers import GenerationConfig

    return GenerationConfig()


def parse_overrides(items: list[str]) -> dict:
    """Turn ["lookahead.window=7", "dtype=float64"] into a nested dict; values are read as YAML scalars."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (for example --set lookahead.window=7), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with an earlier --set of {part!r}")
        node[leaf] = value
    check_keys(out, "--set")
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` over `base` (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(values: dict) -> RunConfig:
    """Validate a merged mapping into a RunConfig (every rank gets the same answer from the same input)."""
    check_keys(values, "the run settings")
    v = dict(values)
    v["generation"] = dict(v.get("generation") or {})
    lookahead = dict(v.pop("lookahead", None) or {})
    if "seed" in v and "seed" not in lookahead:
        lookahead["seed"] = v["seed"]
    given = [key for key in SHAPE_KEYS if key in lookahead]
    if given and v.get("auto_tune") is True:
        raise ConfigError(f"auto_tune picks the step's shape itself, but {given[0]} is given too; drop auto_tune or "
                          f"the shape settings ({', '.join(given)})")
    cfg = RunConfig(**v, lookahead=LookaheadConfig.from_dict(lookahead), shape_given=bool(given))
    _validate(cfg)
    return cfg


def _validate(cfg: RunConfig) -> None:
    if cfg.model is not None and (not isinstance(cfg.model, str) or not cfg.model.strip()):
        raise ConfigError(f"model must be a hub id or a local path (or null for the embedded model), got {cfg.model!r}")
    _choice("dtype", cfg.dtype, DTYPES)
    _choice("kv_sync", cfg.kv_sync, KV_SYNC)
    _choice("backend", cfg.backend, BACKENDS)
    if not isinstance(cfg.device, str) or not cfg.device:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    check_int("max_new_tokens", cfg.max_new_tokens, 1)
    check_int("seed", cfg.seed, 0)
    check_int("tp", cfg.tp, 1)
    if cfg.lp is not None:
        check_int("lp", cfg.lp, 1)
    if cfg.replicas is not None:
        check_int("replicas", cfg.replicas, 1)
    check_int("batch_size", cfg.batch_size, 1, 256)
    check_bool("trust_remote_code", cfg.trust_remote_code)
    check_bool("chat", cfg.chat)
    if cfg.auto_tune is not None:
        check_bool("auto_tune", cfg.auto_tune)
    if cfg.memory_file is not None:
        if not isinstance(cfg.memory_file, str) or not cfg.memory_file.strip():
            raise ConfigError(f"memory_file must be a file path, got {cfg.memory_file!r}")
        if not cfg.lookahead.job_memory:
            raise ConfigError("--memory-file keeps a job's memory: it needs --memory job (the default), not "
                              "--memory record")
    timeout = cfg.fault_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not MIN_FAULT_TIMEOUT <= timeout <= MAX_FAULT_TIMEOUT:
        raise ConfigError(f"fault_timeout must be a number of seconds from {MIN_FAULT_TIMEOUT:g} (a peer needs that "
                          f"long to answer) to {MAX_FAULT_TIMEOUT} (a week), got {timeout!r}")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
