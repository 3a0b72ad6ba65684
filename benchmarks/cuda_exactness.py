"""Whether, and where, the compiled fast path stops being exact on a device, at the shape a GPU runs.

python benchmarks/cuda_exactness.py --part generations --out DIR   every variant's generations against greedy
python benchmarks/cuda_exactness.py --part pieces                  one step's pieces, eager vs compiled, one state
python benchmarks/cuda_exactness.py --part bisect                  a variant under one inductor option at a time
python benchmarks/cuda_exactness.py --part one --variant whole --tokens 16   one generation (for compute-sanitizer)
python benchmarks/cuda_exactness.py --smoke ...                    the same code, small, on the CPU

The shape (what CUDA runs by default): the embedded code model in float64 (no near-tie flips), (15,5,15), prompt
lookup 2, a tree of 60 tokens, plain steps off: 121 tokens fed a step. Prompts 0 and 1 (20 and 10 tokens) fall in
the 256-slot cache bucket, prompt 2 (56 tokens) and prompt 0 with 300 new tokens in the 512-slot one. On an H200
(torch 2.11) the compiled step, then one graph under cudagraph trees, was wrong for prompts 0 and 1 from the first
tokens and right for prompt 2 (results_published/gpu_h200/). The variants: the step compiled split (the forward a
graph of its own) or whole, each with and without the step replayed from one CUDA graph, and the eager step with
and without it. Each part prints one line per finding and `--out` gets a JSON summary; `--budget-s` skips what would
start late.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import lp  # noqa: E402
from lp.candidate_tree import prompt_lookup  # noqa: E402
from lp.default_model import DEFAULT_PROMPTS, load_default_model  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from lp.graph_check import StaleReadCheck  # noqa: E402
from lp.greedy_rules import greedy_rules, hf_greedy  # noqa: E402

BEGAN = time.time()
SHAPE = dict(window=15, ngram=5, guess=15, lookup=2, budget=60, plain_steps=False)
VARIANTS = {  # name: FastDecoder's compile flag and the step's graph settings
    "split-graph": (True, dict(step_graphs="split", cuda_graphs=True)),
    "whole-graph": (True, dict(step_graphs="whole", cuda_graphs=True)),
    "split": (True, dict(step_graphs="split", cuda_graphs=False)),
    "whole": (True, dict(step_graphs="whole", cuda_graphs=False)),
    "eager-graph": (False, dict(cuda_graphs=True)),
    "eager": (False, dict(cuda_graphs=False)),
}
# (prompt index, new tokens): the first two in the 256-slot bucket, the last two in the 512-slot one
RUNS = [(0, 96), (1, 96), (2, 96), (0, 300)]
OTHER_SETTINGS = {"lookup 0": dict(SHAPE, lookup=0), "(7,5,7)": dict(SHAPE, window=7, guess=7, budget=None),
                  "(1,2,0) lookup 1 budget 10": dict(window=1, ngram=2, guess=0, lookup=1, budget=10)}
INDUCTOR_OPTIONS = [("as is", {}), ("allow_buffer_reuse=False", {"allow_buffer_reuse": False}),
                    ("inplace_buffers=False", {"inplace_buffers": False}),
                    ("triton.persistent_reductions=False", {"triton.persistent_reductions": False}),
                    ("triton.autotune_pointwise=False", {"triton.autotune_pointwise": False}),
                    ("deterministic", {"deterministic": True, "fallback_random": True})]


def log(*parts) -> None:
    print(f"[{time.time() - BEGAN:6.1f}s]", *parts, flush=True)


def rows_merged(config: lp.LookaheadConfig) -> int:
    """Candidate rows the tree merges a step: prompt lookup's, then the pool's (each chained `chain` ways)."""
    return config.lookup_count + config.guess * (config.chain_count or 1)


def first_wrong(got: list[int], want: list[int]) -> int | None:
    bad = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
    return bad if bad is not None or len(got) == len(want) else min(len(got), len(want))


def check(model, prompts, name: str, compiled: bool, settings: dict, runs, summary: dict, backend="inductor") -> None:
    """Generate every run with one decoder of these settings and log the first token that differs from greedy."""
    torch._dynamo.reset()
    config = lp.LookaheadConfig(**settings)
    decoder = FastDecoder(model, config, compile=compiled)
    decoder.compile_backend = backend
    found = summary.setdefault(name, {})
    for index, tokens in runs:
        began = time.time()
        got = decoder.generate(prompts[index], tokens)
        want = hf_greedy(model, prompts[index], tokens)
        bad = first_wrong(got.token_ids, want)
        found[f"prompt {index}, {tokens} tokens"] = "ok" if bad is None else f"first wrong at {bad}"
        log(f"{name}, prompt {index} ({len(prompts[index])} tokens), {tokens} new: "
            f"{'ok' if bad is None else f'FIRST WRONG AT {bad}'}; accepted {got.accepted_per_step[:8]}, "
            f"{got.steps} steps, {rows_merged(config)} tree rows, buckets {sorted(decoder._steps)}, "
            f"compile error {decoder.compile_error}, {time.time() - began:.1f} s")
    found["compile_error"] = decoder.compile_error


def generations(model, prompts, args, summary: dict) -> None:
    """Every variant at the shape, then other settings on the first variant."""
    for name, (compiled, graphs) in VARIANTS.items():
        if args.smoke and name not in ("split", "whole", "eager"):
            continue
        if time.time() - BEGAN > args.budget_s:
            log(f"{name}: skipped (past --budget-s)")
            continue
        check(model, prompts, name, compiled, dict(SHAPE, **graphs), args.runs, summary)
    for name, settings in list(OTHER_SETTINGS.items())[: 1 if args.smoke else None]:
        if time.time() - BEGAN > args.budget_s:
            log(f"{name}: skipped (past --budget-s)")
            continue
        check(model, prompts, f"split-graph {name}", True, dict(settings, **VARIANTS["split-graph"][1]),
              args.runs[:2], summary)


def bisect(model, prompts, args, summary: dict) -> None:
    """The whole-step variant without CUDA graphs (the one that failed) under one inductor option at a time, and
    under the aot_eager backend (graph capture without code generation)."""
    runs = args.runs[:2]
    for label, options in INDUCTOR_OPTIONS[: 2 if args.smoke else None]:
        if time.time() - BEGAN > args.budget_s:
            log(f"bisect {label}: skipped (past --budget-s)")
            continue
        with torch._inductor.config.patch(options):
            check(model, prompts, f"bisect whole, {label}", True, dict(SHAPE, **VARIANTS["whole"][1]), runs, summary)
    if time.time() - BEGAN <= args.budget_s:
        check(model, prompts, "bisect whole, backend aot_eager", True, dict(SHAPE, **VARIANTS["whole"][1]), runs,
              summary, backend="aot_eager")


def pieces(model, prompt: list[int], summary: dict) -> None:
    """One (15,5,15) step after its prefill: each piece compiled alone (with lp's stale-read check) against eager,
    from the same saved state; then six whole steps both ways."""
    decoder = FastDecoder(model, lp.LookaheadConfig(**SHAPE), compile=False)
    step = decoder._step(len(prompt) + 96, greedy_rules(model.generation_config, len(prompt), 96))
    pool, window = decoder.initial_state(prompt, decoder.seed)
    step.start(prompt, pool, window, decoder.seed)
    log(f"pieces: prompt {len(prompt)} tokens, capacity {step.capacity}, {step.tokens} tokens fed a step")
    names = ["window", "head", "pending", "pending_count", "history", "history_len", "prompt_len", "seed",
             "fingerprint", "step_slots", "out", "kept", "length"]
    found = summary.setdefault("pieces", {})

    def state() -> dict[str, torch.Tensor]:
        tensors = {n: getattr(step, n) for n in names}
        tensors.update({f"pool.{n}": getattr(step.pool, n) for n in ("tokens", "count", "next")})
        for i, layer in enumerate(step.cache.layers):
            tensors[f"keys{i}"], tensors[f"values{i}"] = layer.keys, layer.values
        return tensors

    def save() -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in state().items()}

    def load(saved) -> None:
        for n, t in state().items():
            t.copy_(saved[n])

    def both(name: str, fn, base) -> None:
        load(base)
        eager = copied(fn())
        after_eager = save()
        load(base)
        began = time.time()
        torch._dynamo.reset()
        try:
            compiled = copied(torch.compile(fn, fullgraph=True, dynamic=False,
                                            options={"post_grad_custom_post_pass": StaleReadCheck()})())
        except Exception as error:  # the stale-read check, or the compiler itself
            found[name] = f"compile failed: {str(error).strip().splitlines()[0][:300]}"
            log(f"== {name}: COMPILE FAILED: {found[name]}")
            return
        differences = compare(name, eager, compiled)
        after = save()
        differences += [compare(f"   state {n}", e, after[n])[0] for n, e in after_eager.items()
                        if not close(e, after[n])]
        found[name] = "; ".join(differences) or "ok"
        log(f"== {name} ({time.time() - began:.1f} s): {found[name]}")

    start = save()
    both("prompt_lookup", lambda: prompt_lookup(step.history, step.history_len, step.shape.lookup,
                                                step.shape.lookup_len), start)
    both("tree", step._tree, start)
    both("prepare", step.prepare, start)
    load(start)
    fed = step.prepare()
    prepared = save()
    logits = step.forward(fed.tokens, fed.positions, fed.mask).clone()
    after_forward = save()
    both("forward", lambda: step.forward(fed.tokens, fed.positions, fed.mask), prepared)
    both("finish", lambda: step.finish(logits, fed), after_forward)
    load(after_forward)
    row, keep = step.finish(logits, fed)
    both("commit", lambda: step.commit(row[None], keep), after_forward)
    both("local", step.local, start)
    both("solo", step.solo, start)
    torch._dynamo.reset()
    solo = torch.compile(step.solo, fullgraph=True, dynamic=False)
    base = start
    for k in range(6):
        load(base)
        eager = step.solo().clone()
        after_eager = save()
        load(base)
        compiled = solo().clone()
        same = torch.equal(eager, compiled)
        found[f"step {k + 1}"] = "same" if same else f"DIFFERENT: eager {eager.tolist()} compiled {compiled.tolist()}"
        log(f"step {k + 1}: eager {eager.tolist()} compiled {compiled.tolist()} {'same' if same else 'DIFFERENT'}")
        base = after_eager


def copied(x):
    if isinstance(x, tuple):
        return tuple(copied(t) for t in x)
    if hasattr(x, "__dataclass_fields__"):
        return {f: copied(getattr(x, f)) for f in x.__dataclass_fields__}
    return x.clone() if isinstance(x, torch.Tensor) else x


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        return bool(torch.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True).all())
    return torch.equal(a, b)


def compare(name: str, eager, compiled) -> list[str]:
    """Where two results (tensors, tuples or dicts of them) differ: one short line each, none when equal."""
    if isinstance(eager, (tuple, list)):
        return [d for i, (e, c) in enumerate(zip(eager, compiled)) for d in compare(f"{name}[{i}]", e, c)]
    if isinstance(eager, dict):
        return [d for k in eager for d in compare(f"{name}.{k}", eager[k], compiled[k])]
    if not isinstance(eager, torch.Tensor) or close(eager, compiled):
        return []
    if eager.dtype.is_floating_point:
        gap = (eager - compiled).abs().nan_to_num(0).max().item()
        return [f"{name} max |eager - compiled| {gap:.3g}, NaN {eager.isnan().sum().item()} / "
                f"{compiled.isnan().sum().item()}"]
    where = (eager != compiled).nonzero()[:4]
    return [f"{name} differs at {where.tolist()}: eager {[eager[tuple(i)].item() for i in where]} compiled "
            f"{[compiled[tuple(i)].item() for i in where]}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["generations", "pieces", "bisect", "one", "all"], default="all")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="whole", help="for --part one")
    p.add_argument("--tokens", type=int, default=16, help="new tokens for --part one")
    p.add_argument("--budget-s", type=float, default=400, help="start no check after this many seconds")
    p.add_argument("--out", help="a folder for the JSON summary (cuda_exactness_<part>.json)")
    p.add_argument("--smoke", action="store_true", help="the CPU, few and short runs: the code, not a measurement")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        torch.set_num_threads(1)
    args.runs = [(0, 24), (2, 24)] if args.smoke else RUNS
    model, tokenizer = load_default_model(torch.float64, device)
    prompts = [tokenizer(text)["input_ids"] for text in DEFAULT_PROMPTS[:3]]
    summary = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                   part=args.part)
    log(f"{summary['device']}: torch {torch.__version__}, part {args.part}")
    with torch.inference_mode():
        if args.part == "one":
            compiled, graphs = VARIANTS[args.variant]
            check(model, prompts, args.variant, compiled, dict(SHAPE, **graphs), [(0, args.tokens)], summary)
        if args.part in ("generations", "all"):
            generations(model, prompts, args, summary)
        if args.part in ("pieces", "all"):
            pieces(model, prompts[0], summary)
        if args.part in ("bisect", "all"):
            bisect(model, prompts, args, summary)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"cuda_exactness_{args.part}.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
