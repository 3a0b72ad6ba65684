"""PNG plots of a sweep (matplotlib, Agg): speedup vs ranks, tokens per step vs W and N, step latency split."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import _label, candidates  # noqa: E402


def _legend(ax) -> None:
    """Beside the axes, so that large grids do not hide the lines."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(fig, ax, path: Path, title: str) -> None:
    """Title, legend, write the PNG and free the figure."""
    ax.set_title(title, fontsize=9)
    _legend(ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _lookahead(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] == "lookahead"]


def _compiled(rows: list[dict]) -> list[dict]:
    """lp's compiled fast path (one process), drawn apart from the eager engine's lines."""
    return [r for r in rows if r["method"] == "lookahead_compiled"]


def _baselines(ax, rows: list[dict], value: str) -> None:
    """Horizontal lines for the HF baselines other than plain greedy (prompt lookup, compiled greedy)."""
    for r in rows:
        if r["method"] == "hf_prompt_lookup":
            ax.axhline(r[value], color="grey", linestyle=":", label=_label(r))
        elif r["method"] == "hf_greedy_compiled" and value != "tokens_per_step":  # 1 token a step, like greedy
            ax.axhline(r[value], color="tab:green", linestyle="-.", linewidth=1, label=_label(r))


def speedup_vs_ranks(rows: list[dict], path: Path, title: str) -> None:
    """Speedup over HF greedy against the number of ranks, one line per (W,N,G) and KV strategy (LP only:
    tensor-parallel rows are in the tables)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    la = [r for r in _lookahead(rows) if r.get("tp", 1) == 1]
    for wng in sorted({(r["window"], r["ngram"], r["guess"]) for r in la}):
        same = [r for r in la if (r["window"], r["ngram"], r["guess"]) == wng]
        solo = [r for r in same if r["ranks"] == 1]
        for kv in sorted({r["kv_sync"] for r in same if r["ranks"] > 1}) or ["none"]:
            pts = sorted(solo + [r for r in same if r["kv_sync"] == kv and r["ranks"] > 1], key=lambda r: r["ranks"])
            ax.plot([r["ranks"] for r in pts], [r["speedup_vs_greedy"] for r in pts], marker="o",
                    label=f"W,N,G={wng} {kv if kv != 'none' else ''}".strip())
    for r in _compiled(rows):
        ax.plot([1], [r["speedup_vs_greedy"]], marker="*", markersize=10, linestyle="none",
                label=f"W,N,G={(r['window'], r['ngram'], r['guess'])}{candidates(r)} compiled")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="HF greedy")
    _baselines(ax, rows, "speedup_vs_greedy")
    ax.set_xlabel("ranks P (P=1: one process)")
    ax.set_ylabel("speedup over HF greedy (wall clock)")
    ax.set_xticks(sorted({r["ranks"] for r in la}) or [1])
    _save(fig, ax, path, title)


def tokens_per_step(rows: list[dict], path: Path, title: str) -> None:
    """Accepted tokens per step against window W, one line per (N, G); single-process runs (or fewest ranks), and
    the compiled fast path's dashed."""
    la = _lookahead(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if la:
        fewest = min(r["ranks"] for r in la)
        la = [r for r in la if r["ranks"] == fewest and r["kv_sync"] in ("none", "recompute")]
        for ng in sorted({(r["ngram"], r["guess"]) for r in la}):
            pts = sorted((r for r in la if (r["ngram"], r["guess"]) == ng), key=lambda r: r["window"])
            ax.plot([r["window"] for r in pts], [r["tokens_per_step"] for r in pts], marker="o",
                    label=f"N={ng[0]}, G={ng[1]}")
    fast = _compiled(rows)
    line = lambda r: (r["ngram"], r["guess"], candidates(r))  # noqa: E731
    for ng in sorted({line(r) for r in fast}):
        pts = sorted((r for r in fast if line(r) == ng), key=lambda r: r["window"])
        ax.plot([r["window"] for r in pts], [r["tokens_per_step"] for r in pts], marker="x", linestyle="--",
                label=f"N={ng[0]}, G={ng[1]}{ng[2]} compiled")
    _baselines(ax, rows, "tokens_per_step")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="greedy (1 token/step)")
    ax.set_xlabel("window W")
    ax.set_ylabel("tokens per step")
    _save(fig, ax, path, title)


def step_latency(rows: list[dict], path: Path, title: str) -> None:
    """Mean step latency of every configuration, split into compute and communication (rank 0)."""
    labels = [_label(r) for r in rows]
    compute = [r["compute_ms_per_step"] for r in rows]
    comm = [r["comm_ms_per_step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6))
    ys = range(len(rows))
    ax.barh(ys, compute, color="tab:blue", label="compute (step minus collectives)")
    ax.barh(ys, comm, left=compute, color="tab:orange", label="communication (incl. waiting for peers)")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean, prefill step excluded)")
    _save(fig, ax, path, title)


def plot_all(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    """Write the three plots into out_dir; returns their paths."""
    paths = [out_dir / "speedup_vs_ranks.png", out_dir / "tokens_per_step.png", out_dir / "step_latency.png"]
    speedup_vs_ranks(rows, paths[0], title)
    tokens_per_step(rows, paths[1], title)
    step_latency(rows, paths[2], title)
    return paths
