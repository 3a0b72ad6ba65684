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

--compile adds the compiled runs a user would pick for a long job: HF generate with a static cache and torch.compile
(one at a time and at each B), and lp's compiled fast path in one process (B = 1 and each B), with their own ratios
(vs_hf_compiled_same_batch). Compiling is left out of their rates: HF compiles in an untimed warm-up on the longest
chunk of each B, and an lp job reports its compile time (compile_s), which comes off its wall time.
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
from benchmarks.timing import hf_compile_config  # noqa: E402

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
    p.add_argument("--compile", action="store_true", help="also time compiled HF generate and lp's compiled fast path")
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


def hf_batch(model, tokenizer, texts: list[str], max_new: int, **extra) -> list[list[int]]:
    """HF greedy on `texts` in one batched generate, left padding: each row's new tokens, cut after EOS."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.pad_token is None:  # the usual choice for decoder-only models without one
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
    with torch.inference_mode():
        got = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=pad, **extra)
    rows = got[:, enc["input_ids"].shape[1]:].tolist()
    return [row[: next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in rows]


def hf_runs(model, tokenizer, texts: list[str], max_new: int, batch_sizes: list[int], compiled: bool = False
            ) -> tuple[list[dict], dict]:
    """HF greedy one prompt at a time, then batched with left padding: new tokens (to EOS) over wall time. Compiled:
    a static cache and torch.compile, each B first run untimed on its longest chunk, so no timed call compiles."""
    extra = dict(cache_implementation="static", compile_config=hf_compile_config(model)) if compiled else {}
    name = "HF generate compiled (static cache)" if compiled else "HF generate"

    def generate(chunk: list[str]) -> list[list[int]]:
        return hf_batch(model, tokenizer, chunk, max_new, **extra)

    rows, outputs = [], {}
    for b in [1] + batch_sizes:
        chunks = [texts[i : i + b] for i in range(0, len(texts), b)]
        start = time.perf_counter()
        for chunk in warmup_chunks(chunks, tokenizer) if compiled else []:
            generate(chunk)
        warm_s, start = time.perf_counter() - start, time.perf_counter()
        outs = [out for chunk in chunks for out in generate(chunk)]
        wall = time.perf_counter() - start
        new = sum(len(o) for o in outs)
        outputs[b] = outs
        rows.append(dict(setting=f"{name}, {'one at a time' if b == 1 else f'batched B={b}, left padding'}",
                         batch=b, ranks=1, compiled=compiled, compile_s=round(warm_s, 3), new_tokens=new,
                         wall_s=round(wall, 3),
                         tokens_per_s=round(new / wall, 2), prompts_per_s=round(len(texts) / wall, 3)))
    return rows, outputs


def warmup_chunks(chunks: list[list[str]], tokenizer) -> list[list[str]]:
    """For each batch size among the chunks, its chunk with the longest (padded) prompt, the largest batch last: a
    static cache sized on these fits every chunk, so the timed calls compile nothing."""
    longest = {}
    for chunk in chunks:
        size = max(len(tokenizer(t)["input_ids"]) for t in chunk)
        if size > longest.get(len(chunk), (0, None))[0]:
            longest[len(chunk)] = (size, chunk)
    return [longest[rows][1] for rows in sorted(longest)]


def lp_run(spec: str, texts: list[str], args, procs: int, flags: list[str], label: str, batch: int) -> tuple[dict, dict]:
    """One command-line job; returns its row and {id: token_ids}. A compiled job (--compile among `flags`, one
    process) reports its compile time, which comes off its wall time."""
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
    compile_s = summary.get("compile_time_s", 0.0)
    if compile_s and procs > 1:  # replicas compile at once and their compile times add up: no wall time to take off
        raise ValueError(f"{label}: compiled settings run in one process")
    wall = summary["wall_s"] - compile_s
    return dict(setting=label, batch=batch, ranks=procs, compiled=summary["compiled"], compile_s=compile_s,
                new_tokens=summary["new_tokens"], wall_s=round(wall, 3), tokens_per_s=round(summary["new_tokens"] / wall, 2),
                prompts_per_s=round(len(texts) / wall, 3), tokens_per_step=summary["tokens_per_step"]), tokens


def lp_settings(batch_sizes: list[int], compile: bool) -> list[tuple[int, list[str], str, int]]:
    """(processes, flags, label, B) of every lp job: eager teams, replicas and batches, then (with compile) the
    compiled fast path in one process, alone and at each B."""
    out = [(1, [], "lp, one process", 1), (2, ["--lp", "2"], "lp, one team of 2 ranks", 1),
           (2, ["--lp", "1"], "lp, 2 replicas of 1 rank", 1)]
    out += [(1, ["--batch-size", str(b)], f"lp, one process, batch B={b}", b) for b in batch_sizes]
    out += [(2, ["--lp", "1", "--batch-size", str(b)], f"lp, 2 replicas of 1 rank, batch B={b}", b) for b in batch_sizes]
    if compile:
        out += [(1, ["--compile"], "lp compiled, one process", 1)]
        out += [(1, ["--compile", "--batch-size", str(b)], f"lp compiled, one process, batch B={b}", b)
                for b in batch_sizes]
    return out


def add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s over HF's at the same B and one at a time; with compiled HF rows, over those too."""
    hf = {(r["compiled"], r["batch"]): r["tokens_per_s"] for r in rows if r["setting"].startswith("HF")}
    for r in rows:
        r["vs_hf_same_batch"] = round(r["tokens_per_s"] / hf[False, r["batch"]], 3)
        r["vs_hf_one_at_a_time"] = round(r["tokens_per_s"] / hf[False, 1], 3)
        if (True, r["batch"]) in hf:
            r["vs_hf_compiled_same_batch"] = round(r["tokens_per_s"] / hf[True, r["batch"]], 3)


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model, tokenizer = load_model(args.model)
    texts = prompt_texts(args.model, args.prompts, tokenizer)
    rows, hf_out = hf_runs(model, tokenizer, texts, args.max_new_tokens, batch_sizes)
    if args.compile:
        compiled_rows, compiled_out = hf_runs(model, tokenizer, texts, args.max_new_tokens, batch_sizes, compiled=True)
        for r in compiled_rows:
            r["same_tokens_as_hf_one_at_a_time"] = sum(a == b for a, b in zip(compiled_out[r["batch"]], hf_out[1]))
        rows += compiled_rows
    reference = None
    for procs, flags, label, b in lp_settings(batch_sizes, args.compile):
        row, tokens = lp_run(args.model, texts, args, procs, flags, label, b)
        reference = reference or tokens
        row["same_tokens_as_lp_one_process"] = tokens == reference
        row["same_tokens_as_hf_one_at_a_time"] = sum(tokens[i] == hf_out[1][i] for i in range(len(texts)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    add_ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, threads=args.threads, cpu_count=os.cpu_count(), model=args.model,
               prompts=args.prompts, max_new_tokens=args.max_new_tokens, wng=[args.window, args.ngram, args.guess],
               date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=" ".join(sys.argv))
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    lines = [f"# Throughput: {args.model}, {args.prompts} prompts x {args.max_new_tokens} new tokens, "
             f"(W,N,G)=({args.window},{args.ngram},{args.guess}), CPU, {args.threads} threads in all (each of 2 ranks gets half)",
             "", "| setting | ranks | B | tokens/s | prompts/s | vs HF batched same B | vs HF one at a time | "
             "vs HF compiled same B | compile s (not in tokens/s) | tokens/step | same tokens as lp 1 process | "
             "= HF 1-at-a-time |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['ranks']} | {r['batch']} | {r['tokens_per_s']} | {r['prompts_per_s']} | "
                     f"{r['vs_hf_same_batch']} | {r['vs_hf_one_at_a_time']} | {r.get('vs_hf_compiled_same_batch', '-')} | "
                     f"{r['compile_s'] if r['compiled'] else '-'} | {r.get('tokens_per_step', '')} | "
                     f"{r.get('same_tokens_as_lp_one_process', '')} | {r.get('same_tokens_as_hf_one_at_a_time', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
