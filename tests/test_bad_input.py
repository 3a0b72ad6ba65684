"""Bad input gets a one-line error that says what to change."""
import pytest
import torch

import lp
from models import tiny_model


def test_empty_prompt():
    with pytest.raises(lp.PromptError, match="empty"):
        lp.generate(tiny_model(), [], max_new_tokens=3)


def test_prompt_longer_than_the_context():
    model = tiny_model("llama", max_position_embeddings=32)
    with pytest.raises(lp.PromptError, match="shorten it to at most 31 tokens"):
        lp.generate(model, list(range(3, 40)), max_new_tokens=3)


def test_batches_are_refused():
    with pytest.raises(lp.PromptError, match="batch size 2"):
        lp.generate(tiny_model(), torch.ones(2, 4, dtype=torch.long), max_new_tokens=3)


def test_sliding_window_models_are_refused_before_any_work():
    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding_window"):
        lp.generate(model, [5, 6, 7], max_new_tokens=3)


def test_negative_budget():
    with pytest.raises(ValueError, match="max_new_tokens"):
        lp.generate(tiny_model(), [5, 6], max_new_tokens=-1)


def test_errors_are_one_line():
    for bad in (dict(window=0), dict(ngram=100), dict(guess="many")):
        with pytest.raises(lp.ConfigError) as info:
            lp.LookaheadConfig(**bad)
        assert "\n" not in str(info.value)


def test_the_cache_goes_by_the_name_the_models_forward_takes():
    """transformers 5.17's GPT-2 takes past_key_values and would silently swallow cache=, ignoring the cache."""
    from lp.decoding import cache_argument

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
            return None

    class NewStyle(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, attention_mask=None, **kwargs):
            return None

    assert cache_argument(OldStyle()) == "past_key_values"
    assert cache_argument(NewStyle()) == "cache"
