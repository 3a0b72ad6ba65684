"""Ranking the tree's candidates by measured statistics against the hand-set prior: the same records decoded in
order by two fast-path decoders with the job's memory, one whose candidate sources' chances are measured as it
runs (lp.source_stats, the default) and one that keeps the hand-set chances (its statistics never update),
interleaved record by record in one process.

python benchmarks/candidate_ranking.py --model default --configs 15:5:15,7:5:7 --max-new-tokens 128 --compile \
    --out benchmarks/results_published/candidate_ranking_default

Per W:N:G: tokens per step (all new tokens over all steps), ms per token (decoding wall time over new tokens,
compiling left out), measured / prior ratios, and whether the tokens are the same (ranking changes steps only).
`--no-plain-steps` makes every step a full one, so tokens per step depend on the ranking alone (with plain steps,
as CPUs run by default, they also depend on timing). One torch thread by default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.job_memory import add_job_arguments, decode_in_turn, run_suite  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402

RANKINGS = ("prior", "measured")


def hold_at_prior(decoder: FastDecoder) -> None:
    """The decoder's candidate statistics never update, so its chances stay the hand-set prior."""
    decoder.job_pool().source_stats.update = lambda *args: None


def run_job(model, prompts, wng, args) -> dict:
    settings = dict(memory="job") if args.plain_steps else dict(memory="job", plain_steps=False)
    decoders = {r: FastDecoder(model, LookaheadConfig(*wng, **settings), compile=args.compile) for r in RANKINGS}
    hold_at_prior(decoders["prior"])
    by_ranking, same, greedy = decode_in_turn(model, prompts, decoders, args)
    out = dict(config=":".join(map(str, wng)), same_tokens=same, greedy=greedy, **by_ranking)
    stats = decoders["measured"].job_pool().source_stats
    out["chances"] = [round(c, 3) for c in stats.chances().tolist()]
    out["tries"] = stats.tries.tolist()
    out["tokens_per_step_ratio"] = round(out["measured"]["tokens_per_step"] / out["prior"]["tokens_per_step"], 3)
    out["ms_per_token_ratio"] = round(out["measured"]["ms_per_token"] / out["prior"]["ms_per_token"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_job_arguments(p, "default", 128)
    p.add_argument("--plain-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="the CPU's plain steps (default on); --no-plain-steps: every step a full one")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "candidate_ranking"))
    args = p.parse_args()
    suite, prompts, rows = run_suite(args, run_job, lambda row: (
        f"tokens/step prior {row['prior']['tokens_per_step']} measured {row['measured']['tokens_per_step']} "
        f"({row['tokens_per_step_ratio']}x); ms/token prior {row['prior']['ms_per_token']} measured "
        f"{row['measured']['ms_per_token']} ({row['ms_per_token_ratio']}x); same tokens {row['same_tokens']}"))
    out = Path(args.out)
    lines = [f"{args.model}, {len(prompts)} records of `{suite}`, {args.max_new_tokens} new tokens each, "
             f"{'compiled' if args.compile else 'eager'} fast path, job memory, plain steps "
             f"{'on' if args.plain_steps else 'off'}", "",
             "| W:N:G | tokens/step prior | measured | measured / prior | ms/token prior | measured | measured / prior "
             "| same tokens |", "| --- " * 8 + "|"]
    lines += [f"| {r['config']} | {r['prior']['tokens_per_step']} | {r['measured']['tokens_per_step']} | "
              f"{r['tokens_per_step_ratio']} | {r['prior']['ms_per_token']} | {r['measured']['ms_per_token']} | "
              f"{r['ms_per_token_ratio']} | {r['same_tokens']} |" for r in rows]
    lines += ["", "measured chances at the job's end (lookup by match length 0-4, then the pool by entry age) and "
              "tries:"] + [f"- {r['config']}: {r['chances']}; {r['tries']}" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_tokens"] and r["greedy"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
