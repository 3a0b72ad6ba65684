"""Models and prompt suites for the benchmarks, offline: a path/hub id, "default", "stories260k", "smollm2-135m"
(lp.named_models) or random-llama."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
STORIES = REPO / "tests" / "assets" / "stories260k"  # shipped with the tests (1 MB, MIT)
DEFAULT_SUITES = {"default": "code.jsonl", "stories260k": "stories.jsonl", "smollm2-135m": "chat.jsonl"}


class ModelUnavailable(RuntimeError):
    """The requested model is not on this machine (the message says where it was looked for)."""


@dataclass
class Prompt:
    """One benchmark prompt: an id and its token ids (text kept for the record)."""

    id: str
    text: str
    ids: list[int]


def random_llama_config(spec: str):
    """LlamaConfig from "random-llama:hidden=768,layers=4,heads=12,vocab=32000[,kv=..,ffn=..,seed=..]"."""
    from transformers import LlamaConfig

    values = dict(hidden=512, layers=4, heads=8, vocab=32000, seed=0)
    body = spec.split(":", 1)[1] if ":" in spec else ""
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in ("hidden", "layers", "heads", "vocab", "kv", "ffn", "seed", "context"):
            raise ValueError(f"unknown random-llama key {key!r} in {spec!r}")
        values[key] = int(value)
    hidden = values["hidden"]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=values["layers"], num_attention_heads=values["heads"],
                         num_key_value_heads=values.get("kv", values["heads"]), vocab_size=values["vocab"],
                         intermediate_size=values.get("ffn", 64 * round(8 * hidden / 3 / 64)),
                         max_position_embeddings=values.get("context", 4096), bos_token_id=1, eos_token_id=None,
                         pad_token_id=0, tie_word_embeddings=False)
    return config, values["seed"]


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) for a model spec, on the CPU; tokenizer is None for random models (prompts map
    bytes to ids). The default model, stories260k, named models and paths or hub ids load as the command line
    loads them."""
    import transformers

    from lp.cli.main import UsageError, load_model as load_run_model
    from lp.cli.run_config import RunConfig

    transformers.utils.logging.disable_progress_bar()
    if spec.startswith("random-llama"):
        config, seed = random_llama_config(spec)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model.eval(), None
    if spec == "stories260k" and not STORIES.exists():
        raise ModelUnavailable(f"stories260k is absent (looked in {STORIES})")
    model = None if spec == "default" else str(STORIES if spec == "stories260k" else spec)
    try:
        return load_run_model(RunConfig(model=model, dtype=str(dtype).removeprefix("torch.")), torch.device("cpu"))
    except UsageError as error:  # missing default model, bad path, not in the offline cache, ...
        raise ModelUnavailable(str(error)) from None


def default_suite(spec: str) -> Path:
    """The prompt suite that suits a model spec (code for the default model, chat for smollm2-135m, else stories)."""
    return PROMPTS_DIR / DEFAULT_SUITES.get(spec, "stories.jsonl")


def render(record: dict, tokenizer) -> str:
    """The prompt text of a suite record: "prompt", or "messages" through the chat template (or a plain transcript)."""
    if "prompt" in record:
        return record["prompt"]
    messages = record["messages"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def encode(text: str, tokenizer, vocab_size: int) -> list[int]:
    """Token ids of `text`: the tokenizer's, or UTF-8 bytes (offset past the special ids) for random models."""
    if tokenizer is not None:
        return list(tokenizer(text).input_ids)
    return [3 + b % (vocab_size - 3) for b in text.encode()]


def load_prompts(path: str | Path, tokenizer, vocab_size: int, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL suite ({id, prompt} or {id, messages}) and tokenise the first `limit` prompts."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        text = render(record, tokenizer)
        out.append(Prompt(str(record.get("id", n)), text, encode(text, tokenizer, vocab_size)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no prompts in {path}")
    return out


def add_suite_arguments(parser, default_model: str) -> None:
    """--model, --prompts and --limit: the job a benchmark decodes (see `load_suite`)."""
    parser.add_argument("--model", default=default_model, help="default, stories260k, smollm2-135m, a path, ...")
    parser.add_argument("--prompts", help="JSONL suite (default: the model's own, as default_suite picks)")
    parser.add_argument("--limit", type=int, help="first LIMIT records")


def load_suite(args):
    """(model in float32, tokenizer, the suite's path as the results name it, its prompts) for `add_suite_arguments`."""
    model, tokenizer = load_model(args.model, torch.float32)
    suite = Path(args.prompts) if args.prompts else default_suite(args.model)
    prompts = load_prompts(suite, tokenizer, model.config.vocab_size, args.limit)
    full = suite.resolve()
    shown = str(full.relative_to(REPO) if full.is_relative_to(REPO) else suite)
    return model, tokenizer, shown, prompts
