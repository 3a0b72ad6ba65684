"""What splitting the compiled step costs: the fast path compiled as one graph a step (whole) against four graphs a
step (split: prepare, the model's forward alone, finish, commit), same tokens, in one process.

python benchmarks/step_graphs.py --out benchmarks/results_published/step_graphs_cpu

For each model (`default`, `stories260k` when present) and W:N:G it compiles both decoders, warms them up on the
first prompt, then times every prompt with each in turn (interleaved, --repeats times): ms per step (the decode's
wall time over its steps, compiling left out), tokens per step, and the split/whole ratio of the medians. Every
output is checked against transformers' greedy. On CUDA each step of either kind replays from one CUDA graph, so
the split costs nothing there but fusion; on a CPU every extra graph is an extra call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import loading  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from lp.greedy_rules import hf_greedy  # noqa: E402


def measure(model, prompts, wng, args) -> dict:
    decoders = {graphs: FastDecoder(model, LookaheadConfig(*wng, step_graphs=graphs), compile=True)
                for graphs in ("whole", "split")}
    for decoder in decoders.values():  # compile and warm up (not timed)
        decoder.generate(prompts[0], args.max_new_tokens)
    ms = {graphs: [] for graphs in decoders}
    per_step = {graphs: [] for graphs in decoders}
    exact = True
    for _ in range(args.repeats):
        for prompt in prompts:
            want = hf_greedy(model, prompt, args.max_new_tokens)
            for graphs, decoder in decoders.items():
                result = decoder.generate(prompt, args.max_new_tokens)
                exact &= result.token_ids == want
                ms[graphs].append(1e3 * result.wall_time_s / result.steps)
                per_step[graphs].append(result.tokens_per_step)
    row = dict(config=":".join(map(str, wng)), exact=exact)
    for graphs, decoder in decoders.items():
        row[graphs] = dict(ms_per_step=round(statistics.median(ms[graphs]), 3),
                           tokens_per_step=round(statistics.fmean(per_step[graphs]), 3),
                           compile_s=round(decoder.compile_time_s, 1), compile_error=decoder.compile_error)
    row["split_over_whole"] = round(row["split"]["ms_per_step"] / row["whole"]["ms_per_step"], 3)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["default", "stories260k"])
    p.add_argument("--configs", default="15:5:15,7:5:7")
    p.add_argument("--limit", type=int, default=4, help="first LIMIT prompts of each model's suite")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "step_graphs"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    began = time.time()
    rows = []
    for name in args.models:
        try:
            model, tokenizer = loading.load_model(name, torch.float32)
        except loading.ModelUnavailable as why:
            print(f"{name}: skipped ({why})")
            continue
        suite = loading.load_prompts(loading.default_suite(name), tokenizer, model.config.vocab_size, args.limit)
        prompts = [prompt.ids for prompt in suite]
        for text in args.configs.split(","):
            row = dict(model=name, **measure(model, prompts, tuple(map(int, text.split(":"))), args))
            rows.append(row)
            print(f"{name} {row['config']}: whole {row['whole']['ms_per_step']} ms/step, split "
                  f"{row['split']['ms_per_step']} ms/step, split/whole {row['split_over_whole']}, exact {row['exact']}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, threads=args.threads, seconds=round(time.time() - began, 1),
               command=" ".join(sys.argv), date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out.with_suffix(".json").write_text(json.dumps(dict(environment=env, settings=vars(args), rows=rows), indent=1))
    lines = ["| model | W:N:G | whole ms/step | split ms/step | split / whole | tokens/step | exact |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['config']} | {r['whole']['ms_per_step']} | {r['split']['ms_per_step']} | "
              f"{r['split_over_whole']} | {r['whole']['tokens_per_step']} | {r['exact']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
