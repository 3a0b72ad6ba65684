"""Where the compiled fast path stops being exact on a device: one step's pieces compiled alone against eager
from the same state, then whole generations in several settings.

python benchmarks/cuda_exactness.py               (a GPU: about 3-4 minutes; on a CPU the same checks, slower)
python benchmarks/cuda_exactness.py --budget-s 200 (skip the generation checks that would start after 200 s)

The default code model in float64 (no near-tie flips in the model's own arithmetic), its first prompts, greedy.
Part 1 takes one FastStep of (15,5,15) after its prefill (prompt 0: capacity bucket 256) and runs each piece,
prompt lookup, the tree, `prepare`, the forward, `finish`, `local` and the whole `solo` step, eagerly and
compiled (no CUDA graphs) from the same saved state, printing every output and state tensor that differs;
then six whole steps in both ways. Part 2 generates 96 tokens with a compiled FastDecoder per setting and
prints the first index that differs from transformers' greedy output (or ok). On an H200 (torch 2.11),
(15,5,15) with the default lookup failed for prompts 0 and 1 (bucket 256) and passed for prompt 2 (bucket 512);
`results_published/gpu_h200/cuda_exactness_diagnosis.txt` holds that first run's output.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lp  # noqa: E402
from lp.candidate_tree import prompt_lookup  # noqa: E402
from lp.default_model import DEFAULT_PROMPTS, load_default_model  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from lp.greedy_rules import greedy_rules, hf_greedy  # noqa: E402

BEGAN = time.time()


def log(*parts) -> None:
    print(f"[{time.time() - BEGAN:6.1f}s]", *parts, flush=True)


def compare(name: str, eager, compiled) -> None:
    """Print whether two results (tensors, tuples or dataclasses of them) are equal; where not, the first places."""
    if isinstance(eager, (tuple, list)):
        for i, (e, c) in enumerate(zip(eager, compiled)):
            compare(f"{name}[{i}]", e, c)
        return
    if hasattr(eager, "__dataclass_fields__"):
        for field in eager.__dataclass_fields__:
            e, c = getattr(eager, field), getattr(compiled, field)
            if isinstance(e, torch.Tensor) or hasattr(e, "__dataclass_fields__"):
                compare(f"{name}.{field}", e, c)
        return
    if eager.dtype.is_floating_point:
        bad = ~(torch.isclose(eager, compiled, rtol=1e-9, atol=1e-9) | (eager.isnan() & compiled.isnan()))
        gap = (eager - compiled).abs().nan_to_num(0).max().item()
        log(f"{name}: {'DIFF' if bad.any() else 'ok'} max |eager - compiled| {gap:.3g}, NaN {eager.isnan().sum().item()}"
            f" / {compiled.isnan().sum().item()}, {bad.sum().item()} of {eager.numel()} off; first {bad.nonzero()[:4].tolist()}")
        return
    bad = eager != compiled
    if not bad.any():
        log(f"{name}: ok {tuple(eager.shape)}")
        return
    where = bad.nonzero()[:6]
    log(f"{name}: DIFF {bad.sum().item()} of {eager.numel()} at {where.tolist()}: eager "
        f"{[eager[tuple(i)].item() for i in where]} compiled {[compiled[tuple(i)].item() for i in where]}")


def pieces(model, prompt: list[int]) -> None:
    """Part 1: every piece of one (15,5,15) step, eager vs compiled, from one saved state."""
    decoder = FastDecoder(model, lp.LookaheadConfig(15, 5, 15), compile=False)
    rules = greedy_rules(model.generation_config, len(prompt), 96)
    step = decoder._step(len(prompt) + 96, rules)
    pool, window = decoder.initial_state(prompt, decoder.seed)
    step.start(prompt, pool, window, decoder.seed)
    log(f"prompt {len(prompt)} tokens, capacity {step.capacity}, {step.tokens} tokens fed a step")
    names = ["window", "pending", "pending_count", "tail", "history", "history_len", "prompt_len", "seed",
             "fingerprint", "step_slots", "out", "kv_start", "length"]

    def state() -> dict[str, torch.Tensor]:
        found = {n: getattr(step, n) for n in names}
        found.update({f"pool.{n}": getattr(step.pool, n) for n in ("tokens", "count", "next")})
        for i, layer in enumerate(step.cache.layers):
            found[f"keys{i}"], found[f"values{i}"] = layer.keys, layer.values
        return found

    def save() -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in state().items()}

    def load(saved) -> None:
        for n, t in state().items():
            t.copy_(saved[n])

    def copied(x):
        return tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone() if isinstance(x, torch.Tensor) else x

    def both(name: str, fn, base) -> None:
        load(base)
        eager = copied(fn())
        after_eager = save()
        load(base)
        began = time.time()
        compiled = copied(torch.compile(fn, fullgraph=True, dynamic=False)())
        log(f"== {name} (compile and run {time.time() - began:.1f} s)")
        compare(name, eager, compiled)
        after = save()
        for n, e in after_eager.items():
            if not torch.equal(e, after[n]):
                compare(f"   state {n}", e, after[n])

    start = save()
    if step.shape.lookup:
        both("prompt_lookup", lambda: prompt_lookup(step.history, step.history_len, step.shape.lookup,
                                                    step.shape.lookup_len), start)
    both("tree", step._tree, start)
    both("prepare", step.prepare, start)
    load(start)
    fed = step.prepare()
    prepared = save()

    def forward():
        return step.model(input_ids=fed.tokens[None], position_ids=fed.positions[None], attention_mask=fed.mask,
                          use_cache=True, logits_to_keep=step.keep_rows, **{step.cache_arg: step.cache}).logits[0]
    load(prepared)
    logits = forward().clone()
    both("forward", forward, prepared)
    both("finish", lambda: step.finish(logits, fed), prepared)
    both("local", step.local, start)
    both("solo", step.solo, start)
    load(start)
    solo = torch.compile(step.solo, fullgraph=True, dynamic=False)
    base = start
    for k in range(6):
        load(base)
        eager = step.solo().clone()
        after_eager = save()
        load(base)
        compiled = solo().clone()
        after = save()
        same = torch.equal(eager, compiled)
        log(f"step {k + 1}: eager {eager.tolist()} compiled {compiled.tolist()} {'same' if same else 'DIFFERENT'}")
        for n, e in after_eager.items():
            if not torch.equal(e, after[n]) and not n.startswith(("keys", "values")):
                compare(f"   state {n}", e, after[n])
        base = after_eager


def generations(model, tokenizer, budget_s: float) -> None:
    """Part 2: whole compiled generations per setting, against transformers' greedy output."""
    prompts = [tokenizer(p)["input_ids"] for p in DEFAULT_PROMPTS[:3]]
    cuda = next(model.parameters()).device.type == "cuda"
    settings = [("15,5,15 default", lp.LookaheadConfig(15, 5, 15), None, (0, 1, 2), 96),
                ("15,5,15 default, bucket 512", lp.LookaheadConfig(15, 5, 15), None, (0,), 200),
                ("15,5,15 no CUDA graphs", lp.LookaheadConfig(15, 5, 15), "none", (0, 1), 96),
                ("15,5,15 lookup 0", lp.LookaheadConfig(15, 5, 15, lookup=0), None, (0, 1), 96),
                ("15,5,14 (16 tree rows)", lp.LookaheadConfig(15, 5, 14), None, (0, 1), 96),
                ("15,5,15 lookup 1 (16 tree rows)", lp.LookaheadConfig(15, 5, 15, lookup=1), None, (0, 1), 96),
                ("7,5,7 lookup 2", lp.LookaheadConfig(7, 5, 7), None, (0, 1), 96)]
    compile_as_is = torch.compile
    for name, config, mode, which, tokens in settings:
        if time.time() - BEGAN > budget_s:
            log(f"{name}: skipped (past --budget-s)")
            continue
        if mode == "none" and cuda:
            torch.compile = lambda fn, **kw: compile_as_is(fn, **{**kw, "mode": None})
        decoder = FastDecoder(model, config, compile=True)
        for i in which:
            got = decoder.generate(prompts[i], tokens)
            expected = hf_greedy(model, prompts[i], tokens)
            bad = next((j for j, (a, b) in enumerate(zip(got.token_ids, expected)) if a != b), None)
            verdict = "ok" if bad is None and len(got.token_ids) == len(expected) else f"FIRST WRONG AT {bad}"
            log(f"{name}, prompt {i}, {tokens} tokens: {verdict}; accepted {got.accepted_per_step[:6]}, "
                f"{got.steps} steps, compile error {decoder.compile_error}")
        torch.compile = compile_as_is


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=400, help="start no generation check after this many seconds")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_default_model(torch.float64, device)
    log(f"{device}: torch {torch.__version__}")
    with torch.inference_mode():
        pieces(model, tokenizer(DEFAULT_PROMPTS[0])["input_ids"])
    generations(model, tokenizer, args.budget_s)
    log("done")


if __name__ == "__main__":
    main()
