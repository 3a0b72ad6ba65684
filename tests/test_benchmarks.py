"""Smoke tests of the benchmark harness: it runs end to end on a tiny config and writes the files it promises."""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import loading, report  # noqa: E402

TINY = "random-llama:hidden=32,layers=1,heads=4,vocab=97"


@pytest.mark.slow
def test_sweep_runs_end_to_end_on_a_tiny_random_llama(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--model", TINY, "--prompts",
           str(REPO / "benchmarks" / "prompts" / "chat.jsonl"), "--limit", "2", "--configs", "4:3:4,2:2:2",
           "--nproc", "1,2", "--kv-sync", "recompute,gather", "--prompt-lookup", "3", "--max-new-tokens", "12",
           "--repeats", "1", "--warmup", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| configuration |" in done.stdout

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(report.COLUMNS)
    # greedy, prompt lookup, 2 configs on one process, 2 configs x 2 KV strategies on 2 ranks
    assert [r["method"] for r in rows] == ["hf_greedy", "hf_prompt_lookup"] + ["lookahead"] * 6
    assert all(r["matched_greedy"] == "True" for r in rows)
    team = [r for r in rows if r["ranks"] == "2"]
    assert {r["kv_sync"] for r in team} == {"recompute", "gather"}
    assert all(len(r["fed_per_step_by_rank"].split("/")) == 2 for r in team)
    assert all(float(r["tokens_per_step"]) >= 1 for r in rows)

    data = json.loads((out / "results.json").read_text())
    for key in ("torch", "transformers", "cpu", "torch_threads_per_process", "date_utc", "command", "gpu"):
        assert key in data["environment"]
    assert len(data["rows"]) == len(rows) and data["settings"]["prompt_count"] == 2
    for name in ("speedup_vs_ranks.png", "tokens_per_step.png", "step_latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed "
                    "(pip install 'lp[deepspeed]')")
@pytest.mark.slow
def test_sweep_adds_tensor_parallel_rows(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--model", TINY, "--limit", "1", "--configs",
           "4:3:4", "--nproc", "2", "--tp", "1,2", "--kv-sync", "gather", "--prompt-lookup", "0",
           "--max-new-tokens", "8", "--repeats", "1", "--warmup", "0", "--no-plots", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TP=2 only gather" in done.stdout and "P=2 gather" in done.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["tp"] for r in rows if r["method"] == "lookahead") == [1, 2]
    assert all(r["matched_greedy"] for r in rows)


@pytest.mark.slow
def test_sweep_compile_adds_compiled_rows_that_equal_greedy(tmp_path):
    out = tmp_path / "sweep"
    # --warmup 0: the compiled methods must still compile in an untimed warm-up of their own
    cmd = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--model", TINY, "--limit", "1", "--configs",
           "2:3:2", "--prompt-lookup", "0", "--max-new-tokens", "8", "--repeats", "1", "--warmup", "0", "--compile",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HF greedy, static cache + compiled" in done.stdout
    # lookup and chain None: 2 each on the fast path; the budget None: G*(N-1) = 4 halved on a CPU
    assert "(2,3,2) lookup 2x10 chain 2 budget 2 plain steps compiled fast path" in done.stdout  # plain: a CPU

    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [r["method"] for r in rows] == ["hf_greedy", "lookahead", "hf_greedy_compiled", "lookahead_compiled"]
    compiled = {c["method"]: c for c in data["settings"]["compiled"]}
    assert compiled["hf_greedy_compiled"]["graphs_compiled"] >= 1  # transformers really compiled on the CPU
    fast = compiled["lookahead_compiled"]
    assert fast["graphs_compiled"] >= 1 and not fast["compile_error"] and fast["compile_s"] > 0
    assert data["settings"]["graphs_compiled_while_timing"] == 0 and data["settings"]["compile_s_while_timing"] == 0
    assert all(r["warmup_s"] > 0 for r in rows[2:])
    assert [(r["lookup"], r["chain"], r["budget"], r["plain"]) for r in rows] == [
        (None, None, None, None), (0, 0, 4, 0), (None, None, None, None), (2, 2, 2, 1)]
    assert rows[2]["speedup_vs_greedy_compiled"] == 1.0 and rows[2]["fed_per_step_max"] == 1

    # greedy by hand, independent of transformers' generate and of lp: a full forward per token, argmax of the last
    model, _ = loading.load_model(TINY)
    prompt = loading.load_prompts(loading.default_suite(TINY), None, model.config.vocab_size, 1)[0].ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    runs = json.loads((out / "runs.json").read_text())
    assert {r["method"] for r in runs} == {r["method"] for r in rows}
    fed = {n for r in runs if r["method"] == "lookahead_compiled" for n in r["fed"]}
    assert 7 in fed and fed <= {1, 7}  # the full step, 1 + 2*2 + 2, or a plain one-token step (no candidate)
    for run in runs:
        assert run["tokens"] == ids[len(prompt):], run["method"]
    for name in ("speedup_vs_ranks.png", "tokens_per_step.png", "step_latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_candidate_configs_run_on_the_fast_path_only(tmp_path):
    out = tmp_path / "sweep"
    sweep = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--model", TINY, "--limit", "2"]
    # a lookup or a budget is the fast path's alone: without --compile or --fast-eager it is a usage error
    done = subprocess.run(sweep + ["--configs", "2:3:2:1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--fast-eager" in done.stderr and not (tmp_path / "sweep").exists()

    cmd = sweep + ["--configs", "2:3:2,2:3:2:0,3:3:2:1:4:6,2:3:2:::4:0", "--fast-eager", "--nproc", "1,2", "--kv-sync",
                   "recompute", "--prompt-lookup", "3", "--max-new-tokens", "10", "--repeats", "1", "--warmup", "0",
                   "--no-plots", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lookahead (3,3,2) lookup 1x4 chain 2 budget 6 plain steps fast path, not compiled" in done.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = [(r["method"], r["window"], r["lookup"], r["lookup_len"], r["chain"], r["budget"], r["ranks"]) for r in rows]
    hf = (None,) * 5
    assert got == [("hf_greedy", *hf, 1), ("hf_prompt_lookup", *hf, 1),
                   ("lookahead", 2, 0, 0, 0, 4, 1),  # 2:3:2 and 2:3:2:0 are one eager row; the others have none
                   # the fast path's default budget on a CPU: half of G*(N-1)
                   ("lookahead_fast_eager", 2, 2, 10, 2, 2, 1), ("lookahead_fast_eager", 2, 0, 0, 0, 2, 1),
                   ("lookahead_fast_eager", 3, 1, 4, 2, 6, 1),
                   ("lookahead_fast_eager", 2, 2, 10, 0, 4, 1),  # 2:3:2:::4:0, the same tree unchained
                   ("lookahead", 2, 0, 0, 0, 4, 2)]
    assert all(r["matched_greedy"] for r in rows)
    runs = json.loads((out / "runs.json").read_text())
    fast = {}
    for run in runs:
        if run["method"] == "lookahead_fast_eager":
            fast.setdefault((run["window"], run["lookup"], run["chain"]), set()).update(run["fed"])
    # the full step feeds 1 pending + W x (N-1) + the budget; a plain step (no candidate, on by default on a CPU) 1
    assert {k: max(v) for k, v in fast.items()} == {(2, 2, 2): 7, (2, 0, 0): 7, (3, 1, 2): 13, (2, 2, 0): 9}
    assert all(v <= {1, max(v)} for v in fast.values())
    for row in rows:
        mine = [r for r in runs if r["method"] == row["method"] and r["window"] == row["window"]
                and r["lookup"] == row["lookup"] and r["chain"] == row["chain"] and r["ranks"] == row["ranks"]]
        new, fed = sum(len(r["tokens"]) for r in mine if r["rank"] == 0), sum(sum(r["fed"]) for r in mine)
        assert row["accepted_per_100_fed"] == pytest.approx(100 * new / fed, rel=0.01), row["method"]
        assert row["ms_per_token"] == pytest.approx(1e3 * row["wall_s"] / new, rel=0.01)
    lookup = [f for r in runs if r["method"] == "hf_prompt_lookup" for f in r["fed"]]
    assert all(1 <= f <= 4 for f in lookup)  # the next token and at most K = 3 candidates


@pytest.mark.slow
def test_fast_path_report_runs_end_to_end_on_a_tiny_random_llama(tmp_path):
    out = tmp_path / "fast_path_cpu"
    cmd = [sys.executable, str(REPO / "benchmarks" / "fast_path.py"), "--models", TINY, str(tmp_path / "absent"),
           "--configs", "2:3:2", "--limit", "1", "--max-new-tokens", "6", "--repeats", "1", "--warmup", "0",
           "--forward-tokens", "1,4", "--forward-iters", "2", "--forward-capacity", "64", "--forward-prefix", "16",
           "--warm-compile-cache", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["all_equal_greedy"] and "git_dirty" in result["environment"]
    tiny, absent = result["models"]
    assert "skipped" in absent and "skipped:" in (out.with_suffix(".md")).read_text()
    assert [r["method"] for r in tiny["rows"]] == ["hf_greedy", "hf_greedy_compiled", "hf_prompt_lookup", "lookahead",
                                                   "lookahead_compiled"]
    assert all(r["matched_greedy"] for r in tiny["rows"]) and tiny["timing"]["graphs_compiled_while_timing"] == 0
    assert [f["tokens"] for f in tiny["forward"]] == [1, 4] and all(f["compiled_ms"] > 0 for f in tiny["forward"])


def test_a_missing_model_is_skipped_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "STORIES", tmp_path / "absent")
    with pytest.raises(loading.ModelUnavailable):
        loading.load_model("stories260k")


def test_random_llama_spec_and_byte_prompts():
    config, seed = loading.random_llama_config("random-llama:hidden=64,layers=2,heads=4,vocab=300,seed=7")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size, seed) == (
        64, 2, 4, 300, 7)
    prompts = loading.load_prompts(REPO / "benchmarks" / "prompts" / "chat.jsonl", None, 300, limit=3)
    assert len(prompts) == 3 and all(3 <= t < 300 for p in prompts for t in p.ids)
    assert prompts[0].text.endswith("Assistant:")


def test_every_prompt_suite_parses():
    for suite in (REPO / "benchmarks" / "prompts").glob("*.jsonl"):
        assert loading.load_prompts(suite, None, 1000), suite


def test_sweep_configs_spell_plain_steps_as_0_or_1():
    from benchmarks.sweep import config_list

    on, off, default = config_list("1:2:0:1:4:4::1,1:2:0:1:4:4::0,1:2:0")
    assert (on.plain_steps, off.plain_steps, default.plain_steps) == (True, False, None)
    assert (on.lookup, on.lookup_len, on.budget, on.chain) == (1, 4, 4, None)
    with pytest.raises(Exception, match="plain_steps must be true or false, got 2"):
        config_list("1:2:0::::0:2")


def test_percentile():
    assert report.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert report.percentile([1.0, 2.0], 90) == pytest.approx(1.9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_gpu_script_refuses_cleanly_without_cuda():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_forward_scaling.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("skipped:") and len(done.stdout.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_gpu_fast_path_refuses_cleanly_without_cuda():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_fast_path.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("skipped:") and len(done.stdout.splitlines()) == 1


@pytest.mark.slow
def test_gpu_fast_path_smoke_runs_the_same_code_on_a_tiny_cpu_model(tmp_path):
    out = tmp_path / "gpu_fast_path.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_fast_path.py"), "--smoke", "--configs", "2:3:2",
           "--tokens-per-step", "2:3:2=2.5", "--bandwidth-gbs", "100", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| compiled greedy step |" in done.stdout and "| lp FastDecoder step | 2:3:2 | 7 |" in done.stdout
    result = json.loads(out.read_text())
    greedy, fast = result["rows"]
    assert greedy["tokens_fed"] == 1 and fast["tokens_fed"] == 1 + 2 * 2 + 2 and not fast["compile_error"]
    assert fast["ms_per_token"] == pytest.approx(fast["ms_median"] / 2.5, rel=1e-3)
    assert result["floor"]["ms"] == pytest.approx(result["parameter_bytes"] / 100e9 * 1e3, rel=1e-3)
    assert [g["goal"] for g in result["goals"]] == [1.3, 1.3]
    # both steps give greedy's tokens: a full forward per token, argmax of the last row, on the same random model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        vocab_size=97, max_position_embeddings=4096, tie_word_embeddings=False), dtype=torch.float32,
        attn_implementation="sdpa").eval()
    ids = list(result["prompt"])
    with torch.no_grad():
        for _ in range(max(len(greedy["tokens"]), len(fast["tokens"]))):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[len(result["prompt"]):]
    assert greedy["tokens"] == new[: len(greedy["tokens"])] and fast["tokens"] == new[: len(fast["tokens"])]


@pytest.mark.slow
def test_gpu_script_logic_on_a_tiny_cpu_model(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_forward_scaling.py"), "--device", "cpu", "--hidden", "32",
           "--layers", "1", "--heads", "4", "--kv-heads", "4", "--ffn", "64", "--vocab", "97", "--prefix", "16",
           "--max-tokens", "8", "--iters", "1", "--warmup", "0", "--configs", "2:3:2", "--nproc", "2",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_forward_scaling.json").read_text())
    assert sorted(map(int, result["forward_ms"])) == [1, 2, 4, 8]
    assert {(r["gpus"], r["kv_sync"]) for r in result["projected"]} == {(1, "none"), (2, "recompute"), (2, "gather")}
    # one rank feeds the whole (2,3,2) step: 1 pending + 2 columns x 2 levels + 2 candidates x 2 = 9 tokens;
    # the best split of 2 ranks: both columns to one (1 + 4 = 5), both candidates to the other (1 + 4 = 5)
    fed = {(r["gpus"], r["kv_sync"]): r["tokens_fed_per_rank"] for r in result["projected"]}
    assert fed[(1, "none")] == 9
    assert fed[(2, "gather")] == 5


@pytest.mark.slow
def test_sampling_benchmark_reports_each_decoding_against_transformers_own(tmp_path):
    from benchmarks import sampling
    out = tmp_path / "sampling.json"
    assert sampling.main(["--model", TINY, "--limit", "1", "--max-new-tokens", "6", "--temperatures", "0.8",
                          "--configs", "2:3:2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["method"]) for r in rows] == [("greedy", "hf generate"), ("greedy", "lp (2, 3, 2)"),
                                                       ("T=0.8", "hf generate"), ("T=0.8", "lp (2, 3, 2)")]
    assert all(r["ms_per_token"] > 0 and r["tokens_per_step"] >= 1 for r in rows)


@pytest.mark.slow
def test_throughput_benchmark_compares_teams_replicas_and_batches_with_hf(tmp_path):
    out = tmp_path / "throughput"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", "default", "--prompts", "5",
           "--max-new-tokens", "6", "--batch-sizes", "2", "--window", "2", "--ngram", "3", "--guess", "2",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == [
        "HF generate, one at a time", "HF generate, batched B=2, left padding", "lp, one process",
        "lp, one team of 2 ranks", "lp, 2 replicas of 1 rank", "lp, one process, batch B=2",
        "lp, 2 replicas of 1 rank, batch B=2"]
    lp_rows = rows[2:]
    assert all(r["same_tokens_as_lp_one_process"] and r["same_tokens_as_hf_one_at_a_time"] == 5 for r in lp_rows)
    assert all(r["new_tokens"] == rows[0]["new_tokens"] for r in lp_rows)  # the same work in every setting
    assert "| lp, 2 replicas of 1 rank, batch B=2 | 2 | 2 |" in (out / "results.md").read_text()


def test_throughput_compile_adds_compiled_one_process_jobs_after_the_eager_ones():
    from benchmarks.throughput import lp_settings
    eager = lp_settings([4], compile=False)
    assert [label for _, _, label, _ in eager] == [
        "lp, one process", "lp, one team of 2 ranks", "lp, 2 replicas of 1 rank", "lp, one process, batch B=4",
        "lp, 2 replicas of 1 rank, batch B=4"]
    both = lp_settings([4], compile=True)
    assert both[:5] == eager
    assert both[5:] == [(1, ["--compile"], "lp compiled, one process", 1),
                        (1, ["--compile", "--batch-size", "4"], "lp compiled, one process, batch B=4", 4)]


def test_throughput_ratios_compare_each_row_with_hf_at_its_batch_size_eager_and_compiled():
    from benchmarks.throughput import add_ratios
    rows = [dict(setting="HF generate, one at a time", compiled=False, batch=1, tokens_per_s=100.0),
            dict(setting="HF generate, batched B=4", compiled=False, batch=4, tokens_per_s=250.0),
            dict(setting="HF generate compiled (static cache), one at a time", compiled=True, batch=1, tokens_per_s=200.0),
            dict(setting="lp compiled, one process, batch B=4", compiled=True, batch=4, tokens_per_s=500.0),
            dict(setting="lp, one process", compiled=False, batch=1, tokens_per_s=300.0)]
    add_ratios(rows)
    lp_batch, lp_one = rows[3], rows[4]
    assert (lp_batch["vs_hf_same_batch"], lp_batch["vs_hf_one_at_a_time"]) == (2.0, 5.0)
    assert "vs_hf_compiled_same_batch" not in lp_batch  # no compiled HF row at B=4
    assert (lp_one["vs_hf_same_batch"], lp_one["vs_hf_compiled_same_batch"]) == (3.0, 1.5)


def test_throughput_warms_compiled_hf_up_on_the_longest_chunk_of_each_batch_size():
    from benchmarks.throughput import warmup_chunks

    def words(text):  # a stand-in tokenizer: one token a word
        return {"input_ids": text.split()}

    chunks = [["a b", "a b c d"], ["a", "a b c d e"], ["a b c"]]
    assert warmup_chunks(chunks, words) == [["a b c"], ["a", "a b c d e"]]


def test_gpu_auto_tune_smoke_predicts_and_measures_every_eager_setting(tmp_path):
    out = tmp_path / "gpu_auto_tune.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_auto_tune.py"), "--smoke", "--new-tokens", "12",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert sorted(int(t) for t in result["curve_ms"]) == [1, 4, 16, 32, 64, 128]
    assert [row["arm"] for row in result["arms"]] == ["reference 2,3,2", "reference 3,3,3", "reference 5,4,5",
                                                      "reference 7,5,7", "reference 15,5,15"]
    assert all(row["predicted_ms"] > 0 and row["measured_ms"] > 0 and row["steps"] > 0 for row in result["arms"])


@pytest.mark.slow
def test_job_memory_benchmark_takes_lookup_and_budget_in_its_settings_and_checks_every_output(tmp_path):
    """The setting the self-tuner picks on a CPU (1:2:0, one lookup of 10, a tree of 10) is one the memory is
    measured at (benchmarks/README.md (m)); G = 0 keeps no pool, so `pool` and `record` run the same steps."""
    out = tmp_path / "job_memory"
    cmd = [sys.executable, str(REPO / "benchmarks" / "job_memory.py"), "--model", TINY, "--prompts",
           str(REPO / "benchmarks" / "prompts" / "code.jsonl"), "--limit", "3", "--configs", "1:2:0:1:10:10,4:3:4",
           "--max-new-tokens", "16", "--check-greedy", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["1:2:0:1:10:10", "4:3:4"]
    assert all(r["same_tokens"] and r["greedy"] for r in rows)
    lookup = rows[0]
    assert lookup["pool"]["tokens_per_step"] == lookup["record"]["tokens_per_step"]
    assert [r["steps"] for r in lookup["pool"]["records"]] == [r["steps"] for r in lookup["record"]["records"]]


def test_corpus_index_benchmark_decodes_every_record_alike_at_every_corpus_size(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "corpus_index.py"), "--model", TINY, "--prompts",
           str(REPO / "benchmarks" / "prompts" / "code.jsonl"), "--limit", "2", "--sizes", "0,64,4096",
           "--max-new-tokens", "12", "--repeat", "1", "--eager", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["corpus_tokens"] for r in rows] == [0, 64, 4096]
    assert all(r["same_tokens"] and r["ms_per_step"] > 0 and r["steps"] > 0 for r in rows)  # a corpus changes no token
