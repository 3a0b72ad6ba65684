"""On a CUDA GPU the fast path, compiled (split into graphs, the default there) or eager, each step replayed from one
captured CUDA graph, gives transformers' own greedy and sampled tokens and reads the device once per step. Skipped,
with the reason printed, where no GPU is present."""
import pytest
import torch

import lp
from lp.batched_decoding import BatchedDecoder
from lp.default_model import DEFAULT_PROMPTS, load_default_model
from lp.fast_decoding import FastDecoder
from lp.first_index import first_max
from lp.greedy_rules import greedy_rules, hf_greedy
from lp.sampling import reference_sample, sampling_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

GPU_SHAPE = dict(window=15, ngram=5, guess=15, lookup=2, budget=60, plain_steps=False)  # CUDA's defaults, spelled out


@pytest.fixture(scope="module")
def code_model():
    model, tokenizer = load_default_model(dtype=torch.float64, device="cuda")  # float64: no near-tie flips
    return model, [tokenizer(p)["input_ids"] for p in DEFAULT_PROMPTS[:3]]


@pytest.mark.parametrize("settings", [dict(GPU_SHAPE), dict(window=7, ngram=5, guess=7, lookup=4),
                                      dict(window=1, ngram=2, guess=0, lookup=1, budget=10)],
                         ids=["gpu-shape", "7-5-7-lookup4", "1-2-0-lookup1-budget10"])
def test_compiled_cuda_fast_path_equals_hf_greedy_on_the_default_model(code_model, settings):
    model, prompts = code_model
    decoder = FastDecoder(model, lp.LookaheadConfig(**settings), compile=True)
    for prompt in prompts:  # prompts 0 and 1 fill a 256-slot cache, prompt 2 a 512-slot one
        reads = decoder.host_reads
        result = decoder.generate(prompt, 96)
        assert decoder.compile_error is None
        assert result.token_ids == hf_greedy(model, prompt, 96)
        assert decoder.host_reads - reads == result.steps  # one device-to-host copy per step
    assert max(result.accepted_per_step) > 1  # lookahead did accept several tokens in some step
    assert len(decoder._graphs) >= 1  # the step ran from a captured CUDA graph


def test_cuda_takes_the_split_compiled_step_by_default_and_warns_of_the_whole_one(code_model, caplog):
    from lp.fast_decoding import CUDA_WHOLE_STEP_WARNING
    model, prompts = code_model
    with caplog.at_level("WARNING", logger="lp"):
        decoder = lp.Decoder(model)  # no settings: the fast path, its step split around the forward
        assert type(decoder) is FastDecoder and decoder.compile and decoder.split
        assert decoder.generate(prompts[0], 32).token_ids == hf_greedy(model, prompts[0], 32)
        assert CUDA_WHOLE_STEP_WARNING not in caplog.text
        FastDecoder(model, lp.LookaheadConfig(step_graphs="whole"), compile=True)
    assert CUDA_WHOLE_STEP_WARNING in caplog.text


def test_compiled_cuda_fast_path_samples_the_reference_samplers_tokens(code_model):
    model, prompts = code_model
    config = lp.LookaheadConfig(7, 5, 7, sample=True, temperature=0.8, top_k=40, top_p=0.95, seed=3)
    decoder = FastDecoder(model, config, compile=True)
    settings = sampling_settings(model.generation_config, config)
    for prompt in prompts[:2]:
        rules = greedy_rules(model.generation_config, len(prompt), 64)
        assert decoder.generate(prompt, 64).token_ids == reference_sample(model, prompt, 64, settings, 3, rules)


def test_compiled_cuda_batch_lanes_each_equal_hf_greedy(code_model):
    model, prompts = code_model
    decoder = BatchedDecoder(model, lp.LookaheadConfig(7, 5, 7), 2, compile=True)
    results = decoder.generate_many(prompts, 64)
    assert [r.token_ids for r in results] == [hf_greedy(model, p, 64) for p in prompts]
    assert decoder.compile_error is None


def test_the_eager_fast_path_replayed_from_a_cuda_graph_equals_hf_greedy(code_model):
    model, prompts = code_model
    decoder = FastDecoder(model, lp.LookaheadConfig(**GPU_SHAPE, cuda_graphs=True), compile=False)
    for prompt in prompts:
        assert decoder.generate(prompt, 96).token_ids == hf_greedy(model, prompt, 96)
    assert len(decoder._graphs) >= 1


def test_compiled_first_max_keeps_the_first_of_tied_maxima_on_cuda():
    x = torch.randint(0, 3, (64, 40), device="cuda").double()  # every row has ties
    for rows in (9, 17, 64):  # the tree's rows: reductions over more than 16 went wrong before
        torch._dynamo.reset()
        compiled = torch.compile(first_max, fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x[:rows], 0), x[:rows].argmax(0))  # eager argmax: the first of tied maxima
