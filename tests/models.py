"""Tiny random decoder-only models of every supported family, in float64, built offline from configs."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

# the real stories260k model (1 MB, MIT; PROVENANCE.md beside it), shipped with the tests so a clone tests fully
STORIES = Path(__file__).resolve().parent / "assets" / "stories260k"

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2, use_sliding_window=False, sliding_window=None)),
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, rotary_pct=0.5)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                                eos_token_id=2)),
    "phi": ("PhiConfig", dict(_COMMON, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", dict(_COMMON, num_key_value_heads=2, sliding_window=None, pad_token_id=0)),
    "gemma": ("GemmaConfig", dict(_COMMON, num_key_value_heads=1, head_dim=8)),
}


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    """A seeded random model of `family`, float64, eval mode, no EOS by default (so runs reach max_new_tokens)."""
    name, kwargs = FAMILIES[family]
    config = getattr(transformers, name)(**{**kwargs, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation=attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def stories():
    """The real stories260k model in float64 (caller skips when STORIES is absent)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    return model, tokenizer
