"""Which layer of the fast path breaks exactness on a device: eager step, compiled without CUDA graphs, compiled
with them (reduce-overhead), and settings with and without the prompt-lookup tree.

python benchmarks/cuda_exactness.py            (a GPU: about 2-3 minutes; on a CPU it runs the same checks, slowly)

The default code model in float64 (no near-tie flips), 3 of its prompts, 96 new tokens, each generation compared
with transformers' greedy output; prints the first wrong index (or ok), accepted tokens of the first steps and
steps per generation. results_published/gpu_h200/cuda_exactness_diagnosis.txt is its output on an H200.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lp  # noqa: E402
from lp.default_model import DEFAULT_PROMPTS, load_default_model  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from lp.greedy_rules import hf_greedy  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_default_model(torch.float64, device)
    prompts = [tokenizer(p)["input_ids"] for p in DEFAULT_PROMPTS[:3]]
    expected = [hf_greedy(model, p, 96) for p in prompts]

    def check(tag: str, decoder: FastDecoder, which=(0, 1, 2)) -> None:
        for i in which:
            start = time.time()
            got = decoder.generate(prompts[i], 96)
            bad = next((j for j, (a, b) in enumerate(zip(got.token_ids, expected[i])) if a != b), None)
            ok = bad is None and len(got.token_ids) == 96
            verdict = "ok" if ok else f"MISMATCH at {bad}: {got.token_ids[:6]} vs {expected[i][:6]}"
            print(f"{tag} prompt {i}: {verdict} acc {got.accepted_per_step[:8]} steps {got.steps} "
                  f"err {decoder.compile_error} {time.time() - start:.1f}s", flush=True)

    config = lp.LookaheadConfig(15, 5, 15)
    check("A ro-first", FastDecoder(model, config, compile=True), (0, 1, 2, 0))
    check("B eager", FastDecoder(model, config, compile=False), (0,))
    compile_as_is = torch.compile
    torch.compile = lambda fn, **kw: compile_as_is(fn, **{**kw, "mode": None})  # no CUDA graphs, this run only
    check("C nocudagraph", FastDecoder(model, config, compile=True), (0, 1))
    torch.compile = compile_as_is
    check("D ro-again", FastDecoder(model, config, compile=True), (0, 1))
    check("E ro-7-5-7", FastDecoder(model, lp.LookaheadConfig(7, 5, 7), compile=True), (0,))
    check("F ro-15-5-15-lookup0", FastDecoder(model, lp.LookaheadConfig(15, 5, 15, lookup=0), compile=True), (0,))


if __name__ == "__main__":
    main()
