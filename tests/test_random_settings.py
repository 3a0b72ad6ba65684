"""No combination of settings changes the output: random (W, N, G), trees, budgets, prompts, EOS and sampling
settings, one process and teams, always give greedy decoding's (or the plain sampler's) tokens.

The cases are drawn from a fixed seed, so a failure names a case that reproduces. Two bugs were found this way
(a budget with no candidate source, fewer tree rows than ranks) before these tests existed."""
import random

import pytest

import lp
from lp.batched_decoding import BatchedDecoder
from lp.fast_decoding import FastDecoder
from lp.greedy_rules import greedy_rules, hf_greedy
from lp.sampling import reference_sample, sampling_settings
from models import tiny_model

FAMILIES = ("llama", "qwen2", "gemma")


def random_case(rng: random.Random, ranks: int = 1) -> dict:
    """One case: model, generation rules, lookahead settings (tree settings only for the fast path), prompt(s)."""
    window = rng.choice([ranks, ranks + 1, 2, 5, 7, 15])
    ngram = rng.choice([2, 3, 4, 5])
    settings = dict(window=window, ngram=ngram, guess=rng.choice([0, 1, window, 2 * window]))
    fast = rng.random() < 0.75
    if fast:
        settings.update(lookup=rng.choice([None, 0, 1, 3]), lookup_len=rng.choice([1, 3, 10]),
                        chain=rng.choice([None, 0, 2]), budget=rng.choice([None, 0, 1, 5, 30]))
        if ranks == 1:
            settings.update(plain_steps=rng.choice([None, True, False]))
        if rng.random() < 0.5:  # the job's corpus for prompt lookup: none, tiny (cut texts), the default, large
            settings.update(memory_tokens=rng.choice([0, 2, 16, None, 4096]))
    if rng.random() < 0.3:
        settings.update(sample=True, seed=rng.randrange(50), temperature=rng.choice([0.5, 1.0, 1.5]),
                        top_k=rng.choice([None, 5]))
    if rng.random() < 0.3:  # the default keeps the pool from one prompt of a case to the next
        settings.update(memory="record")
    prompts = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        size = rng.choice([1, 2, rng.randrange(1, 40)])
        prompt = [rng.randrange(3, 97) for _ in range(size)]
        if rng.random() < 0.4:  # repetitive text: prompt lookup and the pool find long matches
            prompt = (prompt[: max(1, size // 3)] * 9)[:size]
        prompts.append(prompt)
    return dict(model=rng.choice(FAMILIES), seed=rng.randrange(3), eos=rng.choice([None, None, rng.randrange(3, 97)]),
                settings=settings, fast=fast, batch=rng.choice([0, 0, 1, 2, 3]) if fast else 0,
                prompts=prompts, max_new=[rng.choice([1, 9, 40]) for _ in prompts])


def model_of(case: dict):
    model = tiny_model(case["model"], seed=case["seed"])
    model.generation_config.eos_token_id = case["eos"]
    return model


def expected(case: dict, model) -> list[list[int]]:
    """Greedy decoding's tokens for every prompt, or the one-token-at-a-time sampler's when sampling."""
    config = lp.LookaheadConfig(**case["settings"])
    settings = sampling_settings(model.generation_config, config)
    if settings is None:
        return [hf_greedy(model, p, n) for p, n in zip(case["prompts"], case["max_new"])]
    return [reference_sample(model, p, n, settings, config.seed, greedy_rules(model.generation_config, len(p), n))
            for p, n in zip(case["prompts"], case["max_new"])]


def decode(case: dict, model) -> list[list[int]]:
    config = lp.LookaheadConfig(**case["settings"])
    if case["batch"]:
        results = BatchedDecoder(model, config, case["batch"], compile=False).generate_many(case["prompts"],
                                                                                            case["max_new"])
        return [r.token_ids for r in results]
    decoder = FastDecoder(model, config, compile=False) if case["fast"] else lp.Decoder(model, config)
    return [decoder.generate(p, n).token_ids for p, n in zip(case["prompts"], case["max_new"])]


@pytest.mark.parametrize("draw", range(4))
def test_random_settings_give_greedy_or_sampled_tokens_in_one_process(draw):
    rng = random.Random(draw)
    for number in range(40):
        case = random_case(rng)
        model = model_of(case)
        assert decode(case, model) == expected(case, model), f"draw {draw}, case {number}: {case}"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_random_settings_give_greedy_or_sampled_tokens_on_every_rank_of_a_team(ranks, tmp_path):
    from test_parallel import run_team
    rng = random.Random(100 + ranks)
    cases, wanted = [], []
    for _ in range(60):
        case = random_case(rng, ranks)
        if not case["batch"]:  # one prompt a case, as a team decodes it
            case.update(prompts=case["prompts"][:1], max_new=case["max_new"][:1])
        tree = {k: v for k, v in case["settings"].items() if k not in ("window", "ngram", "guess")}
        spec = dict(model=case["model"], seed=case["seed"], eos=case["eos"], tree=tree, fast="eager" if case["fast"] else None,
                    wng=[case["settings"][k] for k in ("window", "ngram", "guess")],
                    kv_sync=rng.choice(["recompute", "gather"]))
        if case["batch"]:
            spec.update(batch=case["batch"], prompts=case["prompts"], max_new=case["max_new"])
        else:
            spec.update(prompt=case["prompts"][0], max_new=case["max_new"][0])
        cases.append(spec)
        wanted.append(expected(case, model_of(case)))
    outs, codes = run_team(ranks, {"cases": cases}, tmp_path)
    assert codes == [0] * ranks
    for rank, results in enumerate(outs):
        for number, (spec, got, want) in enumerate(zip(cases, results, wanted)):
            tokens = got["batch_tokens"] if spec.get("batch") else [got.get("tokens")]
            assert tokens == want, f"rank {rank}, case {number}: {spec} ({got.get('failure')})"
