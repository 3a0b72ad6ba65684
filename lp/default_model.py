"""The project's default model: a tiny LLaMA trained on Python stdlib source (see lp/assets/code_model)."""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "assets" / "code_model"

# Function headers / docstring openings from held-out stdlib files the model never trained on.
# None ends in a bare newline: the BPE merges "\n" with the next line's indentation, so such a
# prompt ends in a token the model rarely saw there.
DEFAULT_PROMPTS = [
    'def count_lines_with_wrapping(s, linewidth=80):\n    """',  # idlelib/squeezer.py
    'def decode_header(header):\n    """',  # email/header.py
    'def _int_to_enum(value, enum_klass):\n'
    '    """Convert a numeric value to an IntEnum member.\n'
    "    If it's not a known member, return the numeric value itself.\n"
    '    """\n'
    "    try:",  # signal.py
    'def always_iterable(obj, base_type=(str, bytes)):\n'
    '    """If *obj* is iterable, return an iterator over its items',  # importlib/metadata/_itertools.py
    "def print_list(extracted_list, file=None):\n"
    '    """Print the list of tuples as returned by extract_tb() or\n'
    '    extract_stack() as a formatted stack trace to the given file."""\n'
    "    if file is None:",  # traceback.py
]


def load_default_model(dtype=torch.float32, device="cpu"):
    """Load (model, tokenizer) from DEFAULT_MODEL_PATH offline, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL_PATH, dtype=dtype, local_files_only=True
    )
    return model.to(device).eval(), tokenizer
