"""Self-tuning a batch: the setting `lp.auto_tune.choose_for_batch` picks for B lanes against every eager setting of
its menu, lp's old default, and HF's batched greedy, on the same job in one process.

python benchmarks/batch_tune.py --model default --batch-sizes 4,8 --out benchmarks/results_published/batch_tune_code

The job is a suite's records (each to --max-new-tokens), decoded B at a time in one forward a step
(BatchedDecoder.generate_many). Eager only (`--no-compile`'s menu): on a CPU compiling a batch's step takes
minutes, which a job of this size never pays back. The methods take turns job by job, --rounds times (each
round starting one method later), and each method's rate is its tokens over its summed wall time. `auto` runs
twice: from an empty step-cost cache (a job's first run, measuring the curve included) and from a cached curve
(every later run). Every lp method's tokens are checked against the default's (all are exact greedy); HF batched
greedy's (left padding, `throughput.hf_batch`) are reported beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import loading  # noqa: E402
from benchmarks.throughput import hf_batch  # noqa: E402
from lp.auto_tune import batch_menu, choose_for_batch  # noqa: E402
from lp.batched_decoding import BatchedDecoder  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.step_cost import CostStore, step_costs  # noqa: E402


def lp_job(model, config: LookaheadConfig, lanes: int, prompts, max_new: int) -> list[list[int]]:
    decoder = BatchedDecoder(model, config, lanes, compile=False)
    return [r.token_ids for r in decoder.generate_many([p.ids for p in prompts], max_new)]


def auto_job(model, lanes: int, prompts, max_new: int, picks: list, store: CostStore | None = None
             ) -> list[list[int]]:
    """What `launch/run.py --batch-size B` does with no shape setting: read the cost curve (measure it into an empty
    cache when no store is given: a first run), choose, decode."""
    store = store or CostStore(Path(tempfile.mkdtemp(prefix="lp-cost-")) / "costs.json")
    base = LookaheadConfig(compile=False)
    arm, _ = choose_for_batch(model, base, lanes, len(prompts) * max_new, store=store)
    picks.append(arm.name)
    return lp_job(model, arm.config(base), lanes, prompts, max_new)


def hf_job(model, tokenizer, lanes: int, prompts, max_new: int) -> list[list[int]]:
    """HF greedy, `lanes` prompts a generate (left padding), as benchmarks/throughput.py runs it."""
    return [out for i in range(0, len(prompts), lanes)
            for out in hf_batch(model, tokenizer, [p.text for p in prompts[i: i + lanes]], max_new)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    loading.add_suite_arguments(p, "default")
    p.add_argument("--batch-sizes", default="4,8")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="times each method decodes the job (taking turns)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "batch_tune"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, suite, prompts = loading.load_suite(args)
    rows = []
    cached = CostStore(Path(tempfile.mkdtemp(prefix="lp-cost-")) / "costs.json")
    step_costs(model, cached)  # what a later run of a job finds: the curve an earlier one measured
    for lanes in [int(b) for b in args.batch_sizes.split(",")]:
        picks: list[str] = []
        methods = {"auto, first run (measures the curve)": lambda: auto_job(model, lanes, prompts,
                                                                            args.max_new_tokens, picks),
                   "auto, later runs (cached curve)": lambda: auto_job(model, lanes, prompts, args.max_new_tokens,
                                                                       picks, cached),
                   "default (15,5,15), --no-auto-tune": lambda: lp_job(model, LookaheadConfig(compile=False), lanes,
                                                                        prompts, args.max_new_tokens)}
        for arm in batch_menu("cpu", False):
            config = arm.config(LookaheadConfig())
            methods[f"fixed: {arm.name}"] = lambda c=config: lp_job(model, c, lanes, prompts, args.max_new_tokens)
        methods[f"HF generate batched B={lanes}, left padding"] = lambda: hf_job(model, tokenizer, lanes, prompts,
                                                                               args.max_new_tokens)
        seconds = dict.fromkeys(methods, 0.0)
        outputs: dict[str, list] = {}
        names = list(methods)
        lp_job(model, LookaheadConfig(), lanes, prompts[:lanes], 8)  # untimed: what only a process's first job costs
        hf_job(model, tokenizer, lanes, prompts[:lanes], 8)
        for round_ in range(args.rounds):  # each round starts one method later: no method always follows another
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                run = methods[name]
                start = time.perf_counter()
                outputs[name] = run()
                seconds[name] += time.perf_counter() - start
        reference = outputs["default (15,5,15), --no-auto-tune"]
        for name in methods:
            tokens = sum(len(o) for o in outputs[name]) * args.rounds
            rows.append(dict(batch=lanes, method=name, tokens_per_s=round(tokens / seconds[name], 1),
                             wall_s=round(seconds[name], 2), same_tokens_as_default=outputs[name] == reference,
                             **({"picked": sorted(set(picks))} if name.startswith("auto") else {})))
        best = max(r["tokens_per_s"] for r in rows if r["batch"] == lanes and r["method"].startswith("fixed"))
        for r in rows:
            if r["batch"] == lanes:
                r["vs_best_fixed"] = round(r["tokens_per_s"] / best, 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(suite=suite, model=args.model, records=len(prompts), max_new_tokens=args.max_new_tokens,
                  rounds=args.rounds, threads=args.threads, torch=torch.__version__, rows=rows)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| B | method | tokens/s | vs best fixed | same tokens as default |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['method']}{' -> ' + ', '.join(r['picked']) if 'picked' in r else ''} | "
              f"{r['tokens_per_s']} | {r['vs_best_fixed']} | {r['same_tokens_as_default']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
