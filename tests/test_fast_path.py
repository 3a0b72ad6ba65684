"""The fast path (static cache, one step shape, device-resident state, compiled step) equals greedy decoding,
compiles once per configuration and capacity bucket, and reads the device once per step."""
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import lp
from lp.fast_decoding import FastDecoder, capacity_bucket
from lp.greedy_rules import hf_greedy
from models import FAMILIES, STORIES, VOCAB, stories, tiny_model
from test_exactness import GRID, repetitive_prompt


def fresh_compiler():
    torch._dynamo.reset()
    counters.clear()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# -- the same tokens as greedy: the step's logic (uncompiled) on every family and config ---------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("window,ngram,guess", GRID)
def test_fixed_shape_step_matches_greedy_on_every_family_and_config(family, window, ngram, guess):
    model = tiny_model(family, seed=2)
    prompt = repetitive_prompt(window * 13 + guess, 24)
    config = lp.LookaheadConfig(window, ngram, guess)
    result = FastDecoder(model, config, compile=False).generate(prompt, 40)
    assert result.token_ids == hf_greedy(model, prompt, 40)
    assert max(result.accepted_per_step) <= config.tree_depth + 1 and sum(result.accepted_per_step) == 40


@pytest.mark.parametrize("prompt_len,max_new", [(1, 30), (2, 1), (3, 2), (150, 60), (400, 5)])
def test_prompt_lengths_and_budgets(prompt_len, max_new):
    model = tiny_model("llama", seed=1)
    prompt = repetitive_prompt(prompt_len, prompt_len)
    result = FastDecoder(model, lp.LookaheadConfig(6, 4, 6), compile=False).generate(prompt, max_new)
    assert result.token_ids == hf_greedy(model, prompt, max_new)


def test_the_context_limit_stops_decoding_exactly():
    model = tiny_model("gpt2", seed=2, n_positions=64)  # learned positions: an overflow would crash
    prompt = repetitive_prompt(9, 50)
    result = FastDecoder(model, lp.LookaheadConfig(15, 5, 15), compile=False).generate(prompt, 40)
    assert result.token_ids == hf_greedy(model, prompt, 14)
    assert result.stop_reason == "context"


def test_one_step_shape_feeds_the_same_number_of_tokens_every_step():
    model = tiny_model("llama", seed=3)
    config = lp.LookaheadConfig(15, 5, 15, plain_steps=False)  # plain steps (tests/test_plain_steps.py) feed one
    result = FastDecoder(model, config, compile=False).generate(repetitive_prompt(1, 30), 60)
    # 1 pending + level 0 (15) + 3 levels x 15 columns + a tree of half of 15 candidates x 4 tokens (on a CPU)
    assert set(result.tokens_fed_per_step) == {1 + 15 + 3 * 15 + 15 * 4 // 2}


# -- compiled (inductor on CPU) ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_step_matches_greedy_on_every_family(family):
    fresh_compiler()
    model = tiny_model(family, seed=4)
    prompt = repetitive_prompt(17, 30)
    decoder = FastDecoder(model, lp.LookaheadConfig(5, 4, 5), compile=True)
    result = decoder.generate(prompt, 48)
    assert decoder.compile_error is None
    assert result.token_ids == hf_greedy(model, prompt, 48)


@pytest.mark.slow
@pytest.mark.parametrize("window,ngram,guess", [(1, 2, 0), (15, 5, 15), (3, 6, 40)])
def test_compiled_step_matches_greedy_across_configs(window, ngram, guess):
    fresh_compiler()
    model = tiny_model("qwen2", seed=5)
    prompt = repetitive_prompt(window + ngram, 40)
    decoder = FastDecoder(model, lp.LookaheadConfig(window, ngram, guess), compile=True)
    assert decoder.generate(prompt, 64).token_ids == hf_greedy(model, prompt, 64)
    assert decoder.compile_error is None


def with_biting_rules(model, prompt: list[int], new: int, eos_at: int, min_new: int) -> list[int]:
    """Give `model` generation rules that change its greedy output on `prompt` (suppressed and begin-suppressed
    tokens, min_new_tokens, EOS at its free run's token `eos_at`); returns greedy's output under them."""
    free_run = hf_greedy(model, prompt, new)
    gc = model.generation_config
    gc.suppress_tokens = [free_run[0]]
    gc.begin_suppress_tokens = [free_run[1]]
    gc.eos_token_id = [free_run[eos_at], VOCAB + 5]
    gc.min_new_tokens = min_new
    expected = hf_greedy(model, prompt, new)
    assert free_run[0] not in expected and len(expected) < new  # the rules bite and EOS ends the run
    return expected


@pytest.mark.slow
def test_compiled_step_obeys_eos_inside_a_step_and_the_generation_rules():
    fresh_compiler()
    model = tiny_model("phi", seed=4)
    prompt = repetitive_prompt(11, 20)
    expected = with_biting_rules(model, prompt, 100, eos_at=30, min_new=12)
    decoder = FastDecoder(model, lp.LookaheadConfig(8, 5, 8), compile=True)
    result = decoder.generate(prompt, 100)
    assert result.token_ids == expected and result.stop_reason == "eos"
    assert decoder.compile_error is None


@pytest.mark.slow
def test_after_warm_up_a_256_token_generation_compiles_nothing_and_reads_the_device_once_a_step():
    fresh_compiler()
    model = tiny_model("llama", seed=6)
    decoder = FastDecoder(model, lp.LookaheadConfig(15, 5, 15, plain_steps=False), compile=True)
    decoder.generate(repetitive_prompt(1, 30), 256)  # warm-up: compiles the step of this capacity bucket
    assert graphs() == 1
    frames = counters["stats"]["calls_captured"]
    prompt = repetitive_prompt(2, 30)
    reads = decoder.host_reads
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = decoder.generate(prompt, 256)
    assert result.token_ids == hf_greedy(model, prompt, 256)
    assert graphs() == 1 and counters["stats"]["calls_captured"] == frames  # no recompile, no retrace
    assert decoder.host_reads - reads == result.steps  # one device-to-host copy per step...
    scalar_reads = [e for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")]
    assert sum(e.count for e in scalar_reads) == 0  # ...and no .item()/int()/bool() of a device value anywhere


@pytest.mark.slow
def test_a_one_token_prompt_compiles_one_graph_too():
    fresh_compiler()
    model = tiny_model("llama", seed=1)
    decoder = FastDecoder(model, lp.LookaheadConfig(4, 3, 4, plain_steps=False), compile=True)
    for token in (7, 9):  # the first generation of a fresh bucket has no prefill to allocate the cache
        assert decoder.generate([token], 20).token_ids == hf_greedy(model, [token], 20)
    assert graphs() == 1


@pytest.mark.slow
def test_a_batch_of_prompt_lengths_compiles_once_per_capacity_bucket():
    fresh_compiler()
    model = tiny_model("llama", seed=7)
    decoder = FastDecoder(model, lp.LookaheadConfig(4, 3, 4), compile=True)  # plain steps on: two graphs a bucket
    lengths = [3, 40, 90, 17, 250, 5, 120]
    for n in lengths:
        prompt = repetitive_prompt(n, n)
        assert decoder.generate(prompt, 24).token_ids == hf_greedy(model, prompt, 24)
    buckets = {capacity for capacity in decoder._steps}
    assert buckets == {256, 512}  # prompt + 24 new tokens + one step fit 256 entries, except the 250-token one
    assert graphs() == 2 * len(buckets)  # the full step and the plain one, compiled before the first step


def test_the_cache_is_allocated_once_and_never_reallocated():
    model = tiny_model("llama", seed=8)
    decoder = FastDecoder(model, lp.LookaheadConfig(6, 4, 6), compile=False)
    decoder.generate(repetitive_prompt(1, 30), 5)
    step = next(iter(decoder._steps.values()))
    before = [t.data_ptr() for t in step.cache.buffers()]
    seen = []
    for _ in decoder.stream(repetitive_prompt(2, 50), 150):
        assert not torch.is_inference_mode_enabled()  # the caller's code between steps runs as usual
        seen.append([t.data_ptr() for t in step.cache.buffers()])
    assert len(seen) > 10 and all(ptrs == before for ptrs in seen)
    assert step.cache.capacity == capacity_bucket(50 + 150 + decoder.step_tokens) == 256


def test_capacity_buckets_are_powers_of_two():
    assert [capacity_bucket(n) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 8192]


@pytest.mark.slow
def test_a_model_that_cannot_compile_falls_back_to_eager_with_one_log_line(caplog):
    fresh_compiler()
    model = tiny_model("llama", seed=9)
    forward = model.forward

    def breaking_forward(*args, **kwargs):
        torch._dynamo.graph_break()  # fullgraph=True refuses this
        return forward(*args, **kwargs)

    model.forward = breaking_forward
    decoder = FastDecoder(model, lp.LookaheadConfig(5, 4, 5), compile=True)
    prompt = repetitive_prompt(3, 20)
    with caplog.at_level(logging.WARNING, logger="lp"):
        result = decoder.generate(prompt, 30)
    model.forward = forward
    assert result.token_ids == hf_greedy(model, prompt, 30)
    assert decoder.compile_error and len([r for r in caplog.records if "torch.compile failed" in r.message]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.exists(), reason="tests/assets/stories260k is absent")
def test_stories260k_compiled_matches_greedy_in_float32():
    fresh_compiler()
    model, tokenizer = stories()
    model = model.float()
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    decoder = FastDecoder(model, lp.LookaheadConfig(7, 5, 7), compile=True)
    result = decoder.generate(ids, 256)
    assert result.token_ids == hf_greedy(model, ids[0].tolist(), 256)
    assert result.tokens_per_step > 1.3


# -- lookahead parallelism on the fast path (gloo process groups) --------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_of_a_fast_path_team_matches_greedy_with_both_kv_strategies(ranks, tmp_path):
    from test_parallel import run_team
    cases, expected = [], []
    for i, (family, wng) in enumerate([("llama", (15, 5, 15)), ("gpt2", (4, 3, 4)), ("qwen2", (1, 2, 1))]):
        prompt = repetitive_prompt(200 + i, 24)
        reference = hf_greedy(tiny_model(family, seed=i), prompt, 40)
        for kv_sync in ("recompute", "gather"):
            cases.append(dict(model=family, seed=i, prompt=prompt, wng=wng, max_new=40, kv_sync=kv_sync, fast="eager"))
            expected.append(reference)
    outs, codes = run_team(ranks, {"cases": cases}, tmp_path)
    assert codes == [0] * ranks
    for rank_results in outs:
        assert [r["tokens"] for r in rank_results] == expected
    for c, case in enumerate(cases):
        assert len({len(o[c]["fed"]) for o in outs}) == 1  # every rank took part in every step
        if case["wng"][0] >= 4:  # and the work was split
            fed = [o[c]["fed"][0] for o in outs]
            assert max(fed) <= 0.75 * sum(fed)


@pytest.mark.slow
def test_a_compiled_fast_path_team_matches_greedy(tmp_path):
    from test_parallel import run_team
    prompt = repetitive_prompt(300, 30)
    expected = hf_greedy(tiny_model("llama", seed=5), prompt, 64)
    cases = [dict(model="llama", seed=5, prompt=prompt, wng=(7, 5, 7), max_new=64, kv_sync=kv, fast="compiled")
             for kv in ("gather", "recompute")]
    outs, codes = run_team(2, {"cases": cases}, tmp_path, timeout=400)
    assert codes == [0, 0]
    assert all(r["compile_error"] is None for o in outs for r in o)  # compiled, not fallen back to eager
    assert all(r["tokens"] == expected for o in outs for r in o)


@pytest.mark.slow
def test_fast_path_ranks_that_drift_apart_raise(tmp_path):
    from test_parallel import run_team
    cases = [dict(model="llama", seed=2, prompt=repetitive_prompt(9, 20), wng=(5, 4, 5), max_new=40,
                  kv_sync="gather", fast="eager", window_seed_per_rank=[0, 1])]
    outs, codes = run_team(2, {"cases": cases}, tmp_path)
    assert codes == [0, 0]
    assert all("DivergenceError" in o[0]["failure"] for o in outs)


# -- the switch: LookaheadConfig.compile, lp.Decoder and the command line --------------------------------------

def test_compile_is_on_by_default_on_cuda_only_and_as_asked_everywhere():
    assert lp.LookaheadConfig().compiled_on("cuda") and not lp.LookaheadConfig().compiled_on("cpu")
    assert not lp.LookaheadConfig(compile=False).compiled_on("cuda")
    assert lp.LookaheadConfig(compile=True).compiled_on("cpu")
    with pytest.raises(lp.ConfigError, match="compile must be true or false"):
        lp.LookaheadConfig(compile="yes")


def test_decoder_takes_the_fast_path_when_compile_is_on():
    model = tiny_model("llama", seed=1)
    assert type(lp.Decoder(model, lp.LookaheadConfig(compile=True))) is FastDecoder
    assert type(lp.Decoder(model, lp.LookaheadConfig())) is lp.Decoder  # CPU: the eager reference by default


@pytest.mark.slow
def test_the_command_line_compiles_on_request_and_reports_it(tmp_path, capsys):
    from lp.cli import main
    from test_cli import base_args, json_lines, save_tiny_model
    fresh_compiler()
    model_dir = str(save_tiny_model(tmp_path / "m"))
    capsys.readouterr()  # what saving the model printed
    assert main(base_args(model_dir, "--prompt", "hello hello hello", "--compile", "--compare-greedy", "--json")) == 0
    record = json_lines(capsys.readouterr().out)[0]
    assert record["compiled"] is True and record["compile_time_s"] > 0 and record["greedy_match"] is True


@pytest.mark.slow
def test_lookahead_by_tensor_parallel_replicas_on_the_fast_path(tmp_path):
    import importlib.util
    from test_parallel import run_team
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'lp[deepspeed]'): LP x TP is untested here")
    prompt = repetitive_prompt(300, 24)
    expected = hf_greedy(tiny_model("llama", seed=0), prompt, 40)
    cases = [dict(model="llama", seed=0, prompt=prompt, wng=(7, 4, 7), max_new=40, kv_sync=kv, fast=fast)
             for fast in ("eager", "compiled") for kv in ("gather", "recompute")]
    outs, codes = run_team(4, {"tp": 2, "cases": cases}, tmp_path, timeout=600, LOCAL_SIZE="4")
    assert codes == [0] * 4
    assert all(r["tokens"] == expected for o in outs for r in o)
