"""What a job's corpus costs a step, by its size: the fast path decodes the same records with corpora of each size,
filled with texts that never match (so every size runs the same steps and only the search differs), taking turns
record by record in one process; ms a step over that of no corpus.

python benchmarks/corpus_index.py --sizes 0,8192,65536,1048576 --out benchmarks/results_published/corpus_index
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import loading  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    loading.add_suite_arguments(p, "default")
    p.add_argument("--sizes", default="0,8192,65536,1048576", help="corpus sizes in tokens (0: none, the baseline)")
    p.add_argument("--config", default="1:2:0:1:10:10", help="W:N:G:LOOKUP:LEN:BUDGET (the CPU tuner's pick)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5, help="times each record is decoded by each size")
    p.add_argument("--eager", action="store_true", help="the eager step instead of the compiled one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="folder for results.json")
    return p.parse_args(argv)


def never_matching(size: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A saved corpus of `size` tokens: texts of 999 tokens from the vocabulary's last 2000 ids, which the suite's
    records do not use, so no lookup finds a match in it."""
    g = torch.Generator().manual_seed(seed)
    texts = [torch.cat([torch.tensor([-1]), torch.randint(max(vocab - 2000, 0), vocab, (999,), generator=g)])
             for _ in range(size // 1000 + 1)]
    return torch.cat(texts)[-size:]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, suite, prompts = loading.load_suite(args)
    vocab = model.config.vocab_size
    shape = dict(zip(("window", "ngram", "guess", "lookup", "lookup_len", "budget"), map(int, args.config.split(":"))))
    sizes = [int(s) for s in args.sizes.split(",")]
    decoders = {}
    for size in sizes:
        decoder = FastDecoder(model, LookaheadConfig(**shape, memory="job", memory_tokens=size), compile=not args.eager)
        if size:
            decoder.remember_corpus(never_matching(size, vocab))
        decoder._remember_text = lambda *_: None  # the corpus stays as filled: every size runs the same steps
        decoder.generate(prompts[0].ids, 8)  # compile and warm up
        decoders[size] = decoder
    seconds, steps, outputs = {s: 0.0 for s in sizes}, {s: 0 for s in sizes}, {s: [] for s in sizes}
    for _ in range(args.repeat):
        for prompt in prompts:
            for size, decoder in decoders.items():
                result = decoder.generate(prompt.ids, args.max_new_tokens)
                seconds[size] += result.wall_time_s
                steps[size] += result.steps
                outputs[size].append(result.token_ids)
    base = seconds[sizes[0]] / steps[sizes[0]]
    rows = [dict(corpus_tokens=s, steps=steps[s], ms_per_step=round(1e3 * seconds[s] / steps[s], 4),
                 vs_first=round(seconds[s] / steps[s] / base, 3), same_tokens=outputs[s] == outputs[sizes[0]],
                 same_steps=steps[s] == steps[sizes[0]]) for s in sizes]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        environment = dict(torch=torch.__version__, threads=args.threads, command=" ".join(sys.argv),
                           date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (out / "results.json").write_text(json.dumps(dict(environment=environment, settings=dict(vars(args),
                                                                                                 suite=suite),
                                                          rows=rows), indent=1))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
