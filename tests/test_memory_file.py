"""A job's memory on disk (--memory-file): a job starts from what an earlier job of its kind left, takes fewer steps
for it and gives the same tokens; a file from another tokenizer, a damaged one or one of shorter n-grams is refused
in one line; either engine reads what either wrote."""
import json
import random
import sys

import pytest
import torch

import lp
from lp import memory_file
from lp.cli import main
from lp.fast_decoding import FastDecoder
from lp.greedy_rules import hf_greedy
from models import VOCAB, tiny_model
from test_cli import base_args, tiny_dir  # noqa: F401 (fixture)
from test_exactness import repetitive_prompt

STAMP = memory_file.tokenizer_fingerprint(None, VOCAB)


def decoder_of(engine: str, model, ngram: int = 4):
    config = lp.LookaheadConfig(7, ngram, 7)
    return FastDecoder(model, config, compile=False) if engine == "fast" else lp.Decoder(model, config)


def cli(tiny_dir: str, *extra) -> list[str]:
    return [str(a) for a in base_args(tiny_dir, *extra)]


def by_key(grams: torch.Tensor) -> dict:
    """Each key's continuations, oldest first: what a pool holds, whatever order its keys come in."""
    held = {}
    for key, *rest in grams.tolist():
        held.setdefault(key, []).append(tuple(rest))
    return held


@pytest.mark.parametrize("saver,loader", [("fast", "fast"), ("reference", "reference"), ("reference", "fast"),
                                          ("fast", "reference")])
def test_a_job_started_from_a_saved_memory_takes_fewer_steps_and_the_same_tokens(saver, loader, tmp_path):
    model = tiny_model("llama", seed=3)
    prompt = repetitive_prompt(4, 24)
    want = hf_greedy(model, prompt, 80)
    first = decoder_of(saver, model)
    cold = first.generate(prompt, 80)
    path = tmp_path / "memory.safetensors"
    memory_file.save(path, first.memory_grams(), STAMP, VOCAB, first.memory_corpus())

    warm = decoder_of(loader, model)
    grams, corpus = memory_file.load(path, STAMP, VOCAB, 4)
    warm.remember_grams(grams)
    warm.remember_corpus(corpus)
    if saver == loader:  # the pool comes back as it was saved, each key's entries in their order
        assert by_key(warm.memory_grams()) == by_key(first.memory_grams())
    if saver == loader == "fast":  # and the fast path's corpus of earlier texts, the record's text in it
        assert torch.equal(warm.memory_corpus(), first.memory_corpus())
        assert first.memory_corpus()[-len(prompt) - 80:].tolist() == prompt + want
    again = warm.generate(prompt, 80)
    assert cold.token_ids == again.token_ids == want
    assert again.steps < cold.steps


def test_a_fast_paths_memory_lists_each_keys_entries_oldest_first_after_its_ring_wrapped():
    model = tiny_model("qwen2", seed=1)
    decoder = decoder_of("fast", model, ngram=3)
    rng = random.Random(0)
    grams = [[5, rng.randrange(VOCAB), rng.randrange(VOCAB)] for _ in range(3 * decoder.config.guess)]
    decoder.remember_grams(torch.tensor(grams))  # 21 distinct entries under key 5: the ring of 7 wraps 3 times
    assert by_key(decoder.memory_grams()) == {5: [tuple(g[1:]) for g in grams[-decoder.config.guess:]]}


def test_longer_ngrams_are_cut_to_the_jobs_and_shorter_ones_refused(tmp_path):
    path = tmp_path / "memory.safetensors"
    memory_file.save(path, torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), STAMP, VOCAB)
    assert memory_file.load(path, STAMP, VOCAB, 3)[0].tolist() == [[1, 2, 3], [6, 7, 8]]
    with pytest.raises(memory_file.MemoryFileError, match="holds 5-grams, shorter than this job's ngram 6; give "
                                                          "--ngram 5 or another path"):
        memory_file.load(path, STAMP, VOCAB, 6)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_decoder_keeps_longer_remembered_ngrams_cut_to_its_own_and_leaves_shorter_ones_out(engine):
    decoder = decoder_of(engine, tiny_model("llama", seed=1), ngram=3)  # what a self-tuned job's file meets
    decoder.remember_grams(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    decoder.remember_grams(torch.tensor([[11, 12]]))
    assert by_key(decoder.memory_grams()) == {1: [(2, 3)], 6: [(7, 8)]}


def test_a_memory_from_another_tokenizer_or_damaged_is_refused_in_one_line(tmp_path):
    path = tmp_path / "memory.safetensors"
    memory_file.save(path, torch.tensor([[1, 2, 3]]), memory_file.tokenizer_fingerprint(None, VOCAB + 1), VOCAB + 1)
    with pytest.raises(memory_file.MemoryFileError, match="saved by a job with another tokenizer"):
        memory_file.load(path, STAMP, VOCAB, 3)
    memory_file.save(path, torch.tensor([[1, 2, VOCAB]]), STAMP, VOCAB)
    with pytest.raises(memory_file.MemoryFileError, match="token ids outside this model's vocabulary"):
        memory_file.load(path, STAMP, VOCAB, 3)
    memory_file.save(path, torch.tensor([[1, 2, 3]]), STAMP, VOCAB, torch.tensor([-1, 4, -2]))
    with pytest.raises(memory_file.MemoryFileError, match="token ids outside this model's vocabulary"):
        memory_file.load(path, STAMP, VOCAB, 3)
    for junk in (b"", b"not a safetensors file at all", json.dumps({"grams": [1, 2]}).encode(), bytes(range(256))):
        path.write_bytes(junk)
        with pytest.raises(memory_file.MemoryFileError, match="is not a memory file lp wrote") as caught:
            memory_file.load(path, STAMP, VOCAB, 3)
        assert "\n" not in str(caught.value)


def test_saving_replaces_the_file_whole(tmp_path):
    path = tmp_path / "memory.safetensors"
    memory_file.save(path, torch.tensor([[1, 2, 3]]), STAMP, VOCAB)
    memory_file.save(path, torch.tensor([[4, 5, 6], [7, 8, 9]]), STAMP, VOCAB)
    assert memory_file.load(path, STAMP, VOCAB, 3)[0].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]  # no temporary left behind


def test_the_command_line_saves_the_memory_at_the_end_and_starts_the_next_job_from_it(tiny_dir, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "memory.safetensors"
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": "ab ab ab ab cd cd cd"}) + "\n" for i in range(2)))
    steps = []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        assert main(cli(tiny_dir, "--input", source, "--output", out, "--memory-file", path)) == 0
        steps.append([json.loads(line)["steps"] for line in out.read_text().splitlines()])
        assert path.exists()
    assert steps[1][0] < steps[0][0]  # the second job's first record already had the first job's memory
    texts = [[json.loads(line)["text"] for line in (tmp_path / f"out{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert texts[0] == texts[1]


def test_a_job_whose_settings_keep_no_pool_leaves_the_files_n_grams_as_they_were(tiny_dir, tmp_path):  # noqa: F811
    path = tmp_path / "memory.safetensors"
    assert main(cli(tiny_dir, "--prompt", "ab ab ab ab cd cd cd", "--memory-file", path)) == 0
    saved = memory_file.load(path, memory_file.tokenizer_fingerprint(_tiny_tokenizer(tiny_dir), 259), 259, 3)[0]
    assert len(saved)
    assert main(cli(tiny_dir, "--prompt", "xy xy", "--guess", "0", "--memory-file", path)) == 0  # G = 0: no pool
    again = memory_file.load(path, memory_file.tokenizer_fingerprint(_tiny_tokenizer(tiny_dir), 259), 259, 3)[0]
    assert torch.equal(again, saved)


def test_the_command_line_refuses_a_damaged_memory_file_and_a_memory_file_without_job_memory(tiny_dir, tmp_path,  # noqa: F811
                                                                                               capsys):
    path = tmp_path / "memory.safetensors"
    path.write_bytes(b"garbage")
    assert main(cli(tiny_dir, "--prompt", "ab ab", "--memory-file", path)) == 2
    err = capsys.readouterr().err
    assert "is not a memory file lp wrote" in err and "Traceback" not in err
    assert path.read_bytes() == b"garbage"  # refused, not overwritten
    assert main(cli(tiny_dir, "--prompt", "ab ab", "--memory", "record", "--memory-file", path)) == 2
    assert "--memory-file keeps a job's memory: it needs --memory job" in capsys.readouterr().err


def test_a_memory_travels_as_json_and_only_unknown_texts_join_a_corpus():
    grams = torch.tensor([[5, 6, 7], [258, 0, 1]])
    assert torch.equal(memory_file.unpack(json.loads(json.dumps(memory_file.pack(grams)))), grams)
    assert memory_file.unpack(memory_file.pack(torch.zeros(0, 3, dtype=torch.long))).shape == (0, 3)
    known = torch.tensor([-1, 1, 2, -1, 3, 4, 5])
    other = torch.tensor([-1, 3, 4, 5, -1, 6, 6, -1, 1, 2, -1, 6, 6, -1, 7])
    assert memory_file.new_texts(other, known).tolist() == [6, 6, -1, 7]  # each new text once, in its order
    assert memory_file.new_texts(known, known).tolist() == []


@pytest.mark.slow
def test_replicas_save_what_every_replica_learnt_in_one_memory_file(tiny_dir, tmp_path):  # noqa: F811
    from test_cli import RUN, run
    path = tmp_path / "memory.safetensors"
    prompts = ["ABCDABCDABCD", "wxyzwxyzwxyz", "PQRSPQRSPQRS", "jklmjklmjklm"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": 48}) + "\n"
                              for i, p in enumerate(prompts)))
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               *cli(tiny_dir, "--input", source, "--lp", "1", "--memory-file", path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ", replica 1 ---" in out.stdout  # replica 1 decoded some of the records
    grams = {tuple(g) for g in memory_file.load(path, memory_file.tokenizer_fingerprint(
        _tiny_tokenizer(tiny_dir), 259), 259, 3)[0].tolist()}
    for prompt in prompts:  # every record's prompt seeded its replica's pool: all of them reach the file
        assert tuple(ord(c) for c in prompt[:3]) in grams, prompt


def _tiny_tokenizer(tiny_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)
