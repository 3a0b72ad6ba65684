"""CPU report of lp's compiled fast path against transformers' greedy (eager and compiled) and prompt lookup.

python benchmarks/fast_path.py --out benchmarks/results_published/fast_path_cpu

For each model (`default`, `stories260k`; one that is absent is skipped with a line saying so) it times, in one
process with one torch thread, interleaved prompt by prompt and repeated: HF greedy (eager), HF greedy with a
static cache and torch.compile, HF prompt lookup, and for every W:N:G lp's eager reference engine
(`lp.Decoder`) and lp's compiled fast path (`lp.fast_decoding.FastDecoder`). It reports per method ms per step
(mean, step 1 with the prefill left out), tokens per step, ms per token, tokens/s, the ratio against HF greedy,
the untimed warm-up (compiling included) and the fast path's own compile time, and checks every output against
HF greedy. Then the cost of one forward of T tokens through lp's SlotCache, eager and compiled, for T = 1..128.
Writes OUT.md and OUT.json (environment, git commit and whether the tree was dirty, settings, every row).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import loading, report, sweep  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.decoding import cache_argument  # noqa: E402
from lp.slot_cache import SlotCache  # noqa: E402

CONFIGS = "15:5:15,7:5:7,5:4:5,2:3:1,2:3:2,1:3:2,3:3:3"
FORWARD_TOKENS = "1,2,4,8,16,32,64,128"
NAMES = {"hf_greedy": "HF greedy (eager)", "hf_greedy_compiled": "HF greedy, static cache + compiled",
         "lookahead": "lp eager reference", "lookahead_compiled": "lp compiled fast path"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["default", "stories260k"],
                   help="model specs, as benchmarks/loading.py reads them")
    p.add_argument("--configs", default=CONFIGS, help="W:N:G list")
    p.add_argument("--limit", type=int, default=5, help="first LIMIT prompts of each model's suite")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method (compiled ones: per compiled shape)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-lookup", type=int, default=10, help="HF prompt_lookup_num_tokens (0 = skip)")
    p.add_argument("--forward-tokens", default=FORWARD_TOKENS, help="T values of the forward-latency table ('' = skip)")
    p.add_argument("--forward-capacity", type=int, default=512, help="SlotCache capacity of the forward table")
    p.add_argument("--forward-prefix", type=int, default=256, help="cache entries before the T fed tokens")
    p.add_argument("--forward-iters", type=int, default=30, help="timed calls per T (median reported)")
    p.add_argument("--warm-compile-cache", action="store_true", help="use inductor's usual on-disk cache (faster "
                   "reruns, but then compile times are not those of a first compile); default: a fresh empty one")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fast_path_cpu"),
                   help="output path without extension: writes OUT.md and OUT.json")
    return p


def time_generation(args, model, prompts, configs, bar) -> tuple[list[dict], dict]:
    """Every method warmed up, then timed `repeats` times over the prompts, interleaved prompt by prompt (the
    sweep's own in-process machinery); the rows (HF first, then each W:N:G eager and compiled) and what compiled."""
    opts = argparse.Namespace(no_greedy=False, prompt_lookup=[args.prompt_lookup], max_new_tokens=args.max_new_tokens,
                              nproc=[1], compile=True, warmup=args.warmup)
    methods = sweep.in_process_methods(opts, model, configs)
    warm = sweep.warm_up(opts, methods, prompts)
    graphs = sweep.graphs_compiled()
    runs = []
    for repeat in range(args.repeats):
        runs += sweep.in_process(methods, prompts, repeat, bar)
    rows = report.aggregate(runs, {key: info["warmup_s"] for key, info in warm.items()})
    greedy_c = next((r for r in rows if r["method"] == "hf_greedy_compiled"), None)
    for row in rows:
        info = warm.get(report.config_key(row), {})
        tokens = row["new_tokens"]
        row.update(ms_per_token=round(1e3 * row["wall_s"] / tokens, 4) if tokens else None,
                   vs_greedy_compiled=round(greedy_c["wall_s"] / row["wall_s"], 3) if greedy_c else None,
                   compile_s=info.get("compile_s"), graphs_compiled=info.get("graphs_compiled"),
                   compile_error=info.get("compile_error"))
    order = [r for r in rows if r["method"].startswith("hf_")]
    order.sort(key=lambda r: ["hf_greedy", "hf_greedy_compiled", "hf_prompt_lookup"].index(r["method"]))
    for cfg in configs:  # each W:N:G's eager and compiled rows side by side
        order += [r for r in rows if r["method"] in ("lookahead", "lookahead_compiled")
                  and (r["window"], r["ngram"], r["guess"]) == (cfg.window, cfg.ngram, cfg.guess)]
    timing = dict(graphs_compiled_while_timing=sweep.graphs_compiled() - graphs,
                  compile_s_while_timing=round(sum(r["compile_s"] for r in runs), 3),
                  greedy_tokens={r["prompt"]: len(r["tokens"]) for r in runs
                                 if r["method"] == "hf_greedy" and r["repeat"] == 0})
    return order, timing


def forward_table(args, model, bar) -> list[dict]:
    """Median latency of one model forward of T tokens through a SlotCache (eager, then compiled per T)."""
    capacity, prefix = args.forward_capacity, args.forward_prefix
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    cache_arg = cache_argument(model)
    out = []
    for t in [int(x) for x in args.forward_tokens.split(",") if x.strip()]:
        if prefix + t > capacity:
            raise ValueError(f"--forward-prefix {prefix} + T {t} exceeds --forward-capacity {capacity}")
        torch._dynamo.reset()  # one graph per T, each compiled from scratch (and clear of dynamo's recompile limit)
        cache = SlotCache(layers, capacity, device)
        cache.length.fill_(prefix)
        cache.slots = torch.arange(prefix, prefix + t, device=device)
        ids = torch.randint(3, model.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t)).to(device)
        positions = cache.slots[None].clone()
        visible = torch.arange(capacity, device=device)[None, :] <= positions[0, :, None]  # prefix + causal block
        mask = torch.zeros(t, capacity, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
        mask = mask[None, None]

        def forward(ids, positions, mask):
            return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         **{cache_arg: cache}).logits

        def median_ms(fn) -> float:
            times = []
            for _ in range(args.forward_iters):
                began = time.perf_counter()
                fn(ids, positions, mask)
                times.append(time.perf_counter() - began)
            return 1e3 * statistics.median(times)

        with torch.inference_mode():
            for _ in range(3):  # also initialises the cache's buffers outside any compiled graph
                forward(ids, positions, mask)
            eager = median_ms(forward)
            compiled = torch.compile(forward, fullgraph=True, dynamic=False)
            began = time.perf_counter()
            compiled(ids, positions, mask)
            compile_s = time.perf_counter() - began
            graphs = sweep.graphs_compiled()
            for _ in range(2):
                compiled(ids, positions, mask)
            fast = median_ms(compiled)
            recompiled = sweep.graphs_compiled() - graphs
        out.append(dict(tokens=t, eager_ms=round(eager, 3), compiled_ms=round(fast, 3),
                        compile_s=round(compile_s, 2), recompiles_after_first_call=recompiled))
        bar.update()
    torch._dynamo.reset()
    base = out[0]["compiled_ms"] if out else None
    for row in out:
        row["compiled_vs_eager"] = round(row["eager_ms"] / row["compiled_ms"], 3)
        row["compiled_vs_first_t"] = round(row["compiled_ms"] / base, 3)
    return out


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else report._fmt(value, digits)


def markdown(result: dict) -> str:
    env, st = result["environment"], result["settings"]
    lines = [f"# lp fast path on CPU ({env['date_utc']})", "",
             f"{env['cpu']} ({env['cpus_usable']} usable cores), {st['threads']} torch thread(s), "
             f"torch {env['torch']}, "
             f"transformers {env['transformers']}, Python {env['python']}; git {env['git_commit']}"
             f"{' (dirty tree)' if env['git_dirty'] else ''}; load average {env['loadavg_start']} at start, "
             f"{env['loadavg_end']} at end.", "",
             f"Command: `{env['command']}`", "",
             f"{st['max_new_tokens']} new tokens, the first {st['limit']} prompts of each model's suite, "
             f"{st['repeats']} repeats after warm-up, methods interleaved prompt by prompt; float32. ms/step: mean "
             "over steps, step 1 (prefill) left out; ms/token, tokens/s and ratios: wall time summed over prompts "
             "(prefill included, compiling excluded), mean of repeats. `vs HF greedy` = HF greedy (eager) wall time "
             "/ the row's. Warm-up: untimed runs (compiling included; compiled methods warm up every shape they "
             "compile). Compile: the fast path's own measure of its compile time."
             + (" Compile caches: a fresh, empty inductor cache (first-compile times)." if not st["warm_compile_cache"]
                else " Compile caches: inductor's usual on-disk cache (times may be of cache hits).")]
    cols = ["method", "W,N,G", "fed/step", "tokens/step", "ms/step", "ms/token", "tokens/s", "vs HF greedy",
            "vs HF compiled", "warm-up s", "compile s", "= greedy"]
    for model in result["models"]:
        lines += ["", f"## {model['model']}", ""]
        if model.get("skipped"):
            lines.append(f"skipped: {model['skipped']}")
            continue
        lines += [f"{model['description']}; prompts: {', '.join(model['prompt_ids'])}.", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in model["rows"]:
            wng = f"{r['window']},{r['ngram']},{r['guess']}" if r["window"] else "-"
            name = NAMES.get(r["method"]) or f"HF prompt lookup (K={r['prompt_lookup']})"
            fed = {"hf_greedy": "1", "hf_greedy_compiled": "1", "hf_prompt_lookup": f"<= {1 + r['prompt_lookup']}"}
            cells = [name, wng, fed.get(r["method"]) or _f(r["fed_per_step_max"], 1), _f(r["tokens_per_step"]),
                     _f(r["step_ms_mean"]),
                     _f(r["ms_per_token"]), _f(r["tokens_per_s"], 1), _f(r["speedup_vs_greedy"]),
                     _f(r["vs_greedy_compiled"]), _f(r["warmup_s"], 1), _f(r["compile_s"], 1),
                     _f(r["matched_greedy"])]
            lines.append("| " + " | ".join(cells) + " |")
        t = model["timing"]
        lines += ["", f"Graphs compiled during the timed runs: {t['graphs_compiled_while_timing']} (fast-path compile "
                  f"time inside them: {t['compile_s_while_timing']} s). New tokens per prompt (HF greedy): "
                  + ", ".join(f"{k} {v}" for k, v in t["greedy_tokens"].items()) + "."]
        if model["forward"]:
            first = model["forward"][0]["tokens"]
            lines += ["", f"Model forward of T tokens through a SlotCache of {st['forward_capacity']} with "
                      f"{st['forward_prefix']} entries before them (4-D float mask, explicit positions, logits for "
                      f"all T rows); median of {st['forward_iters']} calls; compiled = torch.compile(fullgraph=True, "
                      "dynamic=False), one graph per T.", "",
                      f"| T | eager ms | compiled ms | eager / compiled | compiled vs T={first} | compile s |",
                      "|---|---|---|---|---|---|"]
            for f in model["forward"]:
                lines.append(f"| {f['tokens']} | {f['eager_ms']:.3f} | {f['compiled_ms']:.3f} | "
                             f"{f['compiled_vs_eager']:.2f} | {f['compiled_vs_first_t']:.2f} | {f['compile_s']:.1f} |")
    lines.append("")
    lines.append("All outputs equal HF greedy: " + ("yes" if result["all_equal_greedy"] else "**NO**") + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.warm_compile_cache:  # compile times of a first compile, not of inductor's on-disk cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lp-inductor-")
    torch.set_num_threads(args.threads)
    configs = [LookaheadConfig(*map(int, c.split(":"))) for c in args.configs.split(",") if c]
    env = report.environment(args.threads)
    env["git_dirty_files"] = [line.split(maxsplit=1)[1] for line in report._git("status", "--porcelain").splitlines()]
    settings = dict(models=args.models, configs=args.configs, limit=args.limit,
                    max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                    prompt_lookup=args.prompt_lookup, forward_tokens=args.forward_tokens,
                    forward_capacity=args.forward_capacity, forward_prefix=args.forward_prefix,
                    forward_iters=args.forward_iters, warm_compile_cache=args.warm_compile_cache, dtype="float32")
    models = []
    loaded = []
    for spec in settings["models"]:
        try:
            model, tokenizer = loading.load_model(spec)
        except loading.ModelUnavailable as error:
            print(f"skipped: {error}", file=sys.stderr)
            loaded.append((spec, None, str(error)))
            continue
        prompts = loading.load_prompts(loading.default_suite(spec), tokenizer, model.config.vocab_size, args.limit)
        loaded.append((spec, model, prompts))
    methods = 2 + bool(args.prompt_lookup) + 2 * len(configs)
    forwards = len([x for x in args.forward_tokens.split(",") if x.strip()])
    total = sum(args.repeats * len(ps) * methods + forwards for _, m, ps in loaded if m is not None)
    with tqdm(total=total, desc="fast path", unit="run", file=sys.stderr) as bar:
        for spec, model, prompts in loaded:  # in the order given; an absent model keeps its place, skipped
            if model is None:
                models.append(dict(model=spec, skipped=prompts))
                continue
            c = model.config
            rows, timing = time_generation(args, model, prompts, configs, bar)
            forward = forward_table(args, model, bar)
            models.append(dict(model=spec, prompt_suite=sweep.shown(loading.default_suite(spec)),
                               prompt_ids=[p.id for p in prompts], prompt_tokens=[len(p.ids) for p in prompts],
                               description=f"{type(model).__name__}, hidden {c.hidden_size}, {c.num_hidden_layers} "
                                           f"layers, vocab {c.vocab_size}, "
                                           f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters",
                               rows=rows, timing=timing, forward=forward))
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    equal = all(r["matched_greedy"] for m in models for r in m.get("rows", []))
    result = dict(environment=env, settings=settings, models=models, all_equal_greedy=equal)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    if not equal:
        print("error: some output differs from HF greedy (column = greedy)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
