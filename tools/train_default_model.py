"""Train the project's default model: a tiny LLaMA-style causal LM on Python stdlib source.

A development tool, not installed with lp (needs the [train] extra). Reproducible and seeded. Example:
    python tools/train_default_model.py --out lp/assets/code_model --minutes 42
    python tools/train_default_model.py --out /tmp/smoke --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

EOT = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "lib-dynload"}
MAX_FILE_BYTES = 256 * 1024


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, str]]:
    """Return sorted (relative path, text) pairs of the stdlib's Python sources, tests excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith(("_sysconfigdata", "test_")) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def is_heldout(rel: str, every: int = 20) -> bool:
    """Deterministic held-out split: about 1 in `every` files, chosen by a hash of the path."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % every == 0


def split_files(files):
    """Split (rel, text) pairs into (train, heldout) lists."""
    train = [f for f in files if not is_heldout(f[0])]
    held = [f for f in files if is_heldout(f[0])]
    return train, held


def train_tokenizer(texts, vocab_size: int):
    """Train a byte-level BPE tokenizer (lossless round trip) that prepends <|endoftext|> as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, tok.token_to_id(EOT))]
    )
    return tok


def wrap_tokenizer(tok, max_length=None):
    """Wrap a `tokenizers.Tokenizer` as a transformers PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=None,
        clean_up_tokenization_spaces=False, model_max_length=max_length,
    )


def encode_corpus(tok, texts):
    """Concatenate files as one id stream: <|endoftext|> file <|endoftext|> file ..."""
    import torch

    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def build_model(vocab_size, eot_id, dim, layers, heads, ctx, ffn_mult=8 / 3):
    """Build a small LlamaForCausalLM with tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ffn = int(round(dim * ffn_mult / 32)) * 32
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=ctx,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
    )
    return LlamaForCausalLM(cfg)


def lr_at(step, total, peak, warmup, min_ratio=0.1):
    """Linear warmup then cosine decay to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def heldout_loss(model, ids, ctx, max_chunks=None, batch=8):
    """Mean next-token cross-entropy (nats/token) over non-overlapping held-out chunks."""
    import torch

    n = (len(ids) - 1) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            idx = range(i, min(n, i + batch))
            x = torch.stack([ids[j * ctx:(j + 1) * ctx] for j in idx])
            y = torch.stack([ids[j * ctx + 1:(j + 1) * ctx + 1] for j in idx])
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            tot, cnt = tot + loss.item(), cnt + y.numel()
    model.train()
    return tot / max(1, cnt), cnt


def function_headers(held, limit):
    """Pick deterministic prompts from held-out files: a `def` line plus the start of its docstring."""
    pat = re.compile(r'^( *)def \w+\(.*\).*:\n\1    """', re.M)
    out = []
    for rel, text in held:
        m = pat.search(text)
        if m:
            out.append((rel, m.group(0)))
        if len(out) >= limit:
            break
    return out


def greedy_samples(model, hf_tok, prompts, max_new_tokens):
    """Greedy completions via model.generate(do_sample=False)."""
    import torch

    model.eval()
    res = []
    for rel, prompt in prompts:
        enc = hf_tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=hf_tok.pad_token_id)
        completion = hf_tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        res.append({"file": rel, "prompt": prompt, "completion": completion})
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (HF format)")
    p.add_argument("--stdlib", default=None, help="corpus root (default: this interpreter's stdlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap; stops early (schedule unchanged)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps, schedule unchanged (replays a --minutes-capped run)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N train files")
    p.add_argument("--eval-chunks", type=int, default=None, help="cap held-out chunks evaluated")
    p.add_argument("--samples", type=int, default=5, help="greedy completions in the report")
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="seconds-long run on a few files (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.dim, args.layers, args.heads, args.ctx = 384, 32, 1, 2, 64
        args.batch, args.steps, args.warmup, args.max_files = 2, 5, 2, 6
        args.eval_chunks, args.samples, args.sample_tokens, args.log_every = 4, 1, 8, 1
    return args


def main(argv=None):
    """Collect corpus, train tokenizer and model, save HF directory plus report."""
    args = parse_args(argv)
    if args.threads == 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, held = split_files(stdlib_files(args.stdlib))
    if args.max_files:
        train, held = train[: args.max_files], held[: max(1, args.max_files // 3)]
    print(f"files: train={len(train)} heldout={len(held)}", flush=True)

    tok = train_tokenizer((t for _, t in train), args.vocab)
    eot = tok.token_to_id(EOT)
    train_ids = encode_corpus(tok, [t for _, t in train])
    held_ids = encode_corpus(tok, [t for _, t in held])
    train_bytes = sum(len(t.encode()) for _, t in train)
    held_bytes = sum(len(t.encode()) for _, t in held)
    print(f"tokens: train={len(train_ids)} heldout={len(held_ids)} vocab={tok.get_vocab_size()}", flush=True)

    model = build_model(tok.get_vocab_size(), eot, args.dim, args.layers, args.heads, args.ctx)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    gen = torch.Generator().manual_seed(args.seed)
    n_chunks = (len(train_ids) - 1) // args.ctx
    order, pos, epoch = torch.randperm(n_chunks, generator=gen), 0, 0
    model.train()
    t_train, step, tokens_seen, ema = time.time(), 0, 0, None
    for step in range(args.steps):
        if args.minutes and time.time() - t_start > args.minutes * 60:
            print(f"time cap reached at step {step}", flush=True)
            break
        if args.stop_at is not None and step >= args.stop_at:
            break
        if pos + args.batch > n_chunks:
            order, pos, epoch = torch.randperm(n_chunks, generator=gen), 0, epoch + 1
        idx = order[pos:pos + args.batch].tolist()
        pos += args.batch
        x = torch.stack([train_ids[i * args.ctx:(i + 1) * args.ctx] for i in idx])
        y = torch.stack([train_ids[i * args.ctx + 1:(i + 1) * args.ctx + 1] for i in idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += y.numel()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step} loss {loss.item():.4f} ema {ema:.4f} lr {g['lr']:.2e} "
                  f"tok/s {tokens_seen / el:.0f} elapsed {el:.0f}s", flush=True)
    else:
        step = args.steps
    train_secs = time.time() - t_train

    loss_tok, n_eval = heldout_loss(model, held_ids, args.ctx, args.eval_chunks)
    evaluated_frac = n_eval / max(1, len(held_ids) - 1)
    bits_per_byte = loss_tok * n_eval / math.log(2) / (held_bytes * evaluated_frac)
    print(f"heldout loss/token {loss_tok:.4f} nats ({n_eval} tokens), ~{bits_per_byte:.3f} bits/byte", flush=True)

    hf_tok = wrap_tokenizer(tok, args.ctx)
    model.generation_config.bos_token_id = eot
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = eot
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    for f in out.iterdir():
        f.chmod(0o644)

    samples = greedy_samples(model, hf_tok, function_headers(held, args.samples), args.sample_tokens)
    report = {
        "command": "python tools/train_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "python": platform.python_version(), "torch": torch.__version__,
        "stdlib": str(args.stdlib or sysconfig.get_paths()["stdlib"]),
        "train_files": len(train), "heldout_files": [r for r, _ in held],
        "train_tokens": len(train_ids), "train_bytes": train_bytes,
        "heldout_tokens": len(held_ids), "heldout_bytes": held_bytes,
        "params": n_params, "steps": step, "epochs_started": epoch + 1, "tokens_seen": tokens_seen,
        "train_seconds": round(train_secs, 1), "total_seconds": round(time.time() - t_start, 1),
        "threads": args.threads, "final_train_loss_ema": ema,
        "heldout_loss_per_token": loss_tok, "heldout_tokens_evaluated": n_eval,
        "heldout_bits_per_byte": bits_per_byte, "samples": samples,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# Training report\n", f"- heldout loss/token: {loss_tok:.4f} nats; ~{bits_per_byte:.3f} bits/byte",
          f"- params: {n_params}; steps: {step}; tokens seen: {tokens_seen}; train time: {train_secs:.0f}s\n"]
    for s in samples:
        md.append(f"## `{s['file']}`\n\n```python\n{s['prompt']}\u2038{s['completion']}\n```\n")
    (out / "training_report.md").write_text("\n".join(md))
    return report


if __name__ == "__main__":
    main()
