"""A job's memory on disk (`--memory-file`): the n-grams of a decoder's pool, each key's oldest first, and the fast
path's corpus of earlier texts, in a safetensors file (no pickle) stamped with the tokenizer whose ids they are, so a
job can start where an earlier job of its kind ended. Either engine reads what either wrote (the reference engine
keeps no corpus); memory changes steps, never tokens."""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
from pathlib import Path

import torch

FORMAT = "lp-memory/1"


class MemoryFileError(ValueError):
    """A memory file that cannot be used here; the message says why and what to do, in one line."""


def tokenizer_fingerprint(tokenizer, vocab: int) -> str:
    """What the n-grams' ids mean: a hash of the tokenizer's vocabulary (token -> id) and the model's vocab size."""
    items = sorted(tokenizer.get_vocab().items()) if tokenizer is not None else []
    digest = hashlib.sha256(json.dumps([vocab, items], ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def save(path: str | Path, grams: torch.Tensor, fingerprint: str, vocab: int, corpus: torch.Tensor | None = None
         ) -> None:
    """Write n-grams [M, N] and a corpus (texts, each after a -1) to `path` atomically (a temporary file renamed
    over it: a crash leaves the old one)."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    grams = grams.detach().to("cpu", torch.int64).contiguous()
    tensors = {"grams": grams}
    if corpus is not None:
        tensors["corpus"] = corpus.detach().to("cpu", torch.int64).contiguous()
    try:
        save_file(tensors, str(temporary), metadata={"format": FORMAT, "tokenizer": fingerprint,
                                                               "vocab": str(vocab), "ngram": str(grams.shape[1])})
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise MemoryFileError(f"cannot save --memory-file {str(path)!r}: {exc.strerror or exc}") from None


def load(path: str | Path, fingerprint: str, vocab: int, ngram: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-grams [M, ngram] saved in `path` (longer ones cut to `ngram` tokens; None: as saved, for a self-tuning
    job whose settings cut them each to its own) and its corpus (empty if none), or MemoryFileError."""
    from safetensors import safe_open

    where = f"--memory-file {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            grams = f.get_tensor("grams") if "grams" in f.keys() else None
            corpus = f.get_tensor("corpus") if "corpus" in f.keys() else torch.zeros(0, dtype=torch.int64)
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the answer is one line
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise MemoryFileError(f"{where} is not a memory file lp wrote ({reason}); delete it or give another path") \
            from None
    if meta.get("format") != FORMAT or grams is None or grams.dim() != 2 or grams.dtype != torch.int64 or \
            corpus.dim() != 1 or corpus.dtype != torch.int64:
        raise MemoryFileError(f"{where} is not a memory file lp wrote (format {meta.get('format')!r}); delete it or "
                              "give another path")
    if meta.get("tokenizer") != fingerprint:
        raise MemoryFileError(f"{where} was saved by a job with another tokenizer (vocab {meta.get('vocab')}; this "
                              f"model's is {vocab}): its token ids mean other words; give another path")
    if any(t.numel() and (int(t.min()) < lowest or int(t.max()) >= vocab) for t, lowest in ((grams, 0), (corpus, -1))):
        raise MemoryFileError(f"{where} holds token ids outside this model's vocabulary of {vocab}; it is damaged: "
                              "delete it or give another path")
    if ngram is None:
        return grams, corpus
    if grams.shape[1] < ngram:
        raise MemoryFileError(f"{where} holds {grams.shape[1]}-grams, shorter than this job's ngram {ngram}; give "
                              f"--ngram {grams.shape[1]} or another path")
    return grams[:, :ngram], corpus


def pack(tensor: torch.Tensor) -> dict:
    """A token tensor as a JSON-able dict (its shape and its int32 bytes in base64): how a replica sends its memory
    to rank 0 with its results at the end of a job, with no pickle."""
    data = tensor.detach().to("cpu", torch.int32).contiguous()
    return {"shape": list(data.shape), "int32": base64.b64encode(data.numpy().tobytes()).decode("ascii")}


def unpack(packed: dict) -> torch.Tensor:
    """The int64 tensor that `pack` sent."""
    raw = bytearray(base64.b64decode(packed["int32"]))
    flat = torch.frombuffer(raw, dtype=torch.int32) if raw else torch.zeros(0, dtype=torch.int32)
    return flat.to(torch.int64).reshape(packed["shape"])


def new_texts(corpus: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The texts of `corpus` (each after a -1) that `known` does not hold, joined by -1 as a corpus is added: what
    another replica's corpus brings (every replica started from the same file, so their first texts agree)."""
    have = set(_texts(known))
    fresh = [t for t in dict.fromkeys(_texts(corpus)) if t not in have]
    joined = [token for text in fresh for token in (-1, *text)][1:]
    return torch.tensor(joined, dtype=torch.long)


def _texts(corpus: torch.Tensor) -> list[tuple[int, ...]]:
    """A corpus's texts: its runs of tokens between -1s."""
    runs = itertools.groupby(torch.as_tensor(corpus).tolist(), key=lambda token: token < 0)
    return [tuple(run) for separator, run in runs if not separator]


def fit(grams, ngram: int) -> torch.Tensor:
    """Saved n-grams [M, N'] as a pool of `ngram`-grams keeps them: cut when longer (a self-tuned job saves its
    longest), none when shorter."""
    grams = torch.as_tensor(grams, dtype=torch.long)
    return grams[:, :ngram] if grams.shape[-1] >= ngram else grams.new_zeros(0, ngram)
