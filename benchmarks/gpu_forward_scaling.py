"""Forward latency of a random 7B-shaped Llama (bf16, one GPU) as tokens per step grow, and projected LP speedups.

python benchmarks/gpu_forward_scaling.py [--out DIR]   (about 2-4 minutes on one H100; refuses without CUDA)

Measures, after a KV prefix of --prefix tokens, one forward of T = 1, 2, 4, ..., --max-tokens tokens with a dense
additive float mask (what lp passes; SDPA's cost does not depend on the mask's pattern), keeping the logits of all
T rows (an upper bound on lp's kept rows). Next to it the memory-bandwidth floor: (weight + KV-prefix bytes) /
measured device-to-device copy bandwidth. From those, PROJECTED (not measured) LP step latency on P GPUs:
    step(P) = t_fwd(tokens fed by the busiest rank) + t_comm(P)
where the W*(N-1) lookahead and G*(N-1) verification tokens are split over P ranks as lp.distributed.partition splits them
(a later window slice also feeds the level-0 prefix before it), each rank adds its pending tokens: 1, or with
kv recompute the tokens/step A on the ranks that lost the step (they re-feed the winner's tokens), and NCCL is modelled as a ring all-gather of the
(2+N+W) int64 step row, (P-1)*(alpha + row/beta), plus for kv gather a broadcast of the N KV slots,
ceil(log2 P)*alpha + bytes/beta. Speedup over greedy assumes A tokens per step (--tokens-per-step): measure A on
a real model with benchmarks/sweep.py; LP does not change A.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lp.cuda_graph import CapturedStep  # noqa: E402
from lp.distributed.partition import rank_load, split_step  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prefix", type=int, default=512, help="KV-cache tokens before the timed step")
    p.add_argument("--max-tokens", type=int, default=256, help="largest tokens per step (powers of two from 1)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", default="15:5:15,7:5:7,5:4:5", help="W:N:G settings to project")
    p.add_argument("--nproc", default="2,4,8", help="GPU counts to project")
    p.add_argument("--tokens-per-step", type=float, default=2.5, help="ASSUMED accepted tokens per step A")
    p.add_argument("--nccl-alpha-us", type=float, default=10.0, help="NCCL per-hop latency, microseconds")
    p.add_argument("--nccl-bw-gbs", type=float, default=150.0, help="NCCL bus bandwidth, GB/s")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test of the script)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each forward from a captured CUDA graph "
                   "(lp.cuda_graph): the GPU's time for T tokens, without the host's Python overhead")
    p.add_argument("--out", help="output folder (default benchmarks/results/gpu-<time>)")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int) -> float:
    """Median seconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 2 / timed(lambda: dst.copy_(src), device, iters, 2)


def build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, vocab_size=args.vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def forward_latencies(model, args, device, dtype) -> dict[int, float]:
    """Median forward seconds for T tokens on top of a --prefix KV cache, T = 1, 2, 4, ..., --max-tokens."""
    from lp.decoding import cache_argument
    from lp.kv_cache import InPlaceCache

    arg = cache_argument(model)  # `cache` in recent transformers, `past_key_values` in 5.17 (the GPU machines')
    cache = InPlaceCache(capacity=args.prefix + args.max_tokens + 64)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, args.vocab, (1, args.prefix), generator=g).to(device)
    low = torch.finfo(dtype).min
    with torch.inference_mode():
        causal = torch.full((args.prefix, args.prefix), low, dtype=dtype, device=device).triu_(1)
        model(input_ids=prefix, attention_mask=causal[None, None], **{arg: cache}, use_cache=True, logits_to_keep=1)
        out = {}
        t = 1
        while t <= args.max_tokens:
            ids = torch.randint(3, args.vocab, (1, t), generator=g).to(device)
            pos = (args.prefix + torch.arange(t, device=device)).unsqueeze(0)
            mask = torch.zeros(t, args.prefix + t, dtype=dtype, device=device)
            mask[:, args.prefix:] = torch.full((t, t), low, dtype=dtype, device=device).triu_(1)

            def step():
                model(input_ids=ids, position_ids=pos, attention_mask=mask[None, None], **{arg: cache}, use_cache=True,
                      logits_to_keep=t)
                cache.crop_to(args.prefix)

            if args.cuda_graphs and device.type == "cuda":  # warm-up, capture, then replays (the cache writes the
                step = CapturedStep(step)  # same slots each time: it is cropped back to the prefix after each)
            out[t] = timed(step, device, args.iters, max(args.warmup, 2))
            t *= 2
    return out


def interpolate(lat: dict[int, float], tokens: float) -> float:
    """Forward seconds at `tokens`, linear between the measured powers of two (clamped at the ends)."""
    keys = sorted(lat)
    if tokens <= keys[0]:
        return lat[keys[0]]
    for a, b in zip(keys, keys[1:]):
        if tokens <= b:
            return lat[a] + (lat[b] - lat[a]) * (tokens - a) / (b - a)
    return lat[keys[-1]] * tokens / keys[-1]


def busiest_rank_tokens(window: int, ngram: int, guess: int, pending: list[int]) -> int:
    """Tokens the busiest rank feeds in a full step, split exactly as lp splits it (level-0 prefix included)."""
    slices = split_step(window, ngram - 1, guess, ngram - 1, pending)
    return max(rank_load(s, ngram - 1, ngram - 1, p) for s, p in zip(slices, pending))


def project(lat: dict[int, float], args, kv_bytes_per_token: int) -> list[dict]:
    """PROJECTED LP step latency and speedups for every W:N:G, P and KV strategy (see the module docstring)."""
    alpha, beta, a = args.nccl_alpha_us * 1e-6, args.nccl_bw_gbs * 1e9, args.tokens_per_step
    rows = []
    for cfg in args.configs.split(","):
        w, n, g = map(int, cfg.split(":"))
        single = interpolate(lat, busiest_rank_tokens(w, n, g, [1]))
        for p in [1] + [int(x) for x in args.nproc.split(",")]:
            for kv in (["none"] if p == 1 else ["recompute", "gather"]):
                # recompute: the ranks that lost the step re-feed the A accepted tokens at its head
                pending = [1] + [1 if kv != "recompute" else math.ceil(a)] * (p - 1)
                fed = busiest_rank_tokens(w, n, g, pending)
                fwd = interpolate(lat, fed) if p > 1 else single
                comm = 0.0 if p == 1 else (p - 1) * (alpha + (2 + n + w) * 8 / beta)
                if kv == "gather":
                    comm += math.ceil(math.log2(p)) * alpha + n * kv_bytes_per_token / beta
                step = fwd + comm
                rows.append(dict(window=w, ngram=n, guess=g, gpus=p, kv_sync=kv, tokens_fed_per_rank=fed,
                    fwd_ms=round(1e3 * fwd, 3),
                    comm_ms=round(1e3 * comm, 4), step_ms=round(1e3 * step, 3),
                    projected_speedup_vs_1gpu_lookahead=round(single / step, 3),
                    projected_speedup_vs_greedy=round(a * lat[1] / step, 3)))
    return rows


def plot(lat, floor_s, rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ts = sorted(lat)
    ax1.plot(ts, [1e3 * lat[t] for t in ts], marker="o", label="measured forward")
    ax1.axhline(1e3 * floor_s, color="red", linestyle="--", label="memory-bandwidth floor")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("tokens per step T")
    ax1.set_ylabel("ms per forward")
    ax1.set_title(title, fontsize=8)
    ax1.legend(fontsize=8)
    for key in sorted({(r["window"], r["ngram"], r["guess"], r["kv_sync"]) for r in rows if r["gpus"] > 1}):
        pts = [r for r in rows if (r["window"], r["ngram"], r["guess"]) == key[:3] and r["kv_sync"] in ("none", key[3])]
        ax2.plot([r["gpus"] for r in pts], [r["projected_speedup_vs_greedy"] for r in pts], marker="o",
                 label=f"{key[:3]} {key[3]}")
    ax2.set_xlabel("GPUs P")
    ax2.set_ylabel("PROJECTED speedup over greedy")
    ax2.set_title("PROJECTED from measured forward latency + NCCL model (not measured)", fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: gpu_forward_scaling.py needs a CUDA GPU and none is present (nothing measured)")
        return 0
    dtype = torch.bfloat16
    began = time.time()
    model = build_model(args, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = args.hidden // args.heads
    kv_bytes_per_token = args.layers * 2 * args.kv_heads * head_dim * 2
    bandwidth = copy_bandwidth(device, args.iters)
    floor = (weight_bytes + args.prefix * kv_bytes_per_token) / bandwidth
    lat = forward_latencies(model, args, device, dtype)
    rows = project(lat, args, kv_bytes_per_token)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test, not a GPU figure)"
    env = dict(device=name, torch=torch.__version__, cuda_graphs=bool(args.cuda_graphs and device.type == "cuda"), date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               command=" ".join(sys.argv), seconds=round(time.time() - began, 1))
    result = dict(environment=env, settings=vars(args), weight_bytes=weight_bytes,
                  copy_bandwidth_gbs=round(bandwidth / 1e9, 2), floor_ms=round(1e3 * floor, 3),
                  forward_ms={str(t): round(1e3 * s, 3) for t, s in lat.items()}, projected=rows)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / time.strftime("gpu-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_forward_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(lat, floor, rows, out / "gpu_forward_scaling.png", f"{name}, {weight_bytes / 1e9:.1f} GB bf16 weights, "
         f"prefix {args.prefix}")
    print(f"{name}: weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
          f"floor {1e3 * floor:.2f} ms")
    print("| T | forward ms | x floor |\n|---|---|---|")
    for t, s in lat.items():
        print(f"| {t} | {1e3 * s:.2f} | {s / floor:.2f} |")
    print("\nPROJECTED (measured t_fwd + NCCL model; assumed A = %.2f tokens/step)\n" % args.tokens_per_step)
    print("| W,N,G | GPUs | KV | tokens/rank | fwd ms | comm ms | step ms | vs 1-GPU lookahead | vs greedy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['window']},{r['ngram']},{r['guess']} | {r['gpus']} | {r['kv_sync']} | {r['tokens_fed_per_rank']} "
              f"| {r['fwd_ms']} | {r['comm_ms']} | {r['step_ms']} | {r['projected_speedup_vs_1gpu_lookahead']} | "
              f"{r['projected_speedup_vs_greedy']} |")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
