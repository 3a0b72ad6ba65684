"""Batch-job throughput: prompts/s and tokens/s of lp's teams, replicas and batches against HF generate, same run.

python benchmarks/throughput.py --model default --out benchmarks/results/throughput_default
python benchmarks/throughput.py --model stories260k --out benchmarks/results/throughput_stories260k

Each lp setting runs the real command line (launch/run.py --input/--output, under torchrun for 2 ranks) on the
same --prompts prompts (the model's suite, cycled, each copy shortened by a few characters so no two are equal),
and reads the job's summary: new tokens over the decoding wall time (model loading left out). The baselines run in
this process with torch's threads set to --threads: HF `generate(do_sample=False)` one prompt at a time, and
batched with left padding at each --batch-sizes B. lp settings: one process (B = 1 and each B), one team of 2
ranks (--lp 2), 2 replicas of 1 rank (--lp 1), 2 replicas with each B. Ratios are against HF batched greedy at the
same B (and HF one at a time for B = 1 settings). Writes results.json and results.md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from benchmarks.loading import STORIES, default_suite, load_model, render  # noqa: E402

RUN = Path(__file__).resolve().parents[1] / "launch" / "run.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="default or stories260k (or a model folder)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="4,8")
    p.add_argument("--threads", type=int, default=2, help="torch threads of one process (2 ranks get 1 each)")
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--ngram", type=int, default=5)
    p.add_argument("--guess", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "throughput"))
    return p


def prompt_texts(spec: str, count: int, tokenizer) -> list[str]:
    """`count` distinct prompts: the suite cycled, copy k shortened by k characters (keeping at least one word)."""
    suite = [json.loads(line) for line in default_suite(spec).read_text().splitlines() if line.strip()]
    texts = [render(r, tokenizer) for r in suite]
    out = []
    for i in range(count):
        text, k = texts[i % len(texts)], i // len(texts)
        out.append(text[: max(len(text) - k, len(text) // 2)])
    return out


def hf_runs(model, tokenizer, texts: list[str], max_new: int, batch_sizes: list[int]) -> list[dict]:
    """HF greedy one prompt at a time, then batched with left padding: new tokens (to EOS) over wall time."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.pad_token is None:  # the usual choice for decoder-only models without one
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenizer.padding_side = "left"
    rows = []
    outputs = {}
    for b in [1] + batch_sizes:
        start, new = time.perf_counter(), 0
        outs = []
        for i in range(0, len(texts), b):
            chunk = texts[i : i + b]
            enc = tokenizer(chunk, return_tensors="pt", padding=True) if b > 1 else tokenizer(chunk, return_tensors="pt")
            with torch.inference_mode():
                got = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=pad)
            for row in got[:, enc["input_ids"].shape[1]:].tolist():
                stop = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                outs.append(row[:stop])
                new += stop
        wall = time.perf_counter() - start
        outputs[b] = outs
        rows.append(dict(setting=f"HF generate, {'one at a time' if b == 1 else f'batched B={b}, left padding'}",
                         batch=b, ranks=1, new_tokens=new, wall_s=round(wall, 3),
                         tokens_per_s=round(new / wall, 2), prompts_per_s=round(len(texts) / wall, 3)))
    return rows, outputs


def lp_run(spec: str, texts: list[str], args, procs: int, flags: list[str], label: str, batch: int) -> tuple[dict, dict]:
    """One command-line job; returns its row and {id: token_ids}."""
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        source.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
        model = [] if spec == "default" else ["--model", str(STORIES) if spec == "stories260k" else spec]
        common = [*model, "--input", str(source), "--output", str(output), "--max-new-tokens", str(args.max_new_tokens),
                  "--window", str(args.window), "--ngram", str(args.ngram), "--guess", str(args.guess), "--dtype",
                  "float32", "--no-compile", *flags]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), str(RUN)]
               if procs > 1 else [sys.executable, str(RUN)]) + common
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(max(1, args.threads // procs)))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{label} failed: {done.stderr[-2000:]}")
        summary = json.loads([x for x in done.stderr.splitlines() if x.startswith('{"summary"')][-1])["summary"]
        tokens = {json.loads(x)["id"]: json.loads(x).get("token_ids") for x in output.read_text().splitlines()}
    wall = summary["wall_s"]
    return dict(setting=label, batch=batch, ranks=procs, new_tokens=summary["new_tokens"], wall_s=wall,
                tokens_per_s=round(summary["new_tokens"] / wall, 2), prompts_per_s=round(len(texts) / wall, 3),
                tokens_per_step=summary["tokens_per_step"]), tokens


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model, tokenizer = load_model(args.model)
    texts = prompt_texts(args.model, args.prompts, tokenizer)
    rows, hf_out = hf_runs(model, tokenizer, texts, args.max_new_tokens, batch_sizes)
    settings = [(1, [], "lp, one process"), (2, ["--lp", "2"], "lp, one team of 2 ranks"),
                (2, ["--lp", "1"], "lp, 2 replicas of 1 rank")]
    settings += [(1, ["--batch-size", str(b)], f"lp, one process, batch B={b}") for b in batch_sizes]
    settings += [(2, ["--lp", "1", "--batch-size", str(b)], f"lp, 2 replicas of 1 rank, batch B={b}")
                 for b in batch_sizes]
    reference = None
    for procs, flags, label in settings:
        b = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 1
        row, tokens = lp_run(args.model, texts, args, procs, flags, label, b)
        reference = reference or tokens
        row["same_tokens_as_lp_one_process"] = tokens == reference
        row["same_tokens_as_hf_one_at_a_time"] = sum(tokens[i] == hf_out[1][i] for i in range(len(texts)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    hf = {r["batch"]: r for r in rows if r["setting"].startswith("HF")}
    for r in rows:
        r["vs_hf_same_batch"] = round(r["tokens_per_s"] / hf[r["batch"]]["tokens_per_s"], 3)
        r["vs_hf_one_at_a_time"] = round(r["tokens_per_s"] / hf[1]["tokens_per_s"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, threads=args.threads, cpu_count=os.cpu_count(), model=args.model,
               prompts=args.prompts, max_new_tokens=args.max_new_tokens, wng=[args.window, args.ngram, args.guess],
               date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=" ".join(sys.argv))
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    lines = [f"# Throughput: {args.model}, {args.prompts} prompts x {args.max_new_tokens} new tokens, "
             f"(W,N,G)=({args.window},{args.ngram},{args.guess}), CPU, {args.threads} threads in all (each of 2 ranks gets half)",
             "", "| setting | ranks | B | tokens/s | prompts/s | vs HF batched same B | vs HF one at a time | "
             "tokens/step | same tokens as lp 1 process | = HF 1-at-a-time |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['ranks']} | {r['batch']} | {r['tokens_per_s']} | {r['prompts_per_s']} | "
                     f"{r['vs_hf_same_batch']} | {r['vs_hf_one_at_a_time']} | {r.get('tokens_per_step', '')} | "
                     f"{r.get('same_tokens_as_lp_one_process', '')} | {r.get('same_tokens_as_hf_one_at_a_time', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
