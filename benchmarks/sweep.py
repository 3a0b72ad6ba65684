"""Sweep lookahead decoding over a grid, against HF greedy and HF prompt lookup measured in the same run.

python benchmarks/sweep.py --model stories260k --window 15,7 --ngram 5 --guess 15 --nproc 1,2 \
    --kv-sync recompute,gather --max-new-tokens 256 --repeats 3 --warmup 1
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import loading, plots, report  # noqa: E402
from benchmarks.timing import time_hf, time_lookahead  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.decoding import Decoder  # noqa: E402
from lp.distributed.bootstrap import free_port  # noqa: E402

WORKER = Path(__file__).resolve().with_name("rank_worker.py")
HF_KEYS = dict(window=None, ngram=None, guess=None, ranks=1, tp=1, kv_sync=None)


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
    p.add_argument("--configs", help="explicit W:N:G list instead of the grid, e.g. 15:5:15,7:5:7")
    p.add_argument("--nproc", type=int_list, default=[1], help="ranks; 1 = one process (no process group)")
    p.add_argument("--tp", type=int_list, default=[1], help="tensor-parallel ranks per replica (DeepSpeed AutoTP) "
                   "for P>1 teams: --nproc 2 --tp 2 is TP only, --nproc 4 --tp 2 is 2 replicas x TP 2")
    p.add_argument("--kv-sync", default="recompute,gather", help="KV strategies for P>1: recompute,gather")
    p.add_argument("--prompt-lookup", type=int_list, default=[10], help="HF prompt_lookup_num_tokens values; 0 = skip")
    p.add_argument("--no-greedy", action="store_true", help="skip HF greedy (then no speedups and no exactness check)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each configuration on the first prompt")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process (each rank too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--out", help="output folder (default benchmarks/results/<model>-<time>)")
    p.add_argument("--fault-timeout", type=float, default=300)
    p.add_argument("--no-plots", action="store_true")
    return p


def lookahead_configs(args) -> list[LookaheadConfig]:
    if args.configs:
        return [LookaheadConfig(*map(int, c.split(":"))) for c in args.configs.split(",")]
    return [LookaheadConfig(w, n, g) for w, n, g in itertools.product(args.window, args.ngram, args.guess)]


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
        for cfg in configs:
            decoder = Decoder(model, cfg)
            keys = dict(window=cfg.window, ngram=cfg.ngram, guess=cfg.guess, ranks=1, tp=1, kv_sync="none",
                        prompt_lookup=0)
            methods.append(("lookahead", keys, lambda ids, d=decoder: time_lookahead(d, ids, args.max_new_tokens)))
    return methods


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
    jobs = [dict(window=c.window, ngram=c.ngram, guess=c.guess, kv_sync=kv) for c in configs for kv in kv_syncs]
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
            records.append(dict(method="lookahead", **job, ranks=ranks, tp=tp, prompt_lookup=0, **rec))
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    in_methods = (not args.no_greedy) + len(list(filter(None, args.prompt_lookup))) + len(configs) * (1 in args.nproc)
    total = args.repeats * len(prompts) * (in_methods + len(teams) * len(configs) * len(kv_syncs))
    name = args.model.split(":")[0].replace("/", "_")
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / time.strftime(
        f"{name}-%Y%m%d-%H%M%S")
    env = report.environment(args.threads)
    settings = dict(model=args.model, prompts=shown(suite), prompt_count=len(prompts),
                    prompt_ids=[p.id for p in prompts], max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                    warmup=args.warmup, dtype=args.dtype, threads=args.threads,
                    step_latency="per-step timings from Decoder.stream / a transformers streamer; step 1 "
                                 "(with the prefill) excluded from step latency, included in wall and tokens/s")
    runs = []
    with tqdm(total=total, desc=name, unit="run", file=sys.stderr) as bar:
        methods = in_process_methods(args, model, configs)
        for _, _, run in methods:
            for _ in range(args.warmup):
                run(prompts[0].ids)
        with tempfile.TemporaryDirectory(prefix="lp-sweep-") as scratch:
            for repeat in range(args.repeats):  # each repeat: in-process methods, then one launch per team size
                runs += in_process(methods, prompts, repeat, bar)
                for ranks, tp in teams:
                    runs += team(args, ranks, tp, prompts, configs, kv_syncs, repeat, bar, Path(scratch))
    rows = report.aggregate(runs)
    report.write_outputs(out_dir, rows, runs, env, settings)
    if not args.no_plots:
        plots.plot_all(rows, out_dir, f"{args.model}, {args.max_new_tokens} new tokens, {env['cpu']}")
    print(report.markdown(rows, env, settings))
    print(f"wrote {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
