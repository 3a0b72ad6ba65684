"""Step latency of lp's compiled fast path on one GPU, against a compiled 1-token greedy step and the weight-read floor.

python benchmarks/gpu_fast_path.py --out benchmarks/results/gpu_fast_path.json   (a few minutes on one H100/H200)
python benchmarks/gpu_fast_path.py --smoke                                        (tiny model on the CPU: the same code)

On one CUDA GPU it builds a random-initialised 7B-shaped Llama (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab
32000) in bf16 directly on the device (no download) and measures, each after its compile and warm-up, with
torch.cuda.synchronize() after every step:
  (a) a compiled 1-token greedy decode step: lp's SlotCache, one token, argmax, torch.compile(fullgraph=True,
      dynamic=False, mode="reduce-overhead") (CUDA graphs), the host reading the token each step as a decode loop does;
  (b) lp's FastDecoder step (compile=True, --step-graphs split or whole, the step replayed from one CUDA graph) for
      every --configs W:N:G, timed step
      by step through FastDecoder.stream (step 1, with the prefill, left out). (1,2,0) is the smallest lookahead
      step (2 tokens fed: the pending token and one window token), i.e. the fast path's own overhead on a greedy step;
  (c) ms per token: greedy = its step; lookahead = its step / tokens per step, ASSUMED from --tokens-per-step
      (defaults measured on CPU for the embedded default model, see the flag); the random model's own tokens per
      step are printed too but mean nothing (random weights);
  (d) the weight-read floor = parameter bytes / --bandwidth-gbs (default by device name: H100 3350, H200 4800).
Ratios: lookahead step / 1-token step (goal <= 1.3) and compiled greedy step / floor (goal <= 1.3). Prints a
markdown table, writes JSON to --out after every stage (a run cut short keeps what it measured). Without CUDA it
prints one `skipped:` line and exits 0, unless --smoke.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from lp.config import LookaheadConfig  # noqa: E402
from lp.decoding import cache_argument  # noqa: E402
from lp.fast_decoding import FastDecoder, capacity_bucket  # noqa: E402
from lp.slot_cache import SlotCache  # noqa: E402

# Tokens per step of lp's compiled fast path on the embedded default model (a 2.6M-parameter Python-code Llama; CPU,
# 256 new tokens, the first 5 prompts of prompts/code.jsonl): benchmarks/results_published/fast_path_cpu.md. A small
# model on repetitive code: a real 7B model's figure differs, so pass its own with --tokens-per-step. (1,2,0) verifies
# no candidates (G = 0), so it commits exactly 1 token a step.
TOKENS_PER_STEP = "15:5:15=3.57,7:5:7=3.35,1:2:0=1.00"
BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0))
SMOKE_SHAPE = dict(hidden=32, layers=1, heads=4, ffn=64, vocab=97)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="15:5:15,7:5:7,1:2:0", help="W:N:G steps to time")
    p.add_argument("--tokens-per-step", default=TOKENS_PER_STEP,
                   help="ASSUMED tokens per step by W:N:G for the ms/token rows (default: the compiled fast path on "
                        "the default model on CPU, benchmarks/results_published/fast_path_cpu.md)")
    p.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the floor (default: by device name, "
                   "H100 SXM 3350, H100 PCIe 2000, H100 NVL 3900, H200 4800; otherwise the measured copy bandwidth)")
    p.add_argument("--step-graphs", default="", help="how each lookahead step compiles, comma-separated: "
                   "split (the forward a graph of its own) and/or whole (one graph); default: the device's default")
    p.add_argument("--prompt-tokens", type=int, default=128, help="random prompt length")
    p.add_argument("--steps", type=int, default=48, help="timed steps per method (after step 1)")
    p.add_argument("--warmup-steps", type=int, default=6, help="untimed steps after compiling (CUDA graph recording)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 (float32 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few steps: checks the script end to "
                   "end (and that every method gives greedy's tokens); not a measurement")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_fast_path.json"))
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random LlamaForCausalLM of `shape`, initialised on `device` (no weights read from anywhere)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         intermediate_size=shape["ffn"], vocab_size=shape["vocab"], max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # random weights: decode to the token limit, never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


class GreedyStep:
    """A hand-made static-cache greedy decode step: feed one token at slot `length`, take the argmax, advance.

    All state is in tensors updated in place (the token, the cache and its length), so the compiled step replays as
    one CUDA graph; the caller reads the token on the host every step, as a decode loop must."""

    def __init__(self, model, capacity: int, compile_mode: str | None):
        param = next(model.parameters())
        self.model, self.capacity, self.device, self.dtype = model, capacity, param.device, param.dtype
        self.cache_arg = cache_argument(model)
        layers = model.config.num_hidden_layers
        self.cache = SlotCache(layers, capacity, self.device)
        to = dict(device=self.device, dtype=torch.long)
        self.token = torch.zeros(1, 1, **to)
        self.slot = torch.zeros(1, **to)
        self.columns = torch.arange(capacity, device=self.device)
        for t in (self.token, self.slot, self.columns):
            torch._dynamo.mark_static_address(t)
        self.compiled = torch.compile(self.step, fullgraph=True, dynamic=False, mode=compile_mode)

    def start(self, prompt: list[int]) -> None:
        """Prefill the prompt (eager) and set the first token to feed: greedy's first new token."""
        n = len(prompt)
        ids = torch.tensor([prompt], device=self.device)
        self.cache.slots = torch.arange(n, device=self.device)
        mask = torch.full((n, self.capacity), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill_(self.columns[None, :] <= torch.arange(n, device=self.device)[:, None], 0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=self.cache.slots[None], attention_mask=mask[None, None],
                             use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
            self.token.copy_(out.logits[0, -1].argmax().view(1, 1))
            self.cache.length.fill_(n)
        self.cache.slots = self.slot

    def step(self) -> torch.Tensor:
        length = self.cache.length
        self.slot.copy_(length.view(1))
        visible = self.columns <= length
        mask = torch.where(visible, 0.0, torch.finfo(self.dtype).min).to(self.dtype).view(1, 1, 1, self.capacity)
        out = self.model(input_ids=self.token, position_ids=length.view(1, 1), attention_mask=mask, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: self.cache})
        self.token.copy_(out.logits[0, -1].argmax().view(1, 1))
        self.cache.length.add_(1)
        return self.token


def time_greedy(model, prompt, capacity, args, device) -> dict:
    """Compile, warm up, then time `steps` greedy steps (host read + synchronize after each)."""
    greedy = GreedyStep(model, capacity, "reduce-overhead" if device.type == "cuda" else None)
    greedy.start(prompt)
    first = [int(greedy.token.item())]
    began = time.perf_counter()
    with torch.inference_mode():
        first.append(int(greedy.compiled().item()))
        sync(device)
        compile_s = time.perf_counter() - began
        for _ in range(args.warmup_steps):
            first.append(int(greedy.compiled().item()))
        greedy.start(prompt)  # the same generation again, timed
        tokens, times = [int(greedy.token.item())], []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            tokens.append(int(greedy.compiled().item()))
            sync(device)
            times.append(time.perf_counter() - t0)
    common = min(len(tokens), len(first))  # recorded, not asserted: a GPU run should not die on it
    return dict(method="compiled greedy step", config=None, tokens_fed=1, capacity=capacity,
                compile_s=round(compile_s, 2), **_stats(times), tokens=tokens,
                same_tokens_as_its_compiling_run=tokens[:common] == first[:common])


def time_lookahead(model, cfg: LookaheadConfig, prompt, max_new: int, args, device) -> dict:
    """FastDecoder(compile=True): compile and warm up on a first generation, then time `steps` steps of a second."""
    decoder = FastDecoder(model, cfg, compile=True)

    def steps(count: int) -> tuple[list[float], list[int], list[int]]:
        times, accepted, tokens = [], [], []
        stream = decoder.stream(prompt, max_new)
        sync(device)
        last = time.perf_counter()
        for emitted in stream:
            sync(device)
            now = time.perf_counter()
            times.append(now - last)
            last = now
            accepted.append(len(emitted))
            tokens += emitted
            if len(times) > count:
                break
        stream.close()
        return times, accepted, tokens

    steps(args.warmup_steps)  # compiles the step of this cache bucket, records the CUDA graph
    times, accepted, tokens = steps(args.steps)
    return dict(method="lp FastDecoder step" + (f" ({cfg.step_graphs})" if cfg.step_graphs else ""),
                config=f"{cfg.window}:{cfg.ngram}:{cfg.guess}", step_graphs=cfg.step_graphs,
                tokens_fed=decoder.step_tokens, capacity=capacity_bucket(len(prompt) + max_new + decoder.step_tokens),
                compile_s=round(decoder.compile_time_s, 2), compile_error=decoder.compile_error,
                **_stats(times[1:]), random_model_tokens_per_step=round(statistics.fmean(accepted[1:]), 3),
                tokens=tokens)


def _stats(times: list[float]) -> dict:
    ms = [1e3 * t for t in times]
    return dict(steps_timed=len(ms), ms_median=round(statistics.median(ms), 4), ms_mean=round(statistics.fmean(ms), 4),
                ms_min=round(min(ms), 4))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), median of 10 copies."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n * 2 / statistics.median(times) / 1e9


def bandwidth(args, device: torch.device, name: str) -> tuple[float, str]:
    if args.bandwidth_gbs:
        return args.bandwidth_gbs, "--bandwidth-gbs"
    for key, gbs in BANDWIDTH_GBS:
        if key in name:
            return gbs, f"spec sheet for {key} (by device name)"
    return round(copy_bandwidth(device), 1), "measured device-to-device copy (no spec figure for this device)"


def parse_tokens_per_step(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value)
    return out


def markdown(result: dict) -> str:
    env, floor = result["environment"], result["floor"]
    greedy = next((r for r in result["rows"] if r["config"] is None), None)
    lines = [f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}; {env['date_utc']}",
             f"model: {result['model']}, {result['parameter_bytes'] / 1e9:.2f} GB of {env['dtype']} parameters; "
             f"prompt {result['settings']['prompt_tokens']} random tokens; {result['settings']['steps']} timed steps "
             "each (synchronized), median", "",
             "| step | W:N:G | tokens fed | ms/step median | mean | vs 1-token step | tokens/step (assumed) | "
             "ms/token | speedup vs compiled greedy | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        vs = f"{r['ms_median'] / greedy['ms_median']:.2f}" if greedy else "-"
        tps = r.get("assumed_tokens_per_step")
        per_token = r.get("ms_per_token")
        speedup = f"{greedy['ms_per_token'] / per_token:.2f}" if greedy and per_token else "-"
        lines.append(f"| {r['method']} | {r['config'] or '-'} | {r['tokens_fed']} | {r['ms_median']:.3f} | "
                     f"{r['ms_mean']:.3f} | {vs} | {tps if tps is not None else '-'} | "
                     f"{f'{per_token:.3f}' if per_token else '-'} | {speedup} | {r['compile_s']:.1f} |")
    lines += ["", f"Weight-read floor: {result['parameter_bytes'] / 1e9:.2f} GB / {floor['bandwidth_gbs']} GB/s "
              f"({floor['bandwidth_source']}) = {floor['ms']:.3f} ms per step (parameters only: no KV cache, and the "
              "whole embedding table although a step reads one row of it)."]
    for goal in result["goals"]:
        lines.append(f"- {goal['what']}: {goal['value']:.2f} (goal <= {goal['goal']}: "
                     f"{'met' if goal['met'] else 'NOT met'})")
    lines.append("- random-weights tokens/step (meaningless, for the record): "
                 + ", ".join(f"{r['config']} {r['random_model_tokens_per_step']}" for r in result["rows"]
                             if r["config"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("skipped: gpu_fast_path.py needs a CUDA GPU and none is present (nothing measured; --smoke runs a tiny "
              "model on the CPU)")
        return 0
    import transformers

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    if args.smoke:
        torch.set_num_threads(1)
        args.steps, args.warmup_steps, args.prompt_tokens = min(args.steps, 4), min(args.warmup_steps, 2), 8
    shape = SMOKE_SHAPE if args.smoke else dict(hidden=4096, layers=32, heads=32, ffn=11008, vocab=32000)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--smoke: not a measurement)"
    # the full step's time: plain steps (one token, when a step has no candidate) would mix in greedy steps
    configs = [LookaheadConfig(*map(int, c.split(":")), plain_steps=False, step_graphs=graphs or None)
               for graphs in args.step_graphs.split(",") for c in args.configs.split(",") if c]
    assumed = parse_tokens_per_step(args.tokens_per_step)
    began = time.time()
    model = build_model(shape, device, dtype)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    gbs, source = bandwidth(args, device, name)
    floor_ms = params / (gbs * 1e9) * 1e3
    seeded = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, shape["vocab"], (args.prompt_tokens,), generator=seeded).tolist()
    max_new = args.steps * max(c.ngram for c in configs) + 8  # enough tokens for `steps` steps of every config
    buckets = {capacity_bucket(args.prompt_tokens + max_new + FastDecoder(model, c, compile=False).step_tokens)
               for c in configs}
    capacity = max(buckets)
    result = dict(environment=dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                                   dtype=str(dtype).removeprefix("torch."), command=" ".join(sys.argv),
                                   date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                  settings=dict(vars(args), max_new_tokens=max_new, capacity_buckets=sorted(buckets)),
                  model=", ".join(f"{k} {v}" for k, v in shape.items()), prompt=prompt, parameter_bytes=params,
                  floor=dict(bandwidth_gbs=gbs, bandwidth_source=source, ms=floor_ms), rows=[], goals=[])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["environment"]["seconds"] = round(time.time() - began, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")

    save()
    greedy = time_greedy(model, prompt, capacity, args, device)
    greedy.update(assumed_tokens_per_step=1.0, ms_per_token=greedy["ms_median"])
    result["rows"].append(greedy)
    save()
    print(f"compiled greedy step: {greedy['ms_median']:.3f} ms (compile {greedy['compile_s']} s)", file=sys.stderr)
    for cfg in configs:
        row = time_lookahead(model, cfg, prompt, max_new, args, device)
        tps = assumed.get(row["config"])
        row.update(assumed_tokens_per_step=tps, ms_per_token=round(row["ms_median"] / tps, 4) if tps else None)
        common = min(len(row["tokens"]), len(greedy["tokens"]))
        row["equals_greedy_step_tokens"] = row["tokens"][:common] == greedy["tokens"][:common]
        result["rows"].append(row)
        save()
        print(f"{row['config']}: {row['ms_median']:.3f} ms/step, {row['tokens_fed']} tokens fed (compile "
              f"{row['compile_s']} s)", file=sys.stderr)

    result["goals"] = [dict(what="compiled greedy step / weight-read floor", value=greedy["ms_median"] / floor_ms,
                            goal=1.3, met=greedy["ms_median"] / floor_ms <= 1.3)]
    for row in result["rows"][1:]:
        ratio = row["ms_median"] / greedy["ms_median"]
        result["goals"].append(dict(what=f"lookahead step {row['config']} ({row['tokens_fed']} tokens) / 1-token step",
                                    value=ratio, goal=1.3, met=ratio <= 1.3))
    save()
    print(markdown(result))
    print(f"wrote {out}", file=sys.stderr)
    if args.smoke:  # a tiny float32 model: every method must give transformers' greedy tokens
        from lp.greedy_rules import hf_greedy

        expect = hf_greedy(model, prompt, len(greedy["tokens"]))
        bad = [r["method"] + (f" {r['config']}" if r["config"] else "") for r in result["rows"]
               if r["tokens"][: len(expect)] != expect[: len(r["tokens"])]]
        if bad:
            print(f"error: not greedy's tokens: {', '.join(bad)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
