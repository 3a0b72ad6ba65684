"""Lookahead sampling against transformers' sampling, measured in one run (CPU, one thread by default).

python benchmarks/sampling.py --model stories260k --temperatures 0.7,1.0 --configs 15:5:15,7:5:7 --limit 5
Per model and temperature: tokens/step and ms/token of HF generate(do_sample=True) and of lp (eager engine),
and the same for greedy, so the sampling speedup reads next to greedy's. EOS is switched off for every method so
all generations run to max_new_tokens. Prints a markdown table; --out FILE.json also keeps the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lp  # noqa: E402
from benchmarks import loading  # noqa: E402


def hf_run(model, ids: list[int], max_new: int, temperature: float | None, seed: int) -> tuple[int, float]:
    """(new tokens, seconds) of transformers' generate, sampling at `temperature` or greedy when None."""
    x = torch.tensor([ids])
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature) if temperature else dict(do_sample=False)
    began = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, **kwargs)
    return out.shape[1] - x.shape[1], time.perf_counter() - began


def lp_run(model, ids: list[int], max_new: int, config: lp.LookaheadConfig) -> tuple[int, int, float]:
    """(new tokens, steps, seconds) of lp's decoder."""
    result = lp.Decoder(model, config).generate(ids, max_new)
    return result.new_tokens, result.steps, result.wall_time_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="stories260k")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperatures", default="0.7,1.0")
    p.add_argument("--configs", default="15:5:15,7:5:7")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = loading.load_model(args.model)
    model.generation_config.eos_token_id = None  # every method runs to max_new_tokens
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = loading.load_prompts(loading.default_suite(args.model), tokenizer, vocab, args.limit)
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    modes = [None] + [float(t) for t in args.temperatures.split(",")]
    lp_run(model, prompts[0].ids, 8, lp.LookaheadConfig(*configs[0]))  # warm-up
    hf_run(model, prompts[0].ids, 8, None, 0)
    rows = []
    for temperature in modes:
        label = "greedy" if temperature is None else f"T={temperature}"
        hf_tokens = hf_s = 0.0
        lp_totals = {c: [0, 0, 0.0] for c in configs}
        for n, prompt in enumerate(prompts):  # interleaved prompt by prompt, so load drifts hit every method
            t, s = hf_run(model, prompt.ids, args.max_new_tokens, temperature, n)
            hf_tokens, hf_s = hf_tokens + t, hf_s + s
            for c in configs:
                sampling = dict(sample=True, temperature=temperature, seed=n) if temperature else dict(sample=False)
                t, steps, s = lp_run(model, prompt.ids, args.max_new_tokens, lp.LookaheadConfig(*c, **sampling))
                total = lp_totals[c]
                total[0], total[1], total[2] = total[0] + t, total[1] + steps, total[2] + s
        hf_ms = 1000 * hf_s / hf_tokens
        rows.append(dict(model=args.model, mode=label, method="hf generate", tokens_per_step=1.0,
                         ms_per_token=round(hf_ms, 3), speedup=1.0))
        for c, (t, steps, s) in lp_totals.items():
            ms = 1000 * s / t
            rows.append(dict(model=args.model, mode=label, method=f"lp {c}", tokens_per_step=round(t / steps, 3),
                             ms_per_token=round(ms, 3), speedup=round(hf_ms / ms, 3)))
    print("| model | decoding | method | tokens/step | ms/token | vs HF same decoding |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['method']} | {r['tokens_per_step']} | {r['ms_per_token']} | "
              f"{r['speedup']}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
