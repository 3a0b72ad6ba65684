"""Turn timed runs into one row per configuration; write CSV, JSON and a Markdown table with the environment."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

# lookup, lookup_len, chain, budget: the candidates lp verifies a step, as resolved (lp's fast path: the config's
# lookup_count, lookup_len, chain_count and tree_budget; the eager engine: 0, 0, 0 and G*(N-1), pool
# candidates only); plain: 1 where a step with no candidate runs as a one-token step (plain_steps_on); None for
# HF's methods
CONFIG_KEYS = ("method", "window", "ngram", "guess", "lookup", "lookup_len", "chain", "budget", "plain", "ranks", "tp",
               "kv_sync", "prompt_lookup")
COLUMNS = CONFIG_KEYS + (
    "prompts", "repeats", "new_tokens", "steps", "tokens_per_step", "step_ms_mean", "step_ms_p50", "step_ms_p90",
    "compute_ms_per_step", "comm_ms_per_step", "comm_ms_by_rank", "comm_ms_min", "comm_share", "comm_bytes_per_step",
    "wall_s", "wall_s_std", "ms_per_token", "tokens_per_s", "speedup_vs_greedy", "speedup_vs_greedy_compiled",
    "speedup_vs_prompt_lookup", "fed_per_step_by_rank", "fed_per_step_max", "fed_per_step_total",
    "accepted_per_100_fed", "matched_greedy", "warmup_s")
COMPILED = ("hf_greedy_compiled", "lookahead_compiled")  # methods that compile in their (untimed) warm-up


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def config_key(run: dict) -> tuple:
    return tuple(run[k] for k in CONFIG_KEYS)


def _mean_by_prompt(runs: list[dict], value) -> dict[str, float]:
    by_prompt = defaultdict(list)
    for r in runs:
        by_prompt[r["prompt"]].append(value(r))
    return {p: statistics.fmean(v) for p, v in by_prompt.items()}


def summarise(runs: list[dict], greedy_tokens: dict[str, list[int]]) -> dict:
    """One configuration's row from all its runs (every rank's); timings are rank 0's, fed counts every rank's."""
    lead = [r for r in runs if r["rank"] == 0]
    ranks = sorted({r["rank"] for r in runs})
    walls = _mean_by_prompt(lead, lambda r: r["wall_s"])
    per_repeat = defaultdict(float)
    for r in lead:
        per_repeat[r["repeat"]] += r["wall_s"]
    tokens = sum(_mean_by_prompt(lead, lambda r: len(r["tokens"])).values())
    steps = sum(_mean_by_prompt(lead, lambda r: len(r["step_s"])).values())
    later = [s for r in lead for s in r["step_s"][1:]]  # step 1 carries the prefill: left out of step latency
    comm_later = [c for r in lead for c in r["comm_s"][1:]]
    wall = sum(walls.values())
    fed = [statistics.fmean([f for r in runs if r["rank"] == k for f in r["fed"]] or [0]) for k in ranks]
    step_mean = 1e3 * statistics.fmean(later) if later else 1e3 * wall / max(steps, 1)
    comm_mean = 1e3 * statistics.fmean(comm_later) if comm_later else 0.0
    all_comm = sum(c for r in lead for c in r["comm_s"])
    comm_by_rank = [1e3 * statistics.fmean([c for r in runs if r["rank"] == k for c in r["comm_s"][1:]] or [0])
                    for k in ranks]
    row = dict(zip(CONFIG_KEYS, config_key(lead[0])))
    row.update(
        prompts=len(walls), repeats=len(per_repeat), new_tokens=round(tokens, 1), steps=round(steps, 1),
        tokens_per_step=round(tokens / steps, 3) if steps else 0.0, step_ms_mean=round(step_mean, 3),
        step_ms_p50=round(1e3 * percentile(later, 50), 3) if later else None,
        step_ms_p90=round(1e3 * percentile(later, 90), 3) if later else None,
        compute_ms_per_step=round(step_mean - comm_mean, 3), comm_ms_per_step=round(comm_mean, 3),
        comm_ms_by_rank="/".join(f"{c:.2f}" for c in comm_by_rank) if len(ranks) > 1 else "",
        comm_ms_min=round(1e3 * min(comm_later), 3) if len(ranks) > 1 and comm_later else None,
        comm_share=round(all_comm / sum(r["wall_s"] for r in lead), 4),
        comm_bytes_per_step=round(statistics.fmean([r["comm_bytes"] / max(len(r["step_s"]), 1) for r in lead]), 1),
        wall_s=round(wall, 4), wall_s_std=round(statistics.pstdev(per_repeat.values()), 4),
        ms_per_token=round(1e3 * wall / tokens, 4) if tokens else None,
        tokens_per_s=round(tokens / wall, 2) if wall else 0.0,
        fed_per_step_by_rank="/".join(f"{f:.1f}" for f in fed) if any(fed) else "",
        fed_per_step_max=round(max(fed), 2) if any(fed) else None,
        fed_per_step_total=round(sum(fed), 2) if any(fed) else None,
        # new tokens per 100 tokens fed to the model, all ranks together (a team feeds each rank's share)
        accepted_per_100_fed=round(100 * tokens / steps / sum(fed), 2) if steps and any(fed) else None,
        matched_greedy=all(r["tokens"] == greedy_tokens.get(r["prompt"]) for r in lead) if greedy_tokens else None,
    )
    return row


def aggregate(runs: list[dict], warmup_s: dict[tuple, float] | None = None) -> list[dict]:
    """Rows in first-seen order, each with its speedups over HF greedy and HF prompt lookup of the same run, and
    the seconds its untimed warm-up took (`warmup_s`, by config_key; compiling included for compiled methods)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(config_key(r), []).append(r)
    greedy = [g for k, g in groups.items() if k[0] == "hf_greedy"]
    greedy_tokens = {r["prompt"]: r["tokens"] for r in greedy[0] if r["repeat"] == 0} if greedy else {}
    rows = [summarise(g, greedy_tokens) for g in groups.values()]
    base = next((r["wall_s"] for r in rows if r["method"] == "hf_greedy"), None)
    compiled = next((r["wall_s"] for r in rows if r["method"] == "hf_greedy_compiled"), None)
    lookup = next((r["wall_s"] for r in rows if r["method"] == "hf_prompt_lookup"), None)
    for row in rows:
        row["speedup_vs_greedy"] = round(base / row["wall_s"], 3) if base else None
        row["speedup_vs_greedy_compiled"] = round(compiled / row["wall_s"], 3) if compiled else None
        row["speedup_vs_prompt_lookup"] = round(lookup / row["wall_s"], 3) if lookup else None
        row["warmup_s"] = (warmup_s or {}).get(config_key(row))
    return rows


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict:
    """Where and how the numbers were taken."""
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": _git("rev-parse", "--short", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads_per_process": threads, "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_outputs(out_dir: Path, rows: list[dict], runs: list[dict], env: dict, settings: dict) -> None:
    """results.csv, results.json (environment, settings, rows), runs.json (every timed run) and results.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env, loadavg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps({"environment": env, "settings": settings, "rows": rows},
                                                     indent=1) + "\n")
    (out_dir / "runs.json").write_text(json.dumps(runs))
    (out_dir / "results.md").write_text(markdown(rows, env, settings))


def candidates(row: dict) -> str:
    """The candidates an lp row verifies a step: "lookup 2x10 chain 2 budget 60" (prompt-lookup candidates x
    tokens each, continuations chained onto each pool candidate, tokens fed for candidates), "lookup 0 budget 60"
    (pool candidates only), then "plain steps" where steps with no candidate feed one token; "" for rows without
    the keys."""
    if row.get("lookup") is None:
        return ""
    lookup = f"{row['lookup']}x{row['lookup_len']}" if row["lookup"] else "0"
    chain = f" chain {row['chain']}" if row.get("chain") else ""
    plain = " plain steps" if row.get("plain") else ""
    return f" lookup {lookup}{chain} budget {row['budget']}{plain}"


def _label(row: dict) -> str:
    if row["method"] == "hf_greedy":
        return "HF greedy"
    if row["method"] == "hf_greedy_compiled":
        return "HF greedy, static cache + compiled"
    if row["method"] == "hf_prompt_lookup":
        return f"HF prompt lookup (K={row['prompt_lookup']})"
    wng = f"lookahead ({row['window']},{row['ngram']},{row['guess']}){candidates(row)}"
    if row["method"] == "lookahead_compiled":
        return f"{wng} compiled fast path"
    if row["method"] == "lookahead_fast_eager":
        return f"{wng} fast path, not compiled"
    where = "1 process" if row["ranks"] == 1 else f"P={row['ranks']} {row['kv_sync']}"
    if row.get("tp", 1) > 1:
        replicas = row["ranks"] // row["tp"]
        where = f"TP={row['tp']} only {row['kv_sync']}" if replicas == 1 else f"P_lp={replicas} x TP={row['tp']} {row['kv_sync']}"
    return f"{wng} {where}"


def _fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict], env: dict, settings: dict) -> str:
    """A Markdown table of the rows, headed by the model, machine and date."""
    head = (f"{settings['model']}, {settings['prompt_count']} prompts from {settings['prompts']}, "
            f"{settings['max_new_tokens']} new tokens, {settings['repeats']} repeats after {settings['warmup']} "
            f"warm-up; {env['cpu']} ({env['cpus_usable']} usable cores), {env['torch_threads_per_process']} torch "
            f"thread(s) per process, torch {env['torch']}, transformers {env['transformers']}; {env['date_utc']}\n\n")
    cols = ["configuration", "tok/step", "fed/step by rank", "tok per 100 fed", "step ms mean / p50 / p90",
            "compute / comm ms", "comm ms by rank; min", "comm share", "ms/token", "tok/s", "vs HF greedy",
            "vs HF compiled", "vs prompt lookup", "= greedy"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lat = f"{_fmt(r['step_ms_mean'])} / {_fmt(r['step_ms_p50'])} / {_fmt(r['step_ms_p90'])}"
        split = f"{_fmt(r['compute_ms_per_step'])} / {_fmt(r['comm_ms_per_step'])}"
        by_rank = f"{r['comm_ms_by_rank']}; {_fmt(r['comm_ms_min'])}" if r["comm_ms_by_rank"] else "-"
        cells = [_label(r), _fmt(r["tokens_per_step"]), _fmt(r["fed_per_step_by_rank"]),
                 _fmt(r["accepted_per_100_fed"], 1), lat, split, by_rank, f"{100 * r['comm_share']:.1f}%",
                 _fmt(r["ms_per_token"]), _fmt(r["tokens_per_s"], 1), _fmt(r["speedup_vs_greedy"]),
                 _fmt(r["speedup_vs_greedy_compiled"]), _fmt(r["speedup_vs_prompt_lookup"]),
                 _fmt(r["matched_greedy"])]
        lines.append("| " + " | ".join(cells) + " |")
    compiled = [f"{_label(r)} {r['warmup_s']:.1f} s" for r in rows
                if r["method"] in COMPILED and r.get("warmup_s") is not None]
    if compiled:
        lines += ["", "Untimed warm-up, compiling included: " + "; ".join(compiled) + "."]
    return head + "\n".join(lines) + "\n"
