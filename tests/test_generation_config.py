"""The model's own generation_config is obeyed exactly, or refused with a clear error."""
import pytest
import torch

import lp
from lp.greedy_rules import greedy_rules, hf_greedy
from models import tiny_model
from test_exactness import repetitive_prompt

CONFIG = lp.LookaheadConfig(6, 4, 6)


@pytest.fixture
def model():
    return tiny_model("llama", seed=8)


def test_min_new_tokens_holds_back_eos(model):
    prompt = repetitive_prompt(1, 20)
    run = hf_greedy(model, prompt, 60)
    model.generation_config.eos_token_id = run[5]  # would stop after 6 tokens
    model.generation_config.min_new_tokens = 30
    expected = hf_greedy(model, prompt, 60)
    assert len(expected) > 6
    assert lp.generate(model, prompt, CONFIG, max_new_tokens=60).token_ids == expected


def test_min_length_counts_the_prompt(model):
    prompt = repetitive_prompt(2, 20)
    model.generation_config.eos_token_id = hf_greedy(model, prompt, 60)[3]
    model.generation_config.min_length = 35
    assert lp.generate(model, prompt, CONFIG, max_new_tokens=60).token_ids == hf_greedy(model, prompt, 60)


def test_suppressed_and_bad_single_tokens_never_appear(model):
    prompt = repetitive_prompt(3, 20)
    run = hf_greedy(model, prompt, 60)
    model.generation_config.suppress_tokens = [run[0], run[7]]
    model.generation_config.bad_words_ids = [[run[12]]]
    expected = hf_greedy(model, prompt, 60)
    result = lp.generate(model, prompt, CONFIG, max_new_tokens=60)
    assert result.token_ids == expected
    assert not {run[0], run[7], run[12]} & set(result.token_ids)


def test_begin_suppress_tokens_apply_to_the_first_new_token_only(model):
    prompt = repetitive_prompt(4, 20)
    model.generation_config.begin_suppress_tokens = [hf_greedy(model, prompt, 1)[0]]
    assert lp.generate(model, prompt, CONFIG, max_new_tokens=40).token_ids == hf_greedy(model, prompt, 40)


def test_forced_eos_ends_at_max_length(model):
    prompt = repetitive_prompt(5, 20)
    model.generation_config.eos_token_id = 2
    model.generation_config.forced_eos_token_id = 2
    expected = hf_greedy(model, prompt, 30)
    assert expected[-1] == 2
    assert lp.generate(model, prompt, CONFIG, max_new_tokens=30).token_ids == expected


def test_max_new_tokens_defaults_to_the_generation_config(model):
    prompt = repetitive_prompt(6, 10)
    model.generation_config.max_new_tokens = 13
    assert lp.generate(model, prompt, CONFIG).token_ids == hf_greedy(model, prompt, 13)


@pytest.mark.parametrize("setting,value", [("repetition_penalty", 1.2), ("no_repeat_ngram_size", 3),
                                           ("num_beams", 4), ("sequence_bias", {(5,): 1.0}),
                                           ("bad_words_ids", [[5, 6]])])
def test_settings_that_cannot_be_exact_are_refused_by_name(model, setting, value):
    setattr(model.generation_config, setting, value)
    with pytest.raises(lp.UnsupportedGenerationSetting, match=setting):
        lp.generate(model, [5, 6, 7], CONFIG, max_new_tokens=5)


def test_sampling_settings_do_not_matter_to_greedy(model):
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.9
    rules = greedy_rules(model.generation_config, prompt_len=3, max_new_tokens=5)
    assert not rules.active


def test_rules_mask_rows_by_position():
    gc = tiny_model("llama").generation_config
    gc.eos_token_id, gc.min_new_tokens, gc.suppress_tokens = 2, 2, [4]
    rules = greedy_rules(gc, prompt_len=10, max_new_tokens=5)
    logits = torch.zeros(3, 6)
    rules.apply(logits, torch.tensor([0, 1, 2]))
    low = torch.finfo(logits.dtype).min
    assert logits[:, 4].tolist() == [low] * 3
    assert logits[:, 2].tolist() == [low, low, 0]
