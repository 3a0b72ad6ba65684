"""Self-tuning on a GPU: the 7B-shaped model's step-cost curve, and the chooser's predicted step latency of each
setting against the latency measured by running it.

python benchmarks/gpu_auto_tune.py --out benchmarks/results/gpu_auto_tune.json   (about a minute on one H200)
python benchmarks/gpu_auto_tune.py --smoke                                        (tiny model on the CPU)

Builds the random 7B-shaped Llama of gpu_fast_path.py in bf16 on the device, measures lp.step_cost's curve (into a
fresh cache file beside --out), then for each setting the tuner may run on this device (lp.auto_tune.menu) takes
the chooser's prediction from the curve alone and decodes --new-tokens tokens of a random prompt with it: measured
seconds a step = decoding wall time / steps (the prefill step in). The goal (issue: self-tuning) is a prediction
within 10 % of the measurement. Random weights accept few candidates, so only the latencies mean anything here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.gpu_fast_path import SMOKE_SHAPE, build_model  # noqa: E402
from lp.auto_tune import Chooser, menu, prior_compile_s  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.decoding import Decoder  # noqa: E402
from lp.step_cost import CostCurve, CostStore, step_costs  # noqa: E402

SHAPE_7B = dict(hidden=4096, layers=32, heads=32, ffn=11008, vocab=32000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="the compiled settings instead of the eager ones")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_auto_tune.json"))
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("skipped: no CUDA device (use --smoke to run the tiny model on the CPU)")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    model = build_model(SMOKE_SHAPE if args.smoke else SHAPE_7B, device, torch.float32 if args.smoke else torch.bfloat16)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    key, curve = step_costs(model, CostStore(out.with_suffix(".costs.json")), refresh=True)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  curve_ms={t: round(1e3 * s, 3) for t, s in sorted(curve.points.items())}, arms=[])
    print("curve (ms by tokens fed):", result["curve_ms"], flush=True)
    base = LookaheadConfig()
    arms = menu(device.type, bool(args.compile))  # eager, or compiled (a minute or more of compiling each on a GPU)
    prior = Chooser(arms, CostCurve(dict(curve.points)), base, device.type, prior_compile_s(model, device.type))
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    for arm in arms:
        decoder = Decoder(model, arm.config(base))
        decoder.generate(prompt.tolist(), 4)  # warm-up (and the compile, for a compiled arm)
        run = decoder.generate(prompt.tolist(), args.new_tokens)
        measured = run.wall_time_s / run.steps
        fed = sum(run.tokens_fed_per_step) / run.steps
        predicted = prior.step_seconds(arm)
        at_fed = prior.curve.latency(fed)  # the curve at the tokens the run really fed (its acceptance aside)
        row = dict(arm=arm.name, predicted_ms=round(1e3 * predicted, 3), measured_ms=round(1e3 * measured, 3),
                   ratio=round(predicted / measured, 3), fed=round(fed, 1), curve_at_fed_ms=round(1e3 * at_fed, 3),
                   curve_at_fed_ratio=round(at_fed / measured, 3), steps=run.steps)
        result["arms"].append(row)
        print(row, flush=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
