"""A job's memory: a decoder's n-gram pool lives on from one record to the next (LookaheadConfig.memory="job", the
default), so the later records of a job take fewer steps. Whatever it holds (another model's text, random tokens,
full rings), no token changes, on either engine, in batches of lanes sharing it and on every rank of a team."""
import random

import torch

import pytest

import lp
from lp.batched_decoding import BatchedDecoder
from lp.fast_decoding import FastDecoder
from lp.greedy_rules import hf_greedy
from models import VOCAB, tiny_model
from test_exactness import repetitive_prompt


def decoder_of(engine: str, model, **settings):
    config = lp.LookaheadConfig(7, 4, 7, **settings)
    return FastDecoder(model, config, compile=False) if engine == "fast" else lp.Decoder(model, config)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_record_like_an_earlier_one_takes_fewer_steps_with_the_jobs_memory(engine):
    model = tiny_model("llama", seed=3)
    prompt = repetitive_prompt(4, 24)
    want = hf_greedy(model, prompt, 80)
    steps = {}
    for memory in ("job", "record"):
        decoder = decoder_of(engine, model, memory=memory)
        runs = [decoder.generate(prompt, 80) for _ in range(2)]
        assert all(r.token_ids == want for r in runs)
        steps[memory] = [r.steps for r in runs]
    assert steps["record"][1] == steps["record"][0]  # each record on its own: the same steps again
    assert steps["job"][0] == steps["record"][0] and steps["job"][1] < steps["job"][0]  # the job remembers


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("fill", ["another model's text", "random tokens", "every ring full"])
def test_whatever_the_memory_holds_the_tokens_are_greedys(engine, fill):
    model = tiny_model("qwen2", seed=1)
    rng = random.Random(len(fill))
    decoder = decoder_of(engine, model)
    if fill == "another model's text":
        other = tiny_model("llama", seed=9)
        decoder.remember(hf_greedy(other, repetitive_prompt(5, 12), 200))
    elif fill == "random tokens":
        decoder.remember([rng.randrange(VOCAB) for _ in range(500)])
    else:  # far more n-grams than G a key: every ring wraps many times
        for _ in range(20):
            decoder.remember([rng.randrange(VOCAB) for _ in range(1000)])
    for seed in range(3):
        prompt = repetitive_prompt(seed, 30)
        assert decoder.generate(prompt, 48).token_ids == hf_greedy(model, prompt, 48)
    if engine == "reference":
        assert len(decoder.memory) <= VOCAB * decoder.config.guess  # bounded, however long the job
    else:
        assert int(decoder.job_pool().count.max()) <= decoder.config.guess


def test_the_lanes_of_a_batch_share_the_memory_and_an_idle_lane_adds_nothing_to_it():
    model = tiny_model("llama", seed=2)
    prompt = repetitive_prompt(6, 20)
    pools = []
    for lanes in (1, 3):  # with 3 lanes and one record, two lanes idle: they decode junk that must stay out
        decoder = BatchedDecoder(model, lp.LookaheadConfig(5, 4, 5), lanes, compile=False)
        [result] = decoder.generate_many([prompt], 40)
        assert result.token_ids == hf_greedy(model, prompt, 40)
        assert all(lane.pool is decoder.job_pool() for lane in decoder._batched[256].lanes)
        pool = decoder.job_pool()
        pools.append([t[:VOCAB].clone() for t in (pool.tokens, pool.count, pool.next)])  # row VOCAB takes discards
    assert all((a == b).all() for a, b in zip(*pools))  # the same memory as one lane alone


def test_a_batch_job_of_many_records_stays_exact_as_its_memory_grows():
    model = tiny_model("gemma", seed=0)
    prompts = [repetitive_prompt(seed % 3, 10 + seed) for seed in range(8)]
    decoder = BatchedDecoder(model, lp.LookaheadConfig(5, 3, 5), 3, compile=False)
    results = decoder.generate_many(prompts, 30)
    assert [r.token_ids for r in results] == [hf_greedy(model, p, 30) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("kv_sync", ["recompute", "gather"])
def test_every_rank_of_a_team_keeps_the_same_memory_across_records(kv_sync, tmp_path):
    from test_parallel import run_team
    model = tiny_model("llama", seed=4)
    prompts = [repetitive_prompt(seed % 2, 25) for seed in range(4)]
    cases = [dict(model="llama", seed=4, prompts=prompts, max_new=40, wng=(6, 4, 6), kv_sync=kv_sync, fast=fast)
             for fast in (None, "eager")]  # one decoder decodes the prompts in turn: the fingerprint covers the pool
    outs, codes = run_team(2, {"cases": cases}, tmp_path)
    assert codes == [0, 0]
    want = [hf_greedy(model, p, 40) for p in prompts]
    for results in outs:
        for result in results:
            assert result.get("sequence_tokens") == want, result.get("failure")
            assert result["steps"][2] < result["steps"][0]  # record 3 repeats record 1: it remembered


def test_a_jobs_memory_earns_full_steps_under_a_key_until_it_keeps_failing_there():
    import torch
    from lp.device_pool import DevicePool
    pool = DevicePool(vocab=10, guess=2, length=2, device=torch.device("cpu"))
    key, earlier, now = torch.tensor([1]), torch.tensor(1), torch.tensor(2)
    assert not pool.worth_a_step(key, now)  # nothing stored under it
    pool.insert_all([[1, 2, 3]], generation=1)  # an earlier record's n-gram
    assert pool.worth_a_step(key, earlier)  # its own record always tries it
    verdicts = []
    for committed in (1, 1, 1, 1, 1, 1, 2):  # full steps from key 1 in a later record: 6 accept nothing, then one a token
        verdicts.append(bool(pool.worth_a_step(key, now)))
        pool.record_gain(key, torch.tensor(committed))
    assert verdicts == [True] * 6 + [False]  # tried until its average falls below the bar (1.5 tokens a step)...
    assert pool.worth_a_step(key, now)  # ...and trusted again once one paid (a step its own record ran)
    pool.insert_all([[1, 4, 5]], generation=2)
    assert pool.worth_a_step(key, now)  # what this record stored is always worth a step


def test_a_jobs_memory_earns_full_steps_only_where_they_commit_what_their_cost_would_buy_in_plain_steps():
    import torch
    from lp.device_pool import DevicePool
    pool = DevicePool(vocab=10, guess=2, length=2, device=torch.device("cpu"))
    key, now = torch.tensor([1]), torch.tensor(2)
    pool.insert_all([[1, 2, 3]], generation=1)  # an earlier record's n-gram
    for _ in range(12):  # full steps from key 1 commit 2 tokens each, lately
        pool.record_gain(key, torch.tensor(2))
    pool.set_cost_ratio(1.8)  # a full step costs 1.8 plain ones: 2 tokens pay for it
    assert pool.worth_a_step(key, now) and int(pool.trust_at) == 15  # the bar in eighths of a token: 14.4, up
    pool.set_cost_ratio(3.0)  # 3 plain steps would commit 3 tokens: 2 do not pay
    assert not pool.worth_a_step(key, now) and int(pool.trust_at) == 24
    pool.insert_all([[1, 4, 5]], generation=2)
    assert pool.worth_a_step(key, now)  # what this record stored is still always worth a step


def test_the_fast_path_tells_its_pool_what_a_full_step_costs_in_plain_ones():
    model = tiny_model("llama", seed=5)
    prompt = [random.Random(3).randrange(VOCAB) for _ in range(40)]
    decoder = FastDecoder(model, lp.LookaheadConfig(7, 4, 7, plain_steps=True), compile=False)
    assert decoder.generate(prompt, 60).token_ids == hf_greedy(model, prompt, 60)
    assert decoder.cost_ratio is not None  # a real generation timed both kinds of step
    fresh = FastDecoder(model, lp.LookaheadConfig(7, 4, 7, plain_steps=True), compile=False)
    for _ in range(4):  # full steps of 30 ms and plain ones of 10 ms: a full step costs 3 plain ones
        fresh._time_step(True, 0.030)
        fresh._time_step(False, 0.010)
    assert fresh.cost_ratio == pytest.approx(3.0) and int(fresh.job_pool().trust_at) == 24  # 3 tokens, in eighths


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prompt_lookup_finds_a_record_an_earlier_one_of_the_job_wrote_in_the_jobs_corpus(compiled):
    model = tiny_model("llama", seed=5)
    prompt = [random.Random(7).randrange(VOCAB) for _ in range(24)]  # its own text repeats little
    want = hf_greedy(model, prompt, 80)
    steps = {}
    for tokens in (0, 4096):  # G = 0: no pool, so prompt lookup alone proposes candidates
        config = lp.LookaheadConfig(5, 4, 0, lookup=2, budget=20, memory_tokens=tokens)
        decoder = FastDecoder(model, config, compile=compiled)
        runs = [decoder.generate(prompt, 80) for _ in range(2)]
        assert decoder.compile_error is None
        assert all(r.token_ids == want for r in runs)
        steps[tokens] = [r.steps for r in runs]
    assert steps[0][1] == steps[0][0]  # the record's own text only: the same steps again
    assert steps[4096][0] == steps[0][0] and steps[4096][1] < 0.6 * steps[4096][0]  # the earlier record, looked up


def test_the_jobs_corpus_keeps_its_newest_texts_each_after_a_separator():
    from lp.job_corpus import JobCorpus
    corpus = JobCorpus(8, torch.device("cpu"))
    corpus.add([1, 2, 3])
    assert corpus.tokens.tolist() == [-1, -1, -1, -1, -1, 1, 2, 3]
    corpus.add([4, 5, 6])
    assert corpus.tokens.tolist() == [-1, 1, 2, 3, -1, 4, 5, 6]
    assert corpus.room.tolist() == [3, 2, 1, 0, 3, 2, 1, 0]  # tokens after each position within its text
    corpus.add(list(range(10, 30)))  # longer than the corpus: its last 8 tokens
    assert corpus.tokens.tolist() == list(range(22, 30))
    assert corpus.room.tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    corpus.add_texts([-1, -1, 5, 6, -1, 7])  # a saved corpus, as it is: two texts
    assert corpus.tokens.tolist() == [29, -1, -1, -1, 5, 6, -1, 7]
    assert corpus.room.tolist() == [0, 0, 0, 2, 1, 0, 1, 0]


def scanned_best(history, corpus, size):
    """The best prompt-lookup candidate by a scan of every position (the ranking prompt_lookup documents): the
    longest match (1-4 tokens in the record's own text, 2-4 in the corpus), then a whole continuation of `size`,
    then the record's own, then the latest. Returns (match length, its continuation), or (0, [])."""
    def run(text, end, tail):
        n = 0
        while n < 4 and end - n >= 0 and n < len(tail) and text[end - n] == tail[n]:
            n += 1
        return n
    tail = history[::-1][:4]
    found = []  # (match, whole, own, position, continuation)
    for i in range(len(history) - 1):
        n = run(history, i, tail)
        if n:
            after = history[i + 1:][:size]
            found.append((n, len(after) == size, 1, i, after))
    for j, token in enumerate(corpus):
        n = run(corpus, j, tail)
        if n >= 2:
            after = []
            for t in corpus[j + 1:]:
                if t < 0 or len(after) == size:
                    break
                after.append(t)
            found.append((n, len(after) == size, 0, j, after))
    if not found:
        return 0, []
    best = max(found, key=lambda f: f[:4])
    return best[0], best[4]


def test_the_corpus_index_offers_the_same_best_match_as_a_scan_of_the_whole_corpus():
    """Four tokens: every n-gram of 2-4 of them has a hash slot of its own, so the index answers what a scan does
    (with more tokens than slots, two n-grams may share one: the newer keeps it, the older is not offered)."""
    from lp.candidate_tree import has_match, prompt_lookup
    from lp.job_corpus import JobCorpus
    rng = random.Random(11)
    for case in range(60):
        size = rng.choice([2, 3, 5])
        corpus = JobCorpus(rng.choice([24, 40, 64]), torch.device("cpu"), continuation=size)
        for _ in range(rng.randrange(1, 6)):  # texts of 1-20 tokens, the older ones pushed out
            corpus.add([rng.randrange(4) for _ in range(rng.randrange(1, 21))])
        record = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        history = torch.tensor(record + [-1] * (12 - len(record)))
        tokens, valid, match = prompt_lookup(history, torch.tensor(len(record)), 1, size, corpus)
        want_match, want_after = scanned_best(record, corpus.tokens.tolist(), size)
        assert (int(match[0]), tokens[0][valid[0]].tolist()) == (want_match, want_after), (case, record)
        assert bool(has_match(history, torch.tensor(len(record)), corpus)) == (want_match > 0), case


def colliding_bigrams(corpus) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two 2-token n-grams the corpus' index hashes to one slot."""
    seen = {}
    for a in range(64):
        for b in range(64):
            slot = int(corpus.slots_of(torch.tensor([b, a, -2, -2]))[0][0])
            if seen.setdefault(slot, (a, b)) != (a, b):
                return seen[slot], (a, b)
    raise AssertionError("no collision among 4096 n-grams")


def test_the_corpus_index_forgets_what_left_the_corpus_and_checks_what_it_offers():
    from lp.candidate_tree import prompt_lookup
    from lp.job_corpus import JobCorpus
    corpus = JobCorpus(8, torch.device("cpu"), continuation=2)
    history = torch.tensor([5, 6, -1, -1])
    corpus.add([5, 6, 7, 8])
    _, valid, match = prompt_lookup(history, torch.tensor(2), 1, 2, corpus)
    assert int(match[0]) == 2 and valid[0].all()
    corpus.add([9, 9, 9, 9])  # the 8-token corpus keeps [6, 7, 8, -1, 9, 9, 9, 9]: "5 6" is gone
    _, valid, match = prompt_lookup(history, torch.tensor(2), 1, 2, corpus)
    assert int(match[0]) == 0 and not valid.any()
    corpus = JobCorpus(16, torch.device("cpu"), continuation=2)
    old, new = colliding_bigrams(corpus)
    corpus.add([*old, 30, 31])
    corpus.add([*new, 32, 33])  # the newer n-gram holds the slot they share
    tokens, valid, match = prompt_lookup(torch.tensor([*new, -1, -1]), torch.tensor(2), 1, 2, corpus)
    assert tokens[0][valid[0]].tolist() == [32, 33]
    tokens, valid, match = prompt_lookup(torch.tensor([*old, -1, -1]), torch.tensor(2), 1, 2, corpus)
    assert int(match[0]) == 0 and not valid.any()  # the slot offers the newer n-gram, which is not this one
    from lp.job_corpus import WRAP
    corpus = JobCorpus(16, torch.device("cpu"), continuation=2)
    corpus.appended = WRAP - 6  # a long job: its positions wrap around while these texts are added
    for text in ([5, 6, 7, 8], [1, 2, 3], [5, 6, 9, 10], [4, 4, 4]):
        corpus.add(text)
    tokens, valid, match = prompt_lookup(torch.tensor([5, 6, -1, -1]), torch.tensor(2), 1, 2, corpus)
    assert tokens[0][valid[0]].tolist() == [9, 10]  # still the newest


def test_a_corpus_match_continues_only_within_its_own_text_and_ranks_below_the_records_own():
    from lp.candidate_tree import prompt_lookup
    from lp.job_corpus import JobCorpus

    def corpus_of(*texts):
        corpus = JobCorpus(sum(len(t) + 1 for t in texts), torch.device("cpu"), continuation=2)
        for text in texts:
            corpus.add(text)
        return corpus

    history = torch.tensor([7, 8, 9, 5, 6, -1, -1, -1])  # the record: ... 5 6, its own earlier 5 6 is absent
    corpus = corpus_of([5, 6, 40, 41], [3, 5, 6, 50])  # "5 6" twice: the later one is cut by the corpus' end
    tokens, valid, match = prompt_lookup(history, torch.tensor(5), 2, 2, corpus)
    assert match.tolist() == [2, 2]
    rows = [[t for t, ok in zip(r, v) if ok] for r, v in zip(tokens.tolist(), valid.tolist())]
    assert rows == [[40, 41], [50]]  # a whole continuation first; none runs past the corpus' end
    history = torch.tensor([5, 6, 11, 12, 13, 5, 6, -1])  # now the record itself had "5 6": it ranks first
    tokens, valid, match = prompt_lookup(history, torch.tensor(7), 1, 2, corpus)
    assert tokens[0][valid[0]].tolist() == [11, 12]
    tokens, valid, match = prompt_lookup(history, torch.tensor(7), 1, 3, corpus_of([5, 6, 40, 41], [0]))
    assert tokens[0][valid[0]].tolist() == [11, 12, 13]  # (and none runs past a separator: [40, 41] stops there)
