"""The fast path's verification tree (prompt lookup + pool, merged into a trie, a fixed budget of fed tokens)
never changes the output: greedy decoding's tokens on every family, budget, rank count and KV strategy."""
import pytest

import lp
from lp.distributed.partition import deal_rows, split_step
from lp.fast_decoding import FastDecoder
from lp.fast_step import FastShape
from lp.step_layout import tokens_fed
from lp.greedy_rules import hf_greedy
from models import FAMILIES, tiny_model
from test_exactness import repetitive_prompt

TREES = [dict(lookup=0), dict(lookup=2, lookup_len=10), dict(lookup=1, lookup_len=3, budget=2),
         dict(lookup=4, lookup_len=6, budget=9), dict(lookup=3, lookup_len=12, budget=80), dict(budget=0),
         dict(lookup=2, lookup_len=10, chain=0), dict(lookup=1, lookup_len=8, chain=3, budget=40),
         dict(lookup=2, lookup_len=5, chain=1, budget=12)]


def greedy_check(family: str, window: int, ngram: int, guess: int, tree: dict) -> lp.GenerationResult:
    model = tiny_model(family, seed=4)
    prompt = repetitive_prompt(window * 7 + ngram, 40)
    config = lp.LookaheadConfig(window, ngram, guess, **tree)
    result = FastDecoder(model, config, compile=False).generate(prompt, 48)
    assert result.token_ids == hf_greedy(model, prompt, 48)
    assert max(result.accepted_per_step) <= config.tree_depth + 1
    return result


@pytest.mark.parametrize("tree", TREES, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
@pytest.mark.parametrize("window,ngram,guess", [(1, 2, 0), (4, 3, 4), (7, 5, 7)])
def test_every_tree_gives_greedy_tokens(tree, window, ngram, guess):
    greedy_check("llama", window, ngram, guess, tree)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_greedy_tokens_with_the_default_tree(family):
    greedy_check(family, 4, 3, 4, {})


def test_a_step_feeds_the_window_and_exactly_the_budget():
    model = tiny_model("llama", seed=3)
    config = lp.LookaheadConfig(5, 4, 5, lookup=2, lookup_len=10, budget=17, plain_steps=False)
    result = FastDecoder(model, config, compile=False).generate(repetitive_prompt(3, 30), 40)
    assert set(result.tokens_fed_per_step) == {1 + 5 + 2 * 5 + 17}  # pending + level 0 + 2 levels + the tree


def test_a_budget_without_a_candidate_source_feeds_no_tree():
    config = lp.LookaheadConfig(5, 4, 0, lookup=0, budget=17, plain_steps=False)
    assert config.tree_budget("cpu") == config.tree_budget("cuda") == 0
    model, prompt = tiny_model("llama", seed=3), repetitive_prompt(3, 30)
    result = FastDecoder(model, config, compile=False).generate(prompt, 40)  # used to fail: torch.cat of no sources
    assert result.token_ids == hf_greedy(model, prompt, 40)
    assert set(result.tokens_fed_per_step) == {1 + 5 + 2 * 5}  # pending + level 0 + 2 levels, no tree


def test_candidate_rows_go_to_the_ranks_with_tree_slots_in_proportion_best_first():
    assert deal_rows((5, 5), 4) == ((0, 2), (1, 3))  # equal shares: round-robin from rank 0
    assert deal_rows((0, 0, 14), 5) == ((), (), (0, 1, 2, 3, 4))  # a rank with no slot gets no row
    assert deal_rows((2, 6), 8) == ((1, 5), (0, 2, 3, 4, 6, 7))  # 1 in 4 to the rank with a quarter of the slots
    assert deal_rows((1, 2, 6), 1) == ((), (), (0,))  # the best row to the largest share
    assert deal_rows((0, 0), 3) == ((), ())


def test_a_rank_with_no_candidate_row_feeds_no_tree():
    slices = tuple(split_step(4, 2, 9, 1, [1, 1, 1]))  # the budget of 9 is split 1 / 2 / 6 over 3 ranks...
    assert [s.cand_end - s.cand_start for s in slices] == [1, 2, 6] and [s.columns for s in slices] == [3, 1, 0]
    shapes = [FastShape(4, 3, 0, 1, 6, 6, 1, slices, rank, "gather") for rank in range(3)]  # ...but one row: lookup 1
    assert [s.tree_rows for s in shapes] == [(), (), (0,)]
    assert [s.budget for s in shapes] == [0, 0, 6]  # ranks 1 and 2 used to build a tree of no rows and crash
    assert [tokens_fed(s.step_shape) for s in shapes] == [1 + 2 * 3, 1 + 3 + 2 * 1, 1 + 6]  # pending, window, tree


def test_prompt_lookup_accepts_whole_continuations_when_the_output_repeats_itself():
    model = tiny_model("llama", seed=6)
    prompt = repetitive_prompt(11, 60)
    greedy = hf_greedy(model, prompt, 96)
    stretches = [tuple(greedy[i:i + 20]) for i in range(len(greedy) - 20)]
    assert len(set(stretches)) < len(stretches)  # this tiny model's output repeats 20-token stretches of itself
    result = FastDecoder(model, lp.LookaheadConfig(1, 2, 0, lookup=1, lookup_len=10, budget=10),
                         compile=False).generate(prompt, 96)
    assert result.token_ids == greedy
    assert max(result.accepted_per_step) == 11  # a whole 10-token continuation and the bonus token in one step
    assert result.steps <= 40  # the loop is read off the text instead of decoded a token at a time


def test_the_reference_engine_refuses_tree_settings_it_does_not_apply():
    model = tiny_model("llama", seed=1)
    with pytest.raises(lp.ConfigError, match="turn compile on"):
        lp.Decoder(model, lp.LookaheadConfig(lookup=2))
    with pytest.raises(lp.ConfigError, match="turn compile on"):
        lp.Decoder(model, lp.LookaheadConfig(budget=30))
    with pytest.raises(lp.ConfigError, match="turn compile on"):
        lp.Decoder(model, lp.LookaheadConfig(chain=1))
    assert type(lp.Decoder(model, lp.LookaheadConfig(lookup=0))) is lp.Decoder  # the pool only: fine


@pytest.mark.parametrize("field,value", [("lookup", -1), ("lookup", 65), ("lookup_len", 0), ("budget", -2),
                                         ("budget", True), ("chain", -1), ("chain", 17), ("chain", 1.5)])
def test_tree_settings_are_validated(field, value):
    with pytest.raises(lp.ConfigError, match=field):
        lp.LookaheadConfig(**{field: value})


def test_tree_defaults_keep_the_old_number_of_fed_tokens_on_gpus_and_half_on_cpus():
    config = lp.LookaheadConfig(15, 5, 15)
    assert config.tree_budget("cuda") == 60 and config.lookup_count == 2 and config.tree_depth == 10
    assert config.tree_budget("cpu") == 30  # a CPU pays for every fed token
    assert lp.LookaheadConfig(1, 2, 1).tree_budget("cpu") == 1  # rounded up: a tree of one never becomes none
    assert lp.LookaheadConfig(15, 5, 15, budget=60).tree_budget("cpu") == 60  # a set budget holds everywhere
    assert config.chain_count == 2 and config.chain_room == 4  # pool 4-grams continued to 8 tokens, within 10


def test_chaining_needs_room_below_the_trees_depth():
    unchained = lp.LookaheadConfig(15, 5, 15, lookup=0)  # depth N-1: the paper's pool, no room to chain
    assert unchained.chain_room == 0 and unchained.chain_count == 0
    assert lp.LookaheadConfig(7, 5, 7, lookup_len=6).chain_room == 2
    assert lp.LookaheadConfig(15, 5, 15, chain=0).chain_room == 0
    assert lp.LookaheadConfig(15, 5, 15, chain=0).tree_depth == 10  # chaining never deepens the tree


def prompt_pool():
    """A device pool loaded from the n-grams of a little text: under 3, (4, 5) then (6, 7); under 5, (8, 9)."""
    import torch
    from lp.device_pool import DevicePool
    from lp.ngram_pool import NGramPool
    host = NGramPool(3, 2)
    for gram in ([1, 2, 3], [3, 4, 5], [3, 6, 7], [5, 8, 9]):
        host.add_sequence(gram)
    pool = DevicePool(vocab=10, guess=3, length=2, device=torch.device("cpu"))
    pool.load(host, [1, 3, 5, 6])
    return pool


def test_the_device_pool_starts_with_the_prompts_n_grams_newest_first():
    import torch
    pool = prompt_pool()
    tokens, ok = pool.lookup(torch.tensor(3), 0, 3)
    assert tokens[:2].tolist() == [[6, 7], [4, 5]] and ok.tolist() == [True, True, False]
    assert pool.lookup(torch.tensor(5), 0, 1)[0].tolist() == [[8, 9]]
    assert not pool.lookup(torch.tensor(6), 0, 3)[1].any()  # a key with nothing after it


def test_a_chained_pool_candidate_runs_on_with_the_newest_n_grams_under_its_last_token():
    import torch
    candidates = torch.tensor([[2, 3], [8, 9], [4, 5]])  # ending in 3 (two stored), 9 (none), 5 (one)
    valid = torch.tensor([[True, True], [True, True], [False, False]])
    tokens, ok = prompt_pool().chained(candidates, valid, chain=2, room=1)
    assert tokens[:2].tolist() == [[2, 3, 6], [2, 3, 4]]  # candidate-major, the newest continuation first
    assert tokens[2:, :2].tolist() == [[8, 9], [8, 9], [4, 5], [4, 5]]
    assert tokens[4, 2].item() == 8
    assert ok.tolist() == [[True, True, True], [True, True, True],
                           [True, True, False], [True, True, False],  # nothing stored under 9
                           [False, False, False], [False, False, False]]  # an invalid candidate stays invalid


@pytest.mark.slow
def test_compiled_trees_give_greedy_tokens():
    model = tiny_model("llama", seed=7)
    prompt = repetitive_prompt(21, 50)
    expected = hf_greedy(model, prompt, 64)
    for tree in (dict(lookup=2, lookup_len=10), dict(lookup=1, lookup_len=6, budget=7)):
        result = FastDecoder(model, lp.LookaheadConfig(4, 3, 4, **tree), compile=True).generate(prompt, 64)
        assert result.token_ids == expected and result.compiled


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_team_splits_the_tree_and_matches_greedy_with_both_kv_strategies(ranks, tmp_path):
    from test_parallel import run_team
    cases, expected = [], []
    for i, (family, wng, tree) in enumerate([("llama", (5, 4, 5), dict(lookup=2, lookup_len=10)),
                                              ("gpt2", (3, 3, 2), dict(lookup=3, lookup_len=5, budget=11)),
                                              # one candidate row for 2-3 ranks: the others have no tree at all
                                              ("llama", (4, 3, 0), dict(lookup=1, lookup_len=6, budget=9))]):
        prompt = repetitive_prompt(400 + i, 30)
        reference = hf_greedy(tiny_model(family, seed=i), prompt, 40)
        for kv_sync in ("recompute", "gather"):
            cases.append(dict(model=family, seed=i, prompt=prompt, wng=wng, tree=tree, max_new=40, kv_sync=kv_sync,
                              fast="eager"))
            expected.append(reference)
    outs, codes = run_team(ranks, {"cases": cases}, tmp_path)
    assert codes == [0] * ranks
    for rank_results in outs:
        assert [r["tokens"] for r in rank_results] == expected
