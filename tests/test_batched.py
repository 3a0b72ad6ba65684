"""Batched lookahead: one forward decodes B sequences, each with its own window, pool, cache length, positions and
mask rows; a finished sequence's row takes the next prompt. Every sequence equals its own greedy output, whatever
the batch size, the prompt lengths, where each one stops, or the team around it."""
import pytest
import torch

import lp
from lp.batched_decoding import BatchedDecoder
from lp.distributed.partition import split_step
from lp.fast_step import FastShape
from lp.greedy_rules import greedy_rules, hf_greedy
from lp.sampling import reference_sample, sampling_settings
from lp.step_layout import tokens_fed
from models import FAMILIES, tiny_model
from test_exactness import repetitive_prompt
from test_parallel import run_team

LENGTHS = (3, 17, 40, 9, 60, 1, 25, 5, 33)  # nine prompts: every batch size below leaves a partial last round


def prompts(count: int = len(LENGTHS)) -> list[list[int]]:
    return [repetitive_prompt(i, n) for i, n in enumerate(LENGTHS[:count])]


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_sequence_equals_its_own_greedy_output_at_every_batch_size(batch):
    model = tiny_model("llama", seed=2)
    expected = [hf_greedy(model, p, 30) for p in prompts()]
    decoder = BatchedDecoder(model, lp.LookaheadConfig(5, 4, 5), batch_size=batch, compile=False)
    results = decoder.generate_many(prompts(), 30)
    assert [r.token_ids for r in results] == expected
    assert all(r.stop_reason == "max_new_tokens" and r.prompt_tokens == n for r, n in zip(results, LENGTHS))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_batched_with_the_token_tree(family):
    model = tiny_model(family, seed=3)
    expected = [hf_greedy(model, p, 24) for p in prompts(5)]
    config = lp.LookaheadConfig(4, 3, 4, lookup=2, lookup_len=6)
    results = BatchedDecoder(model, config, batch_size=3, compile=False).generate_many(prompts(5), 24)
    assert [r.token_ids for r in results] == expected


def test_sequences_stop_at_eos_at_different_steps_and_their_rows_take_the_next_prompts():
    model = tiny_model("qwen2", seed=5)
    free = [hf_greedy(model, p, 40) for p in prompts()]
    # an EOS id that greedy emits in several outputs, at different positions
    counts = torch.bincount(torch.tensor([t for out in free for t in set(out[5:])]))
    eos = int(counts.argmax())
    model.generation_config.eos_token_id = eos
    expected = [hf_greedy(model, p, 40) for p in prompts()]
    stops = {len(e) for e in expected if e[-1] == eos}
    assert len(stops) >= 2  # the setting is what this test is about: EOS at two or more different steps
    results = BatchedDecoder(model, lp.LookaheadConfig(5, 4, 5), batch_size=4, compile=False).generate_many(
        prompts(), 40)
    assert [r.token_ids for r in results] == expected
    assert [r.stop_reason for r in results] == ["eos" if e[-1] == eos else "max_new_tokens" for e in expected]


def test_per_prompt_budgets_and_results_reported_as_each_sequence_finishes():
    model = tiny_model("gpt2", seed=1)
    budgets = [5, 30, 1, 12, 2, 20]
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts(6), budgets)]
    finished = []
    results = BatchedDecoder(model, lp.LookaheadConfig(3, 3, 3), batch_size=2, compile=False).generate_many(
        prompts(6), budgets, on_result=lambda i, r: finished.append((i, r.token_ids)))
    assert [r.token_ids for r in results] == expected
    assert sorted(finished) == list(enumerate(expected)) and [i for i, _ in finished][:2] == [0, 2]  # short first


def test_sampling_per_prompt_seeds_equals_the_one_token_sampler():
    model = tiny_model("llama", seed=4)
    config = lp.LookaheadConfig(4, 3, 4, sample=True, temperature=0.9, top_k=20)
    settings = sampling_settings(model.generation_config, config)
    seeds = [11, 12, 13, 14, 15]
    expected = [reference_sample(model, p, 24, settings, s, greedy_rules(model.generation_config, len(p), 24))
                for p, s in zip(prompts(5), seeds)]
    results = BatchedDecoder(model, config, batch_size=3, compile=False).generate_many(prompts(5), 24, seeds)
    assert [r.token_ids for r in results] == expected


def test_bad_inputs_name_what_to_change():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 256\], got 0"):
        BatchedDecoder(model, lp.LookaheadConfig(3, 3, 3), batch_size=0, compile=False)
    decoder = BatchedDecoder(model, lp.LookaheadConfig(3, 3, 3), batch_size=2, compile=False)
    with pytest.raises(lp.PromptError, match="the prompt is empty"):
        decoder.generate_many([[5, 6], []], 4)
    with pytest.raises(ValueError, match="3 prompts need 3 max_new_tokens"):
        decoder.generate_many(prompts(3), [4, 4])
    assert decoder.generate_many([], 4) == []


@pytest.mark.slow
def test_compiled_batch_step_equals_greedy_and_reads_the_device_once_a_step():
    model = tiny_model("llama", seed=2)
    expected = [hf_greedy(model, p, 30) for p in prompts(5)]
    decoder = BatchedDecoder(model, lp.LookaheadConfig(5, 4, 5), batch_size=2, compile=True)
    results = decoder.generate_many(prompts(5), 30)
    assert decoder.compile_error is None and [r.token_ids for r in results] == expected
    assert sum(r.compile_time_s for r in results) == pytest.approx(decoder.compile_time_s)  # counted once
    reads = decoder.host_reads
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        results = decoder.generate_many(prompts(5), 30)  # compiled already: no compile time, same tokens
    assert [r.token_ids for r in results] == expected and all(r.compile_time_s == 0 for r in results)
    steps = sum(r.steps for r in results)  # each batch step advances one or two of them
    assert (steps + 1) // 2 <= decoder.host_reads - reads <= steps  # one device-to-host copy per batch step...
    scalar_reads = [e for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")]
    assert sum(e.count for e in scalar_reads) == 0  # ...and no .item()/int()/bool() of a device value


@pytest.mark.slow
@pytest.mark.parametrize("kv_sync", ["recompute", "gather"])
def test_a_team_of_two_decodes_a_batch_exactly(kv_sync, tmp_path):
    expected = [hf_greedy(tiny_model("llama", seed=6), p, 30) for p in prompts(5)]
    case = dict(model="llama", seed=6, prompts=prompts(5), wng=(6, 4, 6), max_new=30, kv_sync=kv_sync, batch=3,
                fast="eager")
    outs, codes = run_team(2, {"cases": [case]}, tmp_path)
    assert codes == [0, 0], [(tmp_path / f"err{r}.txt").read_text()[-1500:] for r in range(2)]
    assert [o[0]["batch_tokens"] for o in outs] == [expected, expected]
    # gather: one all-reduce of every lane's KV entries per batch step (one exchange of rows per step)
    assert [o[0]["kv_sums"] for o in outs] == [o[0]["exchanges"] if kv_sync == "gather" else 0 for o in outs]
    # each record is charged the exchanges of the steps it took part in: a fixed number of bytes a step
    for o in outs:
        assert all(seconds > 0 for seconds, _, _ in o[0]["comm"])
        assert len({sent / steps for _, sent, steps in o[0]["comm"]}) == 1 and o[0]["comm"][0][1] > 0


@pytest.mark.slow
def test_an_idle_lane_restarts_at_the_same_step_on_ranks_that_feed_different_token_counts(tmp_path):
    # (3,3,3) budget 3 over 2 ranks: rank 0 feeds 7 tokens a step, rank 1 feeds 4. The short prompt's lane idles,
    # decoding junk while the long one runs, and restarts when its cache is nearly full. Ranks that sized their
    # caches by their own step restarted it at different steps and stopped the job with a DivergenceError.
    model, long, short = tiny_model("llama", seed=0), [5, 6, 7, 8, 9, 10, 11, 12], [7, 7, 7]
    expected = [hf_greedy(model, long, 220), hf_greedy(model, short, 1)]
    case = dict(model="llama", seed=0, prompts=[long, short], wng=(3, 3, 3), tree=dict(budget=3), max_new=[220, 1],
                kv_sync="gather", batch=2, fast="eager")
    outs, codes = run_team(2, {"cases": [case]}, tmp_path)
    assert codes == [0, 0], [(tmp_path / f"err{r}.txt").read_text()[-1500:] for r in range(2)]
    assert [o[0]["batch_tokens"] for o in outs] == [expected, expected]


def test_every_rank_sizes_its_cache_by_the_widest_step_of_the_team():
    config = lp.LookaheadConfig(3, 3, 3, budget=3)
    slices = tuple(split_step(3, 2, 3, 1, [1, 1]))
    shapes = [FastShape(3, 3, 3, config.lookup_count, config.lookup_len, config.tree_depth, 1, slices, r, "gather",
                        config.chain_count, config.chain_room) for r in range(2)]
    assert [tokens_fed(s.step_shape) for s in shapes] == [7, 4]  # pending + the window's share (+ prefix) + tree
    assert [s.widest_step for s in shapes] == [7, 7]


def test_lp_generate_takes_a_list_of_prompts_and_returns_a_result_each():
    model = tiny_model("llama", seed=2)
    expected = [hf_greedy(model, p, 12) for p in prompts(4)]
    results = lp.generate(model, prompts(4), lp.LookaheadConfig(4, 3, 4), 12, batch_size=3)
    assert [r.token_ids for r in results] == expected
    assert [r.token_ids for r in lp.generate(model, [torch.tensor(p) for p in prompts(2)], max_new_tokens=12)] == \
        expected[:2]
    with pytest.raises(ValueError, match="batch_size applies to a list of prompts"):
        lp.generate(model, prompts(1)[0], max_new_tokens=4, batch_size=2)
