"""Sweep lookahead decoding over a grid, against HF greedy and HF prompt lookup measured in the same run.

python benchmarks/sweep.py --model stories260k --window 15,7 --ngram 5 --guess 15 --nproc 1,2 \
    --kv-sync recompute,gather --max-new-tokens 256 --repeats 3 --warmup 1 [--compile]
python benchmarks/sweep.py --configs 15:5:15:0,15:5:15:2:10,1:2:0:1:10:10 --compile   # W:N:G[:LOOKUP[:LEN[:BUDGET]]]
Writes results.csv, results.json, results.md, runs.json and three PNG plots into --out; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import loading, plots, report  # noqa: E402
from benchmarks.timing import hf_compile_config, time_hf, time_lookahead  # noqa: E402
from lp.config import ConfigError, LookaheadConfig  # noqa: E402
from lp.decoding import Decoder  # noqa: E402
from lp.distributed.bootstrap import free_port  # noqa: E402
from lp.fast_decoding import FastDecoder, capacity_bucket  # noqa: E402

WORKER = Path(__file__).resolve().with_name("rank_worker.py")
HF_KEYS = dict(window=None, ngram=None, guess=None, lookup=None, lookup_len=None, chain=None, budget=None, plain=None,
               ranks=1, tp=1, kv_sync=None)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="stories260k", help='path or hub id, "default", "stories260k", or '
                   '"random-llama:hidden=768,layers=4,heads=12,vocab=32000"')
    p.add_argument("--prompts", help="JSONL suite (default: prompts/code.jsonl for the default model, else stories)")
    p.add_argument("--limit", type=int, help="use only the first LIMIT prompts")
    p.add_argument("--window", type=int_list, default=[15])
    p.add_argument("--ngram", type=int_list, default=[5])
    p.add_argument("--guess", type=int_list, default=[15])
    p.add_argument("--configs", type=config_list, help="explicit W:N:G[:LOOKUP[:LOOKUP_LEN[:BUDGET[:CHAIN[:PLAIN]]]]] "
                   "list instead of the grid, e.g. 15:5:15:0,15:5:15:2:10,1:2:0:1:10:10,15:5:15:::60:0,1:2:0:1:4:4::1 "
                   "(LOOKUP: prompt-lookup candidates a step, 0 = pool only, the eager engine's policy; LOOKUP_LEN: "
                   "tokens each; BUDGET: tokens fed for candidates; CHAIN: continuations chained onto each pool "
                   "candidate; PLAIN: 1 = a step with no candidate feeds one token, 0 = it runs whole; an empty field "
                   "keeps the default; a LOOKUP, CHAIN > 0, BUDGET or PLAIN = 1 runs on lp's fast path only: --compile "
                   "or --fast-eager)")
    p.add_argument("--nproc", type=int_list, default=[1], help="ranks; 1 = one process (no process group)")
    p.add_argument("--tp", type=int_list, default=[1], help="tensor-parallel ranks per replica (DeepSpeed AutoTP) "
                   "for P>1 teams: --nproc 2 --tp 2 is TP only, --nproc 4 --tp 2 is 2 replicas x TP 2")
    p.add_argument("--kv-sync", default="recompute,gather", help="KV strategies for P>1: recompute,gather")
    p.add_argument("--prompt-lookup", type=int_list, default=[10], help="HF prompt_lookup_num_tokens values; 0 = skip")
    p.add_argument("--no-greedy", action="store_true", help="skip HF greedy (then no speedups and no exactness check)")
    p.add_argument("--compile", action="store_true", help="also time, in this process, hf_greedy_compiled (generate "
                   "with a static cache and torch.compile) and lookahead_compiled (lp's FastDecoder) per W:N:G; their "
                   "compiling happens in untimed warm-up runs, reported apart (warmup_s)")
    p.add_argument("--fast-eager", action="store_true", help="also time lookahead_fast_eager: lp's fast path "
                   "(FastDecoder) not compiled, per config; its tokens per step without compiling anything")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each configuration on the first prompt")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process (each rank too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--out", help="output folder (default benchmarks/results/<model>-<time>)")
    p.add_argument("--fault-timeout", type=float, default=300)
    p.add_argument("--no-plots", action="store_true")
    return p


CONFIG_FIELDS = ("window", "ngram", "guess", "lookup", "lookup_len", "budget", "chain", "plain_steps")


def config_value(field: str, text: str):
    """One config field's value: an integer, or for plain_steps 0 or 1 (anything else is refused by the config)."""
    value = int(text)
    return bool(value) if field == "plain_steps" and value in (0, 1) else value


def config_list(text: str) -> list[LookaheadConfig]:
    """W:N:G[:LOOKUP[:LOOKUP_LEN[:BUDGET[:CHAIN[:PLAIN]]]]],... as lookahead configs (argparse type: a bad entry is
    a usage error); an empty field keeps the default ("15:5:15:::60:0")."""
    configs = []
    for entry in filter(None, (c.strip() for c in text.split(","))):
        parts = entry.split(":")
        if not 3 <= len(parts) <= len(CONFIG_FIELDS):
            raise argparse.ArgumentTypeError(f"{entry!r}: expected W:N:G[:LOOKUP[:LOOKUP_LEN[:BUDGET[:CHAIN[:PLAIN]]]]]")
        try:
            configs.append(LookaheadConfig(**{k: config_value(k, v) for k, v in zip(CONFIG_FIELDS, parts)
                                              if v.strip()}))
        except (ValueError, ConfigError) as error:
            raise argparse.ArgumentTypeError(f"{entry!r}: {error}") from None
    return configs


def lookahead_configs(args) -> list[LookaheadConfig]:
    if args.configs:
        return args.configs
    return [LookaheadConfig(w, n, g) for w, n, g in itertools.product(args.window, args.ngram, args.guess)]


def eager_keys(cfg: LookaheadConfig, ranks: int = 1, tp: int = 1, kv_sync: str = "none") -> dict:
    """A row's config keys for the eager engine: pool candidates only, up to G of N-1 tokens each."""
    return dict(window=cfg.window, ngram=cfg.ngram, guess=cfg.guess, lookup=0, lookup_len=0, chain=0,
                budget=cfg.guess * (cfg.ngram - 1), plain=0, ranks=ranks, tp=tp, kv_sync=kv_sync, prompt_lookup=0)


def fast_keys(cfg: LookaheadConfig, device_type: str) -> dict:
    """A row's config keys for lp's fast path (one process) on a device of this type: the lookup, budget and plain
    steps it resolves the config to."""
    return dict(window=cfg.window, ngram=cfg.ngram, guess=cfg.guess, lookup=cfg.lookup_count,
                lookup_len=cfg.lookup_len if cfg.lookup_count else 0,
                chain=cfg.chain_count, budget=cfg.tree_budget(device_type),
                plain=int(cfg.plain_steps_on(device_type)), ranks=1, tp=1,
                kv_sync="none", prompt_lookup=0)


def distinct(configs: list[LookaheadConfig], keys) -> list[tuple[dict, LookaheadConfig]]:
    """(keys, config) for the configs that give distinct rows under `keys` (15:5:15 and 15:5:15:0 are one eager
    row), first one kept."""
    seen = {}
    for cfg in configs:
        seen.setdefault(tuple(keys(cfg).items()), cfg)
    return [(dict(k), cfg) for k, cfg in seen.items()]


def shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(loading.REPO))
    except ValueError:
        return str(path)


def in_process_methods(args, model, configs) -> list[tuple]:
    """(method, config keys, run(ids) -> Run) for HF greedy, HF prompt lookup and single-process lookahead."""
    methods = [] if args.no_greedy else [("hf_greedy", dict(HF_KEYS, prompt_lookup=0),
                                          lambda ids: time_hf(model, ids, args.max_new_tokens))]
    for k in filter(None, args.prompt_lookup):
        methods.append(("hf_prompt_lookup", dict(HF_KEYS, prompt_lookup=k),
                        lambda ids, k=k: time_hf(model, ids, args.max_new_tokens, k)))
    if 1 in args.nproc:
        for keys, cfg in distinct([c for c in configs if not c.fast_path_only], eager_keys):
            decoder = Decoder(model, replace(cfg, compile=False))
            methods.append(("lookahead", keys, lambda ids, d=decoder: time_lookahead(d, ids, args.max_new_tokens)))
    device_type = next(model.parameters()).device.type
    if getattr(args, "fast_eager", False):
        for keys, cfg in distinct(configs, lambda c: fast_keys(c, device_type)):
            methods.append(("lookahead_fast_eager", keys, fast_run(FastDecoder(model, cfg, compile=False), args)))
    if args.compile:
        methods += compiled_methods(args, model, configs)
    return methods


def compiled_methods(args, model, configs) -> list[tuple]:
    """hf_greedy_compiled and one lookahead_compiled (lp's fast path) per W:N:G, as (method, keys, run)."""
    compile_config = hf_compile_config(model)
    methods = [("hf_greedy_compiled", dict(HF_KEYS, prompt_lookup=0),
                lambda ids: time_hf(model, ids, args.max_new_tokens, cache_implementation="static",
                                    compile_config=compile_config))]
    device_type = next(model.parameters()).device.type
    for keys, cfg in distinct(configs, lambda c: fast_keys(c, device_type)):
        methods.append(("lookahead_compiled", keys, fast_run(FastDecoder(model, cfg, compile=True), args)))
    return methods


def fast_run(decoder: FastDecoder, args):
    """run(ids) -> Run through lp's fast path, carrying its decoder (warm-up reads its step size and compile time)."""
    def run(ids):
        return time_lookahead(decoder, ids, args.max_new_tokens)

    run.decoder = decoder
    return run


def warmup_prompts(name: str, run, prompts, max_new_tokens: int) -> list:
    """The prompts a method's warm-up runs on: the first one, except for compiled methods, whose warm-up must
    compile every shape the timed runs will meet. transformers sizes a static cache for the longest call so far
    (and reuses that size), so its warm-up takes the longest prompt; lp's fast path compiles once per cache
    capacity bucket, so its warm-up takes the first prompt of every bucket (and so does its uncompiled twin, which
    builds a step and a cache per bucket)."""
    if name == "hf_greedy_compiled":
        return [max(prompts, key=lambda p: len(p.ids))]
    if name in ("lookahead_compiled", "lookahead_fast_eager"):
        step = run.decoder.step_tokens
        buckets = {}
        for p in prompts:
            buckets.setdefault(capacity_bucket(len(p.ids) + max_new_tokens + step), p)
        return list(buckets.values())
    return prompts[:1]


def graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own counter; a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(args, methods, prompts) -> dict[tuple, dict]:
    """Untimed runs of every in-process method (compiled ones: at least one run per compiled shape); per method
    the seconds they took and, for compiled methods, the graphs compiled and lp's own compile time."""
    done = {}
    for name, keys, run in methods:
        compiled = name.endswith("_compiled")
        graphs, began = graphs_compiled(), time.perf_counter()
        for _ in range(max(args.warmup, 1) if compiled else args.warmup):
            for prompt in warmup_prompts(name, run, prompts, args.max_new_tokens):
                run(prompt.ids)
        info = dict(warmup_s=round(time.perf_counter() - began, 3))
        if compiled:
            info["graphs_compiled"] = graphs_compiled() - graphs
            decoder = getattr(run, "decoder", None)
            if decoder is not None:
                info["compile_s"] = round(decoder.compile_time_s, 3)
                info["compile_error"] = decoder.compile_error
            if not info["graphs_compiled"] or info.get("compile_error"):
                print(f"warning: {name} {keys} did not compile ({info}); its rows time an eager run",
                      file=sys.stderr)
        done[report.config_key(dict(method=name, **keys))] = info
    return done


def in_process(methods, prompts, repeat: int, bar) -> list[dict]:
    """One repeat of every in-process method over the prompts, interleaved prompt by prompt."""
    records = []
    for prompt in prompts:
        for name, keys, run in methods:
            result = run(prompt.ids)
            records.append(dict(method=name, **keys, prompt=prompt.id, repeat=repeat, rank=0, **result.record()))
            bar.update()
    return records


def launch(args, ranks: int, spec_file: Path, bar, scratch: Path) -> list[int]:
    """Run the ranks of one team as torchrun would (RANK, WORLD_SIZE, MASTER_*); their exit codes."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks),
               OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    procs, logs = [], []
    for r in range(ranks):
        logs.append(open(scratch / f"rank{ranks}-{r}.log", "w"))
        out = scratch / f"out{ranks}-{r}.json"
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file), str(out)],
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=logs[-1], text=True,
                                      stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL))
    for line in procs[0].stdout:
        if line.strip() == "tick":
            bar.update()
    codes = [procs[0].wait()]
    for p in procs[1:]:
        if codes[0]:
            p.kill()  # rank 0 is gone: its peers would only wait for the collective timeout
        codes.append(p.wait())
    for log in logs:
        log.close()
    return codes


def team(args, ranks: int, tp: int, prompts, configs, kv_syncs, repeat: int, bar, scratch: Path) -> list[dict]:
    """Spawn `ranks` gloo workers (1 process per rank, replicas of `tp` ranks) that time one repeat of every
    config x KV strategy."""
    jobs = [dict(window=c.window, ngram=c.ngram, guess=c.guess, kv_sync=kv) for c in team_configs(configs)
            for kv in kv_syncs]
    spec = dict(model=args.model, dtype=args.dtype, threads=args.threads, max_new_tokens=args.max_new_tokens,
                warmup=args.warmup, repeat=repeat, fault_timeout=args.fault_timeout, jobs=jobs, tp=tp,
                prompts=[dict(id=p.id, ids=p.ids) for p in prompts])
    spec_file = scratch / f"spec{ranks}.json"
    spec_file.write_text(json.dumps(spec))
    for attempt in range(2):
        codes = launch(args, ranks, spec_file, bar, scratch)
        if not any(codes):
            break
        bad = next(r for r, c in enumerate(codes) if c)
        tail = (scratch / f"rank{ranks}-{bad}.log").read_text()[-3000:]
        if attempt or "address already in use" not in tail.lower():  # a port taken between free_port() and bind
            raise RuntimeError(f"team of {ranks}: rank {bad} exited with {codes[bad]}:\n{tail}")
    records = []
    for r in range(ranks):
        for rec in json.loads((scratch / f"out{ranks}-{r}.json").read_text()):
            job = jobs[rec.pop("job")]
            keys = eager_keys(LookaheadConfig(job["window"], job["ngram"], job["guess"]), ranks, tp, job["kv_sync"])
            records.append(dict(method="lookahead", **keys, **rec))
    return records


def team_configs(configs: list[LookaheadConfig]) -> list[LookaheadConfig]:
    """The configs a team runs: its ranks run the eager engine (pool candidates only), once per distinct W:N:G."""
    return [cfg for _, cfg in distinct([c for c in configs if not c.fast_path_only], eager_keys)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fast_only = [c for c in lookahead_configs(args) if c.fast_path_only]
    if fast_only and not (args.compile or args.fast_eager):
        c = fast_only[0]
        parser.error(f"config {c.window}:{c.ngram}:{c.guess}:{c.lookup}:{c.lookup_len}:{c.budget}:{c.chain}:"
                     f"{c.plain_steps} sets a lookup, a chain, a budget or plain steps, which only lp's fast path "
                     "runs (the eager engine refuses them): add --compile or --fast-eager")
    torch.set_num_threads(args.threads)
    try:
        model, tokenizer = loading.load_model(args.model, getattr(torch, args.dtype))
    except loading.ModelUnavailable as error:
        print(f"skipped: {error}", file=sys.stderr)
        return 0
    suite = Path(args.prompts) if args.prompts else loading.default_suite(args.model)
    prompts = loading.load_prompts(suite, tokenizer, model.config.vocab_size, args.limit)
    configs = lookahead_configs(args)
    kv_syncs = [k for k in args.kv_sync.split(",") if k]
    teams = [(p, tp) for p in args.nproc if p > 1 for tp in args.tp if p % tp == 0]
    methods = in_process_methods(args, model, configs)
    total = args.repeats * len(prompts) * (len(methods) + len(teams) * len(team_configs(configs)) * len(kv_syncs))
    name = args.model.split(":")[0].replace("/", "_")
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / time.strftime(
        f"{name}-%Y%m%d-%H%M%S")
    env = report.environment(args.threads)
    settings = dict(model=args.model, prompts=shown(suite), prompt_count=len(prompts),
                    prompt_ids=[p.id for p in prompts], max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                    warmup=args.warmup, dtype=args.dtype, threads=args.threads, compile=args.compile,
                    step_latency="per-step timings from Decoder.stream / a transformers streamer; step 1 "
                                 "(with the prefill) excluded from step latency, included in wall and tokens/s")
    runs = []
    with tqdm(total=total, desc=name, unit="run", file=sys.stderr) as bar:
        warm = warm_up(args, methods, prompts)
        graphs_before = graphs_compiled()
        with tempfile.TemporaryDirectory(prefix="lp-sweep-") as scratch:
            for repeat in range(args.repeats):  # each repeat: in-process methods, then one launch per team size
                runs += in_process(methods, prompts, repeat, bar)
                for ranks, tp in teams:
                    runs += team(args, ranks, tp, prompts, configs, kv_syncs, repeat, bar, Path(scratch))
    if args.compile:
        settings["compiled"] = [dict(zip(report.CONFIG_KEYS, key), **info) for key, info in warm.items()
                                if "graphs_compiled" in info]
        settings["graphs_compiled_while_timing"] = graphs_compiled() - graphs_before
        settings["compile_s_while_timing"] = round(sum(r["compile_s"] for r in runs), 3)
        if settings["graphs_compiled_while_timing"] or settings["compile_s_while_timing"]:
            print(f"warning: {settings['graphs_compiled_while_timing']} graph(s) compiled during timed runs "
                  f"(lp fast path: {settings['compile_s_while_timing']} s); their wall times include it",
                  file=sys.stderr)
    rows = report.aggregate(runs, {key: info["warmup_s"] for key, info in warm.items()})
    report.write_outputs(out_dir, rows, runs, env, settings)
    if not args.no_plots:
        plots.plot_all(rows, out_dir, f"{args.model}, {args.max_new_tokens} new tokens, {env['cpu']}")
    print(report.markdown(rows, env, settings))
    print(f"wrote {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
