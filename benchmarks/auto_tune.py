"""Self-tuning against a grid of fixed settings: the same job (a suite's records in order, each to max_new_tokens)
decoded by lp's AutoDecoder from an empty step-cost cache, and by every fixed setting of the grid (the eager
reference engine and the compiled fast path), in one process.

python benchmarks/auto_tune.py --model default --max-new-tokens 256 --out benchmarks/results_published/auto_tune_code

The job's figure is what a user waits for: tokens over the whole wall time of the job, measuring the cost curve,
compiling and every record included (`job tok/s`); `decode tok/s` leaves compiling out. The methods take turns
record by record (this machine's load comes and goes: a method run alone for a minute can land in a slow spell);
auto starts from an empty step-cost cache. Inductor's FX-graph caches are off, every method compiles into a cache
folder of its own and inductor's in-memory caches are cleared before each generation, so no method reuses another's
compiled code (the kernels of auto's arm, loaded in this process, made its fixed twin's compile take half as long:
14.0 against 28.6 s on the 30k-token job); a throwaway compile first takes what only a
process's first compile costs (inductor's import and setup), which would otherwise fall on the first method to
compile. Every method's tokens are checked against auto's (and with --check-greedy against HF greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # every compile from scratch: no method borrows another's
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lp-inductor-"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._inductor.utils import clear_inductor_caches  # noqa: E402

from benchmarks import loading  # noqa: E402
from lp.auto_tune import AutoDecoder  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.decoding import Decoder  # noqa: E402
from lp.greedy_rules import hf_greedy  # noqa: E402
from lp.step_cost import CostStore  # noqa: E402

# W:N:G[:lookup:lookup_len:budget] and engine; the CLI's default before self-tuning is "reference 15:5:15"
GRID = ["reference 15:5:15", "reference 7:5:7", "reference 5:4:5", "reference 3:3:3", "reference 2:3:2",
        "reference 1:2:1", "compiled 1:2:0:1:10:10", "compiled 1:2:0:1:4:4", "compiled 2:3:2:2:10:10",
        "compiled 5:4:5", "compiled 7:5:7", "compiled 15:5:15"]


def fixed(model, spec: str) -> Decoder:
    engine, text = spec.split()
    values = list(map(int, text.split(":")))
    names = ("window", "ngram", "guess", "lookup", "lookup_len", "budget")
    return Decoder(model, LookaheadConfig(**dict(zip(names, values)), compile=engine == "compiled"))


def warm_the_compiler() -> float:
    """Compile a step of another model once, so that no method pays what only a process's first compile costs
    (importing inductor, finding the C++ toolchain: tens of seconds here), which a method's own process would
    pay whatever it compiled. Returns its seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    began = time.perf_counter()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=256)
    tiny = LlamaForCausalLM(config).eval()
    tiny.generation_config.eos_token_id = None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lp-inductor-warm-")
    Decoder(tiny, LookaheadConfig(window=1, ngram=2, guess=0, lookup=1, lookup_len=2, budget=2, compile=True)) \
        .generate([1, 2, 3, 1, 2], 4)
    return time.perf_counter() - began


class Job:
    """One method's decoder and its running figures over the job; each compiles into an inductor cache folder of
    its own (a method whose graphs equal another's, as auto's arm may equal a fixed setting, compiles them anew)."""

    def __init__(self, name: str, make):
        self.name, self.tokens, self.steps, self.fed, self.decode_s, self.outputs = name, 0, 0, 0, 0.0, []
        self.cache_dir = tempfile.mkdtemp(prefix="lp-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.cache_dir
        began = time.perf_counter()
        with torch.inference_mode():
            self.decoder = make()
        self.wall_s = time.perf_counter() - began  # auto measures its cost curve here (an empty cache)

    def run(self, prompt, max_new_tokens: int) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.cache_dir
        clear_inductor_caches()  # and none of the kernels another method compiled in this process (loaded in memory)
        began = time.perf_counter()
        result = self.decoder.generate(prompt.ids, max_new_tokens)
        self.wall_s += time.perf_counter() - began  # compiling included
        self.tokens, self.steps = self.tokens + result.new_tokens, self.steps + result.steps
        self.decode_s += result.wall_time_s
        self.fed += sum(result.tokens_fed_per_step)
        self.outputs.append(result.token_ids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loading.add_suite_arguments(p, "default")
    p.add_argument("--repeat", type=int, default=1, help="the suite this many times over (a longer job)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--grid", default=",".join(GRID), help="fixed settings, comma-separated: ENGINE W:N:G[:L:LEN:B]")
    p.add_argument("--check-greedy", action="store_true", help="also compare auto's outputs with HF greedy")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "auto_tune"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    began = time.time()
    model, tokenizer, suite, prompts = loading.load_suite(args)
    prompts = prompts * args.repeat
    warm_s = warm_the_compiler()
    print(f"warmed the compiler up in {warm_s:.1f} s (not counted)", flush=True)
    store = CostStore(Path(tempfile.mkdtemp(prefix="lp-costs-")) / "step_costs.json")  # an empty cache: tuning counts
    budget = args.max_new_tokens * len(prompts)
    jobs = [Job("auto", lambda: AutoDecoder(model, job_tokens=budget, store=store))]
    jobs += [Job(spec, lambda spec=spec: fixed(model, spec)) for spec in args.grid.split(",")]
    for n, prompt in enumerate(prompts):  # record by record, every method in turn (the order rotating), so the
        for job in jobs[n % len(jobs):] + jobs[: n % len(jobs)]:  # machine's slow and fast spells fall on all alike
            job.run(prompt, args.max_new_tokens)
        print(f"record {n + 1} of {len(prompts)}: auto ran {jobs[0].decoder.current}", flush=True)
    rows = []
    for job in jobs:
        settings = job.decoder.settings()
        row = dict(method=job.name, tokens=job.tokens, tokens_per_step=round(job.tokens / job.steps, 3),
                   job_tokens_per_s=round(job.tokens / job.wall_s, 1),
                   decode_tokens_per_s=round(job.tokens / job.decode_s, 1), wall_s=round(job.wall_s, 2),
                   other_s=round(job.wall_s - job.decode_s, 2), settings=settings,
                   same_as_auto=job.outputs == jobs[0].outputs, fed_per_step=round(job.fed / job.steps, 2),
                   ms_per_step=round(1e3 * job.decode_s / job.steps, 3), outputs=job.outputs)
        if job.name == "auto":
            chooser = job.decoder.chooser
            row["arms"] = dict(chooser.curve.observed)
            row["curve_ms"] = {t: round(1e3 * v, 3) for t, v in sorted(chooser.curve.points.items())}
            row["arm_tokens"] = {name: tally.tokens for name, tally in chooser.tallies.items() if tally.steps}
        rows.append(row)
        print(f"{args.model} {job.name}: job {row['job_tokens_per_s']} tok/s, decode {row['decode_tokens_per_s']} "
              f"tok/s, {row['tokens_per_step']} tokens/step, {row['wall_s']} s ({row['other_s']} s not decoding)",
              flush=True)
    greedy = None
    if args.check_greedy:
        greedy = all(out == hf_greedy(model, prompt.ids, args.max_new_tokens)
                     for out, prompt in zip(rows[0]["outputs"], prompts))
    for row in rows:
        del row["outputs"]
    best = max(rows[1:], key=lambda r: r["job_tokens_per_s"])
    default = next((r for r in rows if r["method"] == "reference 15:5:15"), None)
    auto = rows[0]
    summary = dict(auto_vs_best=round(auto["job_tokens_per_s"] / best["job_tokens_per_s"], 3), best=best["method"],
                   auto_vs_old_default=round(auto["job_tokens_per_s"] / default["job_tokens_per_s"], 3)
                   if default else None, greedy=greedy,
                   same_tokens=all(r["same_as_auto"] for r in rows[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, threads=args.threads, seconds=round(time.time() - began, 1),
               compiler_warm_up_s=round(warm_s, 1),
               command=" ".join(sys.argv), date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    settings = dict(vars(args), prompts=suite, records=len(prompts))
    out.with_suffix(".json").write_text(json.dumps(dict(environment=env, settings=settings, summary=summary,
                                                        rows=rows), indent=1))
    lines = [f"{args.model}, {len(prompts)} records of `{settings['prompts']}`, up to {args.max_new_tokens} new tokens "
             f"each, {args.threads} thread(s)", "",
             "| method | ran | tokens/step | job tok/s | decode tok/s | wall s | not decoding s | vs auto (job) |",
             "| --- " * 8 + "|"]
    for r in rows:
        ran = r["settings"].get("arm") or ""
        lines.append(f"| {r['method']} | {ran} | {r['tokens_per_step']} | {r['job_tokens_per_s']} | "
                     f"{r['decode_tokens_per_s']} | {r['wall_s']} | {r['other_s']} | "
                     f"{round(r['job_tokens_per_s'] / auto['job_tokens_per_s'], 3)} |")
    lines += ["", f"auto ran {rows[0]['arm_tokens']} (tokens by setting); auto / best fixed ({summary['best']}): "
              f"{summary['auto_vs_best']}; auto / the old default "
              f"(reference 15:5:15): {summary['auto_vs_old_default']}; same tokens: {summary['same_tokens']}"
              + (f"; HF greedy: {greedy}" if greedy is not None else "")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["same_tokens"] and greedy is not False else 1


if __name__ == "__main__":
    sys.exit(main())
