"""Bad input gets a one-line error that says what to change."""
import pytest
import torch

import lp
from lp.greedy_rules import hf_greedy
from models import tiny_model


def test_empty_prompt():
    with pytest.raises(lp.PromptError, match="empty"):
        lp.generate(tiny_model(), [], max_new_tokens=3)


def test_prompt_longer_than_the_context():
    model = tiny_model("llama", max_position_embeddings=32)
    with pytest.raises(lp.PromptError, match="shorten it to at most 31 tokens"):
        lp.generate(model, list(range(3, 40)), max_new_tokens=3)


def test_a_decoder_refuses_a_batch_and_names_lp_generate_for_one():
    with pytest.raises(lp.PromptError, match="batch size 2; pass input_ids.*to lp.generate"):
        lp.Decoder(tiny_model()).generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=3)
    rows = lp.generate(tiny_model(), torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), max_new_tokens=3)
    assert [r.token_ids for r in rows] == [hf_greedy(tiny_model(), [5, 6, 7, 8], 3),
                                           hf_greedy(tiny_model(), [9, 10, 11, 12], 3)]


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


def test_attention_that_reads_the_mask_as_padding_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # what from_pretrained(attn_implementation=...) sets
    with pytest.raises(ValueError, match="load it with attn_implementation='sdpa'"):
        lp.generate(model, [5, 6, 7], max_new_tokens=3)


def test_a_forward_that_ignores_logits_to_keep_is_caught_not_trusted():
    model = tiny_model("llama")
    forward = model.forward

    def every_row(*args, logits_to_keep=None, **kwargs):
        return forward(*args, logits_to_keep=0, **kwargs)  # 0 = all rows

    model.forward = every_row
    with pytest.raises(RuntimeError, match="does not honour logits_to_keep"):
        lp.generate(model, [5, 6, 7, 5, 6, 7], lp.LookaheadConfig(3, 3, 3, compile=False), max_new_tokens=5)


def test_a_team_shares_kv_entries_whose_value_heads_differ_from_key_heads(tmp_path):
    import torch.distributed as dist
    from lp.distributed.parallel import ProcessGroupTeam
    from lp.kv_cache import InPlaceCache
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        team = ProcessGroupTeam("gather", store=store)
        team.begin(ngram=3, width=2)
        team.agree([1], [], [], 0)
        cache = InPlaceCache(capacity=8)
        cache.update(torch.ones(1, 2, 4, 4), torch.full((1, 2, 4, 6), 2.0), 0)  # key head 4, value head 6
        team.share_kv(cache, 1, 2, winner=0)  # packs keys and values into one buffer (raised before the fix)
        assert cache.length == 4 and bool((cache.layers[0].values[..., :4, :] == 2).all())
        team.close()
    finally:
        dist.destroy_process_group()
