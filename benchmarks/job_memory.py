"""A job's memory against each record on its own: the same records decoded in order by three decoders, one keeping
its n-gram pool and a corpus of the earlier texts for prompt lookup from record to record (memory="job", the
default), one keeping the pool alone ("pool": memory_tokens=0) and one starting each record from its prompt alone
("record"), interleaved record by record in one process.

python benchmarks/job_memory.py --model stories260k --configs 15:5:15,7:5:7 --max-new-tokens 200 \
    --out benchmarks/results_published/job_memory_stories260k

For each W:N:G it reports, per memory, the job's tokens per step (all new tokens over all steps), ms per token
(decoding wall time over new tokens, compiling left out) and the curve of tokens per step over the records decoded
so far, its full and plain steps (a full step feeds the window and tree; a plain one, CPUs only, the last token) and
what a full step cost in plain ones as the decoder measured it; then job / record ratios. Every output is checked against the other decoder's (the same tokens: memory
changes steps only) and, with --check-greedy, against transformers' greedy. The fast path (compiled with
--compile, the CPU's default settings otherwise), one torch thread by default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import loading  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from lp.greedy_rules import hf_greedy  # noqa: E402

MEMORIES = ("record", "pool", "job")  # each record alone; the job's n-gram pool alone; pool and corpus (default)
SETTINGS = {"record": dict(memory="record"), "pool": dict(memory="job", memory_tokens=0), "job": dict(memory="job")}


SHAPE = ("window", "ngram", "guess", "lookup", "lookup_len", "budget")  # --configs W:N:G[:LOOKUP:LEN:BUDGET]


def run_job(model, prompts, wng, args) -> dict:
    """Both memories over the records in order, interleaved; per memory its per-record figures."""
    shape = dict(zip(SHAPE, wng))
    decoders = {m: FastDecoder(model, LookaheadConfig(**shape, **SETTINGS[m]), compile=args.compile) for m in MEMORIES}
    rows = {m: [] for m in MEMORIES}
    same = True
    greedy = True
    for prompt in prompts:
        got = {}
        for memory, decoder in decoders.items():
            result = decoder.generate(prompt.ids, args.max_new_tokens)
            got[memory] = result.token_ids
            full = [n for n, fed in zip(result.accepted_per_step, result.tokens_fed_per_step) if fed > 1]
            rows[memory].append(dict(id=prompt.id, new_tokens=result.new_tokens, steps=result.steps,
                                     full_steps=len(full), full_step_tokens=sum(full),
                                     seconds=round(result.wall_time_s, 4)))
        same &= got["job"] == got["record"] == got["pool"]
        if args.check_greedy:
            greedy &= got["job"] == hf_greedy(model, prompt.ids, args.max_new_tokens)
    out = dict(config=":".join(map(str, wng)), same_tokens=same, greedy=greedy if args.check_greedy else None)
    for memory in MEMORIES:
        records = rows[memory]
        tokens, steps = sum(r["new_tokens"] for r in records), sum(r["steps"] for r in records)
        seconds = sum(r["seconds"] for r in records)
        curve, t, s = [], 0, 0
        for r in records:
            t, s = t + r["new_tokens"], s + r["steps"]
            curve.append(round(t / s, 3))
        full, full_tokens = sum(r["full_steps"] for r in records), sum(r["full_step_tokens"] for r in records)
        out[memory] = dict(tokens_per_step=round(tokens / steps, 3), ms_per_token=round(1e3 * seconds / tokens, 3),
                           full_steps=full, plain_steps=steps - full,
                           tokens_per_full_step=round(full_tokens / full, 3) if full else None,
                           cost_ratio=decoders[memory].cost_ratio and round(decoders[memory].cost_ratio, 2),
                           curve=curve, records=records, compile_s=round(decoders[memory].compile_time_s, 1))
    for memory in ("pool", "job"):
        suffix = "" if memory == "job" else "_pool"
        out["tokens_per_step_ratio" + suffix] = round(out[memory]["tokens_per_step"] / out["record"]["tokens_per_step"], 3)
        out["ms_per_token_ratio" + suffix] = round(out[memory]["ms_per_token"] / out["record"]["ms_per_token"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loading.add_suite_arguments(p, "stories260k")
    p.add_argument("--configs", default="15:5:15,7:5:7",
                   help="comma-separated W:N:G[:LOOKUP:LEN:BUDGET] (1:2:0:1:10:10 = what the tuner picks on CPUs)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="the compiled fast path (else the same step eagerly)")
    p.add_argument("--check-greedy", action="store_true", help="also compare every output with HF greedy")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "job_memory"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    began = time.time()
    model, tokenizer, suite, prompts = loading.load_suite(args)
    rows = []
    for text in args.configs.split(","):
        row = run_job(model, prompts, tuple(map(int, text.split(":"))), args)
        rows.append(row)
        print(f"{args.model} {row['config']}: tokens/step record {row['record']['tokens_per_step']} pool "
              f"{row['pool']['tokens_per_step']} job {row['job']['tokens_per_step']} ({row['tokens_per_step_ratio']}x); "
              f"ms/token record {row['record']['ms_per_token']} pool {row['pool']['ms_per_token']} job "
              f"{row['job']['ms_per_token']} ({row['ms_per_token_ratio']}x); same tokens {row['same_tokens']}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, threads=args.threads, seconds=round(time.time() - began, 1),
               command=" ".join(sys.argv), date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    settings = dict(vars(args), prompts=suite, records=len(prompts))
    out.with_suffix(".json").write_text(json.dumps(dict(environment=env, settings=settings, rows=rows), indent=1))
    lines = [f"{args.model}, {len(prompts)} records of `{settings['prompts']}`, {args.max_new_tokens} new tokens each, "
             f"{'compiled' if args.compile else 'eager'} fast path", "",
             "(pool: the job's n-gram pool alone; job: the pool and the corpus of earlier texts that prompt lookup "
             "searches, the default)", "",
             "| W:N:G | tokens/step record | pool | job | pool / record | job / record | ms/token record | pool | job | "
             "pool / record | job / record | same tokens |", "| --- " * 12 + "|"]
    lines += [f"| {r['config']} | {r['record']['tokens_per_step']} | {r['pool']['tokens_per_step']} | "
              f"{r['job']['tokens_per_step']} | {r['tokens_per_step_ratio_pool']} | {r['tokens_per_step_ratio']} | "
              f"{r['record']['ms_per_token']} | {r['pool']['ms_per_token']} | {r['job']['ms_per_token']} | "
              f"{r['ms_per_token_ratio_pool']} | {r['ms_per_token_ratio']} | {r['same_tokens']} |" for r in rows]
    lines += ["", "full steps / plain steps, tokens a full step, and a full step's measured cost in plain steps:"]
    lines += [f"- {r['config']} {m}: {r[m]['full_steps']} / {r[m]['plain_steps']}, {r[m]['tokens_per_full_step']}, "
              f"{r[m]['cost_ratio']}" for r in rows for m in MEMORIES]
    lines += ["", "tokens/step of the job so far, record by record:"]
    lines += [f"- {r['config']} job: {r['job']['curve']}; pool: {r['pool']['curve']}; record: {r['record']['curve']}"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_tokens"] and r["greedy"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
