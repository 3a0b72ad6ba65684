"""The output of lookahead decoding equals transformers' greedy decoding, token for token."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lp
from lp.greedy_rules import hf_greedy
from models import FAMILIES, STORIES, VOCAB, stories, tiny_model

GRID = [(1, 2, 0), (1, 2, 1), (2, 3, 2), (4, 3, 4), (5, 4, 0), (7, 5, 7), (15, 5, 15), (3, 6, 40)]


def repetitive_prompt(seed: int, length: int) -> list[int]:
    """Prompts with repeats, so the n-gram pool has something to offer."""
    rng = random.Random(seed)
    motif = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 8))]
    return [rng.choice(motif) if rng.random() < 0.7 else rng.randrange(3, VOCAB) for _ in range(length)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("window,ngram,guess", GRID)
def test_every_family_matches_greedy(family_model, window, ngram, guess):
    prompt = repetitive_prompt(window * 31 + ngram, 24)
    expected = hf_greedy(family_model, prompt, 48)
    result = lp.generate(family_model, prompt, lp.LookaheadConfig(window, ngram, guess), max_new_tokens=48)
    assert result.token_ids == expected
    assert sum(result.accepted_per_step) == 48 and result.steps == len(result.accepted_per_step)
    assert max(result.accepted_per_step) <= ngram


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_both_attention_implementations_take_the_float_mask(attn):
    model = tiny_model("llama", seed=3, attn=attn)
    prompt = repetitive_prompt(5, 30)
    assert lp.generate(model, prompt, lp.LookaheadConfig(5, 4, 5), max_new_tokens=64).token_ids == \
        hf_greedy(model, prompt, 64)


@pytest.mark.parametrize("prompt_len", [1, 2, 7, 150, 400])
@pytest.mark.parametrize("max_new", [1, 2, 5, 100])
def test_prompt_lengths_and_budgets(prompt_len, max_new):
    model = tiny_model("llama", seed=1)
    prompt = repetitive_prompt(prompt_len, prompt_len)
    result = lp.generate(model, prompt, lp.LookaheadConfig(6, 4, 6), max_new_tokens=max_new)
    assert result.token_ids == hf_greedy(model, prompt, max_new)
    assert result.stop_reason == "max_new_tokens"


def test_window_longer_than_the_tokens_left_in_the_context():
    model = tiny_model("gpt2", seed=2, n_positions=64)  # learned positions: an overflow would crash
    prompt = repetitive_prompt(9, 50)
    result = lp.generate(model, prompt, lp.LookaheadConfig(15, 5, 15), max_new_tokens=40)
    assert result.token_ids == hf_greedy(model, prompt, 14)
    assert result.stop_reason == "context" and len(result.token_ids) == 14


def test_eos_inside_a_step_ends_the_output_there():
    model = tiny_model("phi", seed=4)
    prompt = repetitive_prompt(11, 20)
    free_run = hf_greedy(model, prompt, 120)
    result = lp.generate(model, prompt, lp.LookaheadConfig(8, 5, 8), max_new_tokens=120)
    assert result.token_ids == free_run
    # choose as EOS a token first produced late, inside a multi-token step
    position, step_end = 0, 0
    for accepted in result.accepted_per_step:
        step_end += accepted
        if accepted > 1 and step_end > 10 and free_run[step_end - 2] not in free_run[: step_end - 2]:
            position = step_end - 2
            break
    assert position, "this seed should give a multi-token step with a fresh token"
    eos = free_run[position]
    model.generation_config.eos_token_id = [eos, VOCAB + 5]  # several EOS ids
    expected = hf_greedy(model, prompt, 120)
    assert expected == free_run[: position + 1]
    result = lp.generate(model, prompt, lp.LookaheadConfig(8, 5, 8), max_new_tokens=120)
    assert result.token_ids == expected and result.stop_reason == "eos"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), prompt_len=st.integers(1, 60), window=st.integers(1, 10),
       ngram=st.integers(2, 6), guess=st.integers(0, 12), max_new=st.integers(1, 70))
def test_random_prompts_and_configs(seed, prompt_len, window, ngram, guess, max_new):
    model = _shared_model()
    prompt = repetitive_prompt(seed, prompt_len)
    config = lp.LookaheadConfig(window, ngram, guess, seed=seed % 7)
    assert lp.generate(model, prompt, config, max_new_tokens=max_new).token_ids == hf_greedy(model, prompt, max_new)


_MODEL = {}


def _shared_model():
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_model("qwen2", seed=5)
    return _MODEL["m"]


def test_streaming_delivers_every_token_as_its_step_ends():
    model = tiny_model("llama", seed=6)
    prompt = repetitive_prompt(2, 16)
    seen = []
    result = lp.generate(model, prompt, lp.LookaheadConfig(5, 4, 5), max_new_tokens=40, on_tokens=seen.append)
    assert [t for step in seen for t in step] == result.token_ids
    assert [len(s) for s in seen] == result.accepted_per_step
    assert list(lp.stream(model, prompt, lp.LookaheadConfig(5, 4, 5), max_new_tokens=40)) == seen


def test_the_caller_is_not_left_in_inference_mode_between_streamed_steps():
    model = tiny_model("llama", seed=6)
    modes = [torch.is_inference_mode_enabled() for _ in lp.stream(model, repetitive_prompt(2, 16),
                                                                      lp.LookaheadConfig(5, 4, 5), max_new_tokens=20)]
    assert modes and not any(modes)


def test_the_bonus_token_makes_a_full_match_yield_n_tokens():
    model = tiny_model("gemma", seed=0)
    prompt = repetitive_prompt(3, 40)
    result = lp.generate(model, prompt, lp.LookaheadConfig(10, 4, 10), max_new_tokens=80)
    assert result.token_ids == hf_greedy(model, prompt, 80)
    assert max(result.accepted_per_step) == 4  # N, not N - 1


needs_stories = pytest.mark.skipif(not STORIES.exists(), reason="tests/assets/stories260k is absent")


@needs_stories
@pytest.mark.parametrize("window,ngram,guess", [(1, 2, 0), (15, 5, 15), (7, 5, 7), (5, 4, 5), (3, 3, 30)])
@pytest.mark.parametrize("prompt", ["Once upon a time", "Tom and Lily went to the park. They saw a big dog."])
def test_stories260k_matches_greedy(window, ngram, guess, prompt):
    model, tokenizer = _stories()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    result = lp.generate(model, ids, lp.LookaheadConfig(window, ngram, guess), max_new_tokens=256,
                         tokenizer=tokenizer)
    assert result.token_ids == hf_greedy(model, ids[0].tolist(), 256)
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if guess:
        assert result.tokens_per_step > 1.3  # real text repeats: n-grams get accepted


@needs_stories
def test_stories260k_long_prompt_and_short_budgets():
    model, tokenizer = _stories()
    story = lp.generate(model, tokenizer("Once upon a time", return_tensors="pt").input_ids,
                        lp.LookaheadConfig(7, 5, 7), max_new_tokens=300).token_ids
    prompt = tokenizer("Once upon a time").input_ids + story
    for max_new in (1, 3, 17, 150):
        assert lp.generate(model, prompt, lp.LookaheadConfig(7, 5, 7), max_new_tokens=max_new).token_ids == \
            hf_greedy(model, prompt, max_new)


_STORIES = {}


def _stories():
    if "m" not in _STORIES:
        _STORIES["m"] = stories()
    return _STORIES["m"]
