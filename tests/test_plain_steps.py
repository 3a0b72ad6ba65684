"""Plain steps: on the fast path, a step whose verification tree would hold no candidate feeds only the last
committed token, as greedy decoding does; the output is still greedy decoding's (or the same keyed draws)."""
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import lp
from lp.batched_decoding import BatchedDecoder
from lp.distributed.team import SoloTeam
from lp.fast_decoding import FastDecoder
from lp.greedy_rules import hf_greedy
from models import FAMILIES, tiny_model
from test_exactness import repetitive_prompt
from test_fast_path import fresh_compiler, graphs, with_biting_rules

LOOKUP_ONLY = dict(lookup=1, lookup_len=4, budget=4)  # (1,2,0): no pool, one prompt-lookup candidate


def distinct_prompt(length: int, first: int = 3) -> list[int]:
    """A prompt with no token twice, so prompt lookup finds nothing in it."""
    return list(range(first, first + length))


def step_texts(prompt: list[int], result: lp.GenerationResult) -> list[list[int]]:
    """The committed text before each step of `result`."""
    texts, text, done = [], list(prompt), 0
    for count in result.accepted_per_step:
        texts.append(list(text))
        text += result.token_ids[done:done + count]
        done += count
    return texts


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("window,ngram,guess,tree", [(1, 2, 0, LOOKUP_ONLY), (4, 3, 4, {}), (7, 5, 7, dict(lookup=0)),
                                                     (3, 4, 2, dict(lookup=2, lookup_len=6, budget=5))])
def test_plain_steps_give_greedy_tokens(family, window, ngram, guess, tree):
    model = tiny_model(family, seed=4)
    prompt = repetitive_prompt(window * 5 + ngram, 30)
    decoder = FastDecoder(model, lp.LookaheadConfig(window, ngram, guess, plain_steps=True, **tree), compile=False)
    result = decoder.generate(prompt, 48)
    assert result.token_ids == hf_greedy(model, prompt, 48)
    assert set(result.tokens_fed_per_step) <= {1, decoder.step_tokens}


def lookup_only_run(plain: bool) -> tuple[FastDecoder, list[int], lp.GenerationResult]:
    """(1,2,0) with one prompt-lookup candidate on a prompt of distinct tokens, 60 new tokens: greedy's tokens."""
    model = tiny_model("llama", seed=7)
    prompt = distinct_prompt(12)
    decoder = FastDecoder(model, lp.LookaheadConfig(1, 2, 0, plain_steps=plain, **LOOKUP_ONLY), compile=False)
    result = decoder.generate(prompt, 60)
    assert result.token_ids == hf_greedy(model, prompt, 60)
    return decoder, prompt, result


def test_a_step_feeds_one_token_exactly_when_prompt_lookup_has_nothing_to_offer():
    _, prompt, result = lookup_only_run(plain=True)
    full = 1 + 1 + 4  # the pending token, the window's one token, the tree's budget
    # with no pool, the tree is empty exactly when the last committed token never occurred before it in the text;
    # the first step runs whole (nothing has been read back yet)
    expected = [full if i == 0 or text[-1] in text[:-1] else 1 for i, text in enumerate(step_texts(prompt, result))]
    assert result.tokens_fed_per_step == expected
    assert 1 in expected and full in expected  # this prompt and model exercise both shapes
    assert all(n == 1 for n, fed in zip(result.accepted_per_step, expected) if fed == 1)  # a plain step commits one


def test_plain_steps_off_feed_the_full_step_every_time():
    decoder, _, result = lookup_only_run(plain=False)
    assert set(result.tokens_fed_per_step) == {decoder.step_tokens}


def test_plain_steps_keep_the_generation_rules_and_stop_at_eos():
    model = tiny_model("phi", seed=4)
    prompt = distinct_prompt(9)
    expected = with_biting_rules(model, prompt, 80, eos_at=25, min_new=10)
    result = FastDecoder(model, lp.LookaheadConfig(1, 2, 0, plain_steps=True, **LOOKUP_ONLY),
                         compile=False).generate(prompt, 80)
    assert result.token_ids == expected and result.stop_reason == "eos"
    assert 1 in result.tokens_fed_per_step


def test_plain_steps_draw_the_same_samples_as_full_steps():
    model = tiny_model("llama", seed=8)
    prompt = distinct_prompt(10)
    draws = []
    for plain in (True, False):
        config = lp.LookaheadConfig(3, 3, 2, lookup=1, lookup_len=4, plain_steps=plain, sample=True, temperature=0.9)
        result = FastDecoder(model, config, compile=False).generate(prompt, 50, seed=11)
        draws.append((result.token_ids, 1 in result.tokens_fed_per_step))
    assert draws[0][0] == draws[1][0]  # draws are keyed by position, so the step shape cannot change them
    assert draws[0][1] and not draws[1][1]


def test_a_batch_runs_every_step_whole_and_says_so_when_plain_steps_were_asked_for(caplog):
    model = tiny_model("llama", seed=7)
    config = lp.LookaheadConfig(1, 2, 0, plain_steps=True, **LOOKUP_ONLY)
    with caplog.at_level(logging.WARNING, logger="lp"):
        BatchedDecoder(model, lp.LookaheadConfig(1, 2, 0, **LOOKUP_ONLY), batch_size=2, compile=False)
        assert caplog.records == []  # the CPU default is not a request
        decoder = BatchedDecoder(model, config, batch_size=2, compile=False)
    assert [r.getMessage() for r in caplog.records] == [
        "lp: plain_steps applies to one rank decoding one sequence a forward; a batch (its lanes share one forward) "
        "runs every step whole"]
    prompts = [distinct_prompt(12), distinct_prompt(7)]
    results = decoder.generate_many(prompts, 40)
    assert [r.token_ids for r in results] == [hf_greedy(model, p, 40) for p in prompts]
    assert {n for r in results for n in r.tokens_fed_per_step} == {decoder.step_tokens}  # the lanes share a forward


def test_a_team_runs_every_step_whole_and_says_so_when_plain_steps_were_asked_for(caplog):
    class FirstOfTwo(SoloTeam):  # rank 0 of a team of 2, built only (no step runs, so nothing is exchanged)
        size = 2
        kv_sync = "recompute"

    model = tiny_model("llama", seed=7)
    with caplog.at_level(logging.WARNING, logger="lp"):
        quiet = FastDecoder(model, lp.LookaheadConfig(1, 2, 0, **LOOKUP_ONLY), team=FirstOfTwo(), compile=False)
        assert caplog.records == []  # the CPU default is not a request
        asked = FastDecoder(model, lp.LookaheadConfig(1, 2, 0, plain_steps=True, **LOOKUP_ONLY), team=FirstOfTwo(),
                            compile=False)
    assert not quiet.shape.plain and not asked.shape.plain
    assert [r.getMessage() for r in caplog.records] == [
        "lp: plain_steps applies to one rank decoding one sequence a forward; a team of 2 ranks runs every step whole"]


def test_plain_steps_default_on_cpus_and_wherever_the_pool_is_off():
    assert lp.LookaheadConfig().plain_steps_on("cpu")
    assert not lp.LookaheadConfig().plain_steps_on("cuda")
    assert lp.LookaheadConfig(1, 2, 0).plain_steps_on("cuda")  # G = 0: the window feeds no pool, nothing waits
    assert not lp.LookaheadConfig(plain_steps=False).plain_steps_on("cpu")
    assert lp.LookaheadConfig(plain_steps=True).plain_steps_on("cuda")


def test_plain_steps_are_validated_and_the_reference_engine_refuses_them():
    with pytest.raises(lp.ConfigError, match="plain_steps must be true or false"):
        lp.LookaheadConfig(plain_steps=1)
    model = tiny_model("llama", seed=1)
    with pytest.raises(lp.ConfigError, match="turn compile on"):
        lp.Decoder(model, lp.LookaheadConfig(plain_steps=True))
    assert type(lp.Decoder(model, lp.LookaheadConfig(plain_steps=False))) is lp.Decoder  # nothing to refuse


@pytest.mark.slow
def test_compiled_plain_steps_compile_one_more_graph_once_and_read_the_device_once_a_step():
    fresh_compiler()
    model = tiny_model("llama", seed=7)
    decoder = FastDecoder(model, lp.LookaheadConfig(1, 2, 0, plain_steps=True, **LOOKUP_ONLY), compile=True)
    warm = decoder.generate(distinct_prompt(12), 60)  # warm-up: compiles the full step and the plain step
    assert warm.token_ids == hf_greedy(model, distinct_prompt(12), 60) and 1 in warm.tokens_fed_per_step
    assert graphs() == 2 and decoder.compile_error is None
    assert warm.compile_time_s == pytest.approx(decoder.compile_time_s)  # both graphs charged, none in its wall time
    frames = counters["stats"]["calls_captured"]
    prompt = distinct_prompt(12, first=30)  # another prompt of the same bucket, whose run has plain steps too
    reads = decoder.host_reads
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = decoder.generate(prompt, 80)
    assert result.token_ids == hf_greedy(model, prompt, 80)
    assert {1, decoder.step_tokens} == set(result.tokens_fed_per_step)
    assert graphs() == 2 and counters["stats"]["calls_captured"] == frames  # no recompile, no retrace
    assert decoder.host_reads - reads == result.steps and result.compile_time_s == 0
    scalar_reads = [e for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")]
    assert sum(e.count for e in scalar_reads) == 0
