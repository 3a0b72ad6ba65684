"""The random-settings fuzz, compiled, on whatever device is here: cases against greedy decoding (or the one-token
sampler) until the time budget runs out; the numbers go to a JSON file, not a claim.

python benchmarks/cuda_fuzz.py --budget-s 180 --out benchmarks/results_published/gpu_h200/cuda_fuzz.json
python benchmarks/cuda_fuzz.py --smoke      (the CPU, a few cases: the code, not a measurement)

Compiling dominates (each configuration compiles its graphs once per cache bucket, 10-40 s on a GPU), so the fuzz
draws few configurations and many cases under each: random prompts (short ones in the 256-slot bucket, long ones
in the 512-slot one, some repetitive), budgets, EOS, batches of lanes and sampling. It starts with the shape a GPU
runs by default ((15,5,15), prompt lookup 2, a tree of 60, no plain steps, split on CUDA), then a batch, sampling,
EOS, and configurations drawn as tests/test_random_settings.py draws them. Tiny random models in float64 (every
family the tests use), so a mismatch is a bug, not a near-tie.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny models and their random cases
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

import lp  # noqa: E402
from lp.batched_decoding import BatchedDecoder  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from models import tiny_model  # noqa: E402
from test_random_settings import expected, random_case  # noqa: E402

BEGAN = time.time()
GPU_SHAPE = dict(window=15, ngram=5, guess=15, lookup=2, budget=60, plain_steps=False)


def log(*parts) -> None:
    print(f"[{time.time() - BEGAN:6.1f}s]", *parts, flush=True)


def groups(rng: random.Random) -> list[dict]:
    """The configurations, in the order they run: the GPU's default shape first."""
    fixed = [dict(name="gpu shape", settings=dict(GPU_SHAPE)),  # the step as the device compiles it by default
             dict(name="batch of 3 lanes", settings=dict(window=7, ngram=5, guess=7), batch=3),
             dict(name="sampling", settings=dict(window=7, ngram=5, guess=7, sample=True, temperature=0.8, top_k=40,
                                                 seed=3)),
             dict(name="EOS and min_new_tokens", settings=dict(window=8, ngram=4, guess=8), eos=True)]
    drawn = []
    for number in range(40):
        case = random_case(rng)
        settings = {k: v for k, v in case["settings"].items() if k != "plain_steps" or case["fast"]}
        drawn.append(dict(name=f"drawn {number}", settings=settings, family=case["model"], batch=case["batch"],
                          eos=case["eos"] is not None))
    return fixed + drawn


def prompts_for(rng: random.Random, count: int, long_share: float) -> list[tuple[list[int], int]]:
    """Random (prompt, max_new_tokens) cases: some long enough for the 512-slot bucket, some repetitive."""
    cases = []
    for _ in range(count):
        size = rng.randrange(150, 300) if rng.random() < long_share else rng.choice([1, 2, rng.randrange(3, 60)])
        prompt = [rng.randrange(3, 97) for _ in range(size)]
        if rng.random() < 0.5:
            prompt = (prompt[: max(1, size // 4)] * 20)[:size]
        cases.append((prompt, rng.choice([1, 9, 40, 96])))
    return cases


def run_group(group: dict, rng: random.Random, device: str, count: int, deadline: float, result: dict) -> None:
    family = group.get("family", "llama")
    model = tiny_model(family, seed=rng.randrange(3)).to(device)
    eos = rng.randrange(3, 97) if group.get("eos") else None
    model.generation_config.eos_token_id = eos
    if group.get("eos") and rng.random() < 0.5:
        model.generation_config.min_new_tokens = rng.choice([1, 5])
    config = lp.LookaheadConfig(**group["settings"])
    cases = prompts_for(rng, count, long_share=0.3)
    batch = group.get("batch") or 0
    torch._dynamo.reset()
    began = time.time()
    if batch:
        decoder = BatchedDecoder(model, config, batch, compile=True)
        got = [r.token_ids for r in decoder.generate_many([p for p, _ in cases], [n for _, n in cases])]
    else:
        decoder = FastDecoder(model, config, compile=True)
        got = []
        for prompt, new in cases:
            if time.time() > deadline:
                break
            got.append(decoder.generate(prompt, new).token_ids)
    case_spec = dict(model=family, settings=group["settings"], prompts=[p for p, _ in cases][: len(got)],
                     max_new=[n for _, n in cases][: len(got)])
    want = expected(case_spec, model)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    result["cases"] += len(got)
    result["mismatches"] += len(bad)
    for i in bad[:3]:
        result["failures"].append(dict(group=group["name"], family=family, settings=group["settings"], eos=eos,
                                       prompt=cases[i][0], max_new=cases[i][1], got=got[i], want=want[i]))
    result["groups"].append(dict(name=group["name"], settings=group["settings"], family=family, cases=len(got),
                                 mismatches=len(bad), compile_error=decoder.compile_error,
                                 buckets=sorted(getattr(decoder, "_batched", None) or decoder._steps),
                                 seconds=round(time.time() - began, 1)))
    log(f"{group['name']}: {len(got)} cases, {len(bad)} mismatches, compile error {decoder.compile_error}, "
        f"{time.time() - began:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=180, help="start no configuration after this many seconds")
    p.add_argument("--cases", type=int, default=30, help="cases per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/cuda_fuzz.json")
    p.add_argument("--smoke", action="store_true", help="the CPU, two configurations of four cases")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        torch.set_num_threads(1)
        args.cases = 4
    rng = random.Random(args.seed)
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  transformers=transformers.__version__, cases=0, mismatches=0, failures=[], groups=[],
                  command=" ".join(sys.argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = groups(rng)[:2] if args.smoke else groups(rng)
    with torch.inference_mode():
        for group in todo:
            if time.time() - BEGAN > args.budget_s:
                break
            try:
                run_group(group, rng, device, args.cases, BEGAN + args.budget_s * 1.5, result)
            except Exception as error:  # a crash is a finding too: keep going
                result["failures"].append(dict(group=group["name"], settings=group["settings"],
                                               crash=f"{type(error).__name__}: {str(error)[:300]}"))
                log(f"{group['name']}: CRASH {type(error).__name__}: {str(error)[:300]}")
            result["seconds"] = round(time.time() - BEGAN, 1)
            out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"{result['cases']} cases, {result['mismatches']} mismatches, {len(result['failures'])} failures -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
