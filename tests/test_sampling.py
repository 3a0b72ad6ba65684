"""Sampling is exact: lookahead's sampled tokens equal a one-token-at-a-time sampler's with the same seed (every
position draws from a hash of (seed, position)), the draws follow the processed distribution, and transformers'
own sampler agrees with it."""
import pytest
import torch

import lp
from lp.fast_decoding import FastDecoder
from lp.greedy_rules import greedy_rules, hf_greedy
from lp.sampling import Sampling, reference_sample, sample, sampling_settings, uniforms
from models import FAMILIES, tiny_model
from test_exactness import repetitive_prompt

SETTINGS = [dict(temperature=0.3), dict(temperature=1.0), dict(temperature=1.5),
            dict(temperature=0.8, top_k=10), dict(temperature=1.2, top_p=0.8), dict(temperature=0.7, top_k=20,
                                                                                      top_p=0.9, min_p=0.05)]


def reference(model, prompt, max_new, config):
    settings = sampling_settings(model.generation_config, config)
    rules = greedy_rules(model.generation_config, len(prompt), max_new)
    return reference_sample(model, prompt, max_new, settings, config.seed, rules)


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test, categories with an expected count under 5 pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2.0, dtype=torch.float64), stat / 2))


# -- the draws ------------------------------------------------------------------------------------------------

def test_each_position_draws_a_fixed_number_that_depends_on_seed_and_position():
    positions = torch.arange(100_000)
    u = uniforms(torch.tensor(0), positions)
    assert torch.equal(u, uniforms(torch.tensor(0), positions))  # a function, not a stream
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert not torch.equal(u[:1000], uniforms(torch.tensor(1), positions[:1000]))
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert chi_square_p(counts, torch.full((20,), 5000.0)) > 0.001


def test_the_first_token_follows_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5]])
    settings = Sampling(temperature=0.8, top_k=6, top_p=0.95)
    # expected: softmax at temperature 0.8 over the 6 likeliest, then the smallest set holding 95% of the mass
    probs = (logits[0] / 0.8).softmax(-1)
    keep = probs.argsort(descending=True)[:6]
    p6 = torch.zeros(8).index_copy(0, keep, probs[keep] / probs[keep].sum())
    order = p6.argsort()
    drop = p6[order].cumsum(0) <= 0.05
    final = p6.clone()
    final[order[drop]] = 0
    final /= final.sum()
    draws = 6000
    tokens = torch.stack([sample(logits, torch.tensor([3]), torch.tensor(s), settings) for s in range(draws)])
    counts = torch.bincount(tokens.flatten(), minlength=8).double()
    assert counts[final == 0].sum() == 0  # filtered tokens are never drawn
    assert chi_square_p(counts[final > 0], draws * final[final > 0]) > 0.001


@pytest.mark.slow
def test_transformers_sampler_draws_from_the_same_distribution():
    model = tiny_model("llama", seed=3)
    prompt = torch.tensor([repetitive_prompt(3, 12)])
    settings = dict(temperature=1.3, top_k=30, top_p=0.95)
    draws = 1500
    ours = torch.stack([sample(model(prompt).logits[0, -1:], torch.tensor([12]), torch.tensor(s),
                               Sampling(**settings)) for s in range(draws)]).flatten()
    theirs = []
    for s in range(draws):
        torch.manual_seed(s)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=1,
                             **settings)
        theirs.append(int(out[0, -1]))
    a = torch.bincount(ours, minlength=97).double()
    b = torch.bincount(torch.tensor(theirs), minlength=97).double()
    both = (a + b) > 0
    # two samples from one distribution: chi-square of a against the pooled estimate
    pooled = (a + b)[both] / (2 * draws)
    assert chi_square_p(a[both], draws * pooled) > 0.001


# -- lookahead sampling equals the plain sampler ---------------------------------------------------------------

@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("window,ngram,guess", [(1, 2, 1), (4, 3, 4), (7, 5, 7)])
def test_lookahead_sampling_equals_the_plain_sampler(settings, window, ngram, guess):
    model = tiny_model("llama", seed=5)
    prompt = repetitive_prompt(window + 13 * ngram, 30)
    config = lp.LookaheadConfig(window, ngram, guess, sample=True, seed=11, **settings)
    expected = reference(model, prompt, 40, config)
    assert lp.generate(model, prompt, config, 40).token_ids == expected
    assert FastDecoder(model, config, compile=False).generate(prompt, 40).token_ids == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_samples_exactly(family):
    model = tiny_model(family, seed=1)
    prompt = repetitive_prompt(8, 24)
    config = lp.LookaheadConfig(5, 4, 5, sample=True, temperature=0.9, seed=2)
    assert lp.generate(model, prompt, config, 32).token_ids == reference(model, prompt, 32, config)


def test_the_seed_keys_the_draws():
    model = tiny_model("llama", seed=5)
    prompt = repetitive_prompt(1, 20)
    runs = [lp.generate(model, prompt, lp.LookaheadConfig(4, 3, 4, sample=True, temperature=1.5, seed=s), 30)
            for s in (0, 0, 1)]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


def test_temperature_zero_or_sample_off_is_greedy():
    model = tiny_model("llama", seed=5)
    prompt = repetitive_prompt(2, 20)
    greedy = hf_greedy(model, prompt, 30)
    for config in (lp.LookaheadConfig(4, 3, 4, sample=True, temperature=0),
                   lp.LookaheadConfig(4, 3, 4, sample=False, temperature=0.9),
                   lp.LookaheadConfig(4, 3, 4, sample=True, temperature=1e-6)):
        assert lp.generate(model, prompt, config, 30).token_ids == greedy


def test_the_models_generation_config_turns_sampling_on_as_generate_does():
    model = tiny_model("llama", seed=5)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    model.generation_config.top_p = 0.9
    prompt = repetitive_prompt(4, 20)
    config = lp.LookaheadConfig(4, 3, 4, seed=3)
    assert sampling_settings(model.generation_config, config) == Sampling(0.6, 0, 0.9, 0.0)
    assert lp.generate(model, prompt, config, 30).token_ids == reference(model, prompt, 30, config)
    off = lp.LookaheadConfig(4, 3, 4, sample=False)
    assert lp.generate(model, prompt, off, 30).token_ids == _greedy(model, prompt, 30)


def _greedy(model, prompt, n):
    """transformers' greedy output of a model whose generation_config samples."""
    do_sample = model.generation_config.do_sample
    model.generation_config.do_sample = False
    try:
        return hf_greedy(model, prompt, n)
    finally:
        model.generation_config.do_sample = do_sample


def test_sampling_settings_it_cannot_reproduce_are_refused_by_name():
    model = tiny_model("llama", seed=5)
    model.generation_config.do_sample, model.generation_config.typical_p = True, 0.9
    with pytest.raises(lp.UnsupportedGenerationSetting, match="typical_p"):
        lp.generate(model, [5, 6, 7], lp.LookaheadConfig(4, 3, 4), 5)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0),
                                         ("top_k", -1), ("sample", "yes")])
def test_bad_sampling_values_are_one_line_errors(field, value):
    with pytest.raises(lp.ConfigError, match=field):
        lp.LookaheadConfig(**{field: value})


@pytest.mark.slow
def test_compiled_sampling_equals_the_plain_sampler():
    model = tiny_model("llama", seed=6)
    prompt = repetitive_prompt(6, 40)
    config = lp.LookaheadConfig(4, 3, 4, sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    result = FastDecoder(model, config, compile=True).generate(prompt, 48)
    assert result.compiled and result.token_ids == reference(model, prompt, 48, config)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_of_a_team_samples_exactly_with_both_kv_strategies(ranks, tmp_path):
    from test_parallel import run_team
    cases, expected = [], []
    settings = dict(sample=True, temperature=0.9, top_k=30, seed=5)
    for i, family in enumerate(("llama", "gpt2")):
        prompt = repetitive_prompt(500 + i, 24)
        model = tiny_model(family, seed=i)
        want = reference(model, prompt, 40, lp.LookaheadConfig(5, 4, 5, **settings))
        for kv_sync in ("recompute", "gather"):
            for fast in (None, "eager"):
                cases.append(dict(model=family, seed=i, prompt=prompt, wng=(5, 4, 5), tree=settings, max_new=40,
                                  kv_sync=kv_sync, fast=fast))
                expected.append(want)
    outs, codes = run_team(ranks, {"cases": cases}, tmp_path)
    assert codes == [0] * ranks
    for rank_results in outs:
        assert [r["tokens"] for r in rank_results] == expected
