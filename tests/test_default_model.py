"""Tests for the packaged default model (lp/assets/code_model) and its training script (tools/)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lp.default_model import DEFAULT_MODEL_PATH, DEFAULT_PROMPTS, load_default_model
from lp.greedy_rules import hf_greedy


def _load_trainer():
    """tools/train_default_model.py, a development script outside the installed package, loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "tools" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tdm = _load_trainer()

TRICKY = "def f(x):\n\tif x:  \n\t\treturn  'é中🙂'\r\n\n\n    # trailing   \n  \n"


@pytest.fixture(scope="module")
def default():
    return load_default_model()


@pytest.fixture(scope="module")
def heldout_texts():
    _, held = tdm.split_files(tdm.stdlib_files())
    assert held, "no held-out stdlib files found"
    return [text for _, text in held[:6]]


def test_package_files_and_sizes():
    names = {p.name for p in DEFAULT_MODEL_PATH.iterdir()}
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in names
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_PATH.rglob("*") if p.is_file())
    assert total < 25 * 2**20
    assert (DEFAULT_MODEL_PATH / "model.safetensors").stat().st_size < 20 * 2**20


def test_loads_with_no_network_at_all(tmp_path):
    # a fresh process whose every HTTP(S) request goes to a closed loopback port: any download attempt fails
    code = ("from lp.default_model import load_default_model; m, t = load_default_model(); "
            "print(m.config.model_type, len(t))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               NO_PROXY="")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "llama"


def test_the_package_describes_itself(default):
    model, tok = default
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 6_000_000
    eot = tok.convert_tokens_to_ids(tdm.EOT)
    assert tok.bos_token_id == tok.eos_token_id == eot
    gen = json.loads((DEFAULT_MODEL_PATH / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == eot
    assert model.generation_config.eos_token_id == eot


def test_tokenizer_roundtrip_exact(default, heldout_texts):
    _, tok = default
    for text in heldout_texts + [TRICKY]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        with_bos = tok(text)["input_ids"]
        assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
        assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_default_prompts_come_from_heldout_files():
    for rel in ("idlelib/squeezer.py", "traceback.py", "email/header.py", "signal.py",
                "importlib/metadata/_itertools.py"):
        assert tdm.is_heldout(rel)
    assert all(p.startswith("def ") for p in DEFAULT_PROMPTS)


def test_greedy_generation_is_deterministic_and_plausible(default):
    model, tok = default
    for prompt in DEFAULT_PROMPTS[:3]:
        enc = tok(prompt, return_tensors="pt")
        outs = [model.generate(**enc, do_sample=False, max_new_tokens=24) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])
        new = outs[0][0, enc["input_ids"].shape[1]:]
        assert len(new) > 0
        text = tok.decode(new, skip_special_tokens=True)
        assert text.strip() and any(c.isalpha() for c in text)


@pytest.mark.slow
def test_smoke_training_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reports = [tdm.main(["--out", str(tmp_path / name), "--smoke"]) for name in ("a", "b")]
    assert reports[0]["steps"] == 5 and reports[0]["heldout_loss_per_token"] > 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes(), "training is not reproducible"
    tok = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", local_files_only=True)
    assert tok.decode(tok(TRICKY, add_special_tokens=False)["input_ids"]) == TRICKY
    out = model.generate(**tok("def f(", return_tensors="pt"), do_sample=False, max_new_tokens=4)
    assert out.shape[1] == len(tok("def f(")["input_ids"]) + 4 or out[0, -1] == tok.eos_token_id
    assert (tmp_path / "a" / "training_report.json").exists()


@pytest.mark.parametrize("window,ngram,guess", [(15, 5, 15), (7, 5, 7), (1, 2, 0)])
def test_lookahead_equals_greedy_on_the_default_model(window, ngram, guess):
    import lp

    model, tokenizer = load_default_model(dtype=torch.float64)
    for prompt in DEFAULT_PROMPTS[:3]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = hf_greedy(model, ids[0].tolist(), 96)
        result = lp.generate(model, ids, lp.LookaheadConfig(window, ngram, guess), max_new_tokens=96)
        assert result.token_ids == expected
        if guess:
            assert result.tokens_per_step > 1.5  # code repeats: lookahead pays off on the default model
