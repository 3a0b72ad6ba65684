"""launch/run.py end to end: one process, torchrun, mpirun; --json purity; --compare-greedy; user mistakes."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lp.cli import main
from models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "launch" / "run.py"
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
RESULT_FIELDS = {"id", "text", "token_ids", "new_tokens", "steps", "tokens_per_step", "latency_s"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _bytes_to_unicode() -> dict:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def save_tiny_model(path: Path, **overrides) -> Path:
    """A random float64 LLaMA plus a byte-level tokenizer with a chat template, as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model("llama", vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_model")))


def base_args(tiny_dir: str, *extra: str) -> list[str]:
    return ["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "12", "--window", "4", "--ngram", "3",
            "--guess", "4", *extra]


def clean_env(**extra) -> dict:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars and not k.startswith("SLURM_")}
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def run(cmd: list, timeout: float = 180, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def one_error_line(stderr: str, launcher_traceback: bool = False) -> str:
    """The single `lp: error:` line; no traceback (torchrun may add its own report, never one from lp's code)."""
    errors = [line for line in stderr.splitlines() if line.startswith("lp: error:")]
    assert len(errors) == 1, stderr
    ours = [f'File "{ROOT / part}' for part in ("lp", "launch", "tools")]  # not a venv inside the checkout
    assert not any(frame in stderr for frame in ours) and ("Traceback" not in stderr or launcher_traceback), stderr
    return errors[0]


# -- one process, in this process -------------------------------------------------------------------------------

def test_a_prompt_streams_and_ends_with_a_summary_line(tiny_dir, capsys):
    assert main(base_args(tiny_dir, "--prompt", "def f(x):")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--- prompt 1 of 1 (id 0) ---"
    assert out[1].startswith("def f(x):")  # the prompt, then the completion streamed after it
    assert out[-1].startswith("lp: 1 of 1 prompts, 12 new tokens, ")
    assert "tokens/step" in out[-1] and "tokens/s" in out[-1] and "1 rank" in out[-1]


def test_json_gives_one_record_per_prompt_and_compare_greedy_matches(tiny_dir, capsys):
    assert main(base_args(tiny_dir, "--prompt", "abcabc", "--prompt", "xyz", "--json", "--compare-greedy")) == 0
    captured = capsys.readouterr()
    records = json_lines(captured.out)
    assert [r["id"] for r in records] == [0, 1]
    for r in records:
        assert RESULT_FIELDS <= set(r) and r["new_tokens"] == len(r["token_ids"]) == 12
        assert r["greedy_match"] is True and r["speedup"] > 0
    summary = json.loads(captured.err.strip().splitlines()[-1])["summary"]
    assert summary["records"] == 2 and summary["new_tokens"] == 24 and summary["greedy_match"] is True


@pytest.mark.parametrize("flags,ran", [
    ((), {"engine": "reference", "window": 4, "ngram": 3, "guess": 4, "compiled": False, "memory": "job",
      "chosen_by": "user"}),
    pytest.param(("--compile", "--lookup", "1", "--budget", "5", "--memory-tokens", "64", "--no-plain-steps"),
                 {"engine": "fast", "window": 4, "ngram": 3, "guess": 4, "compiled": True, "memory": "job",
                  "lookup": 1, "lookup_len": 10, "chain": 2, "budget": 5, "plain_steps": False, "memory_tokens": 64,
                  "chosen_by": "user"},
                 marks=pytest.mark.slow),
])
def test_every_record_and_the_summary_say_what_ran(tiny_dir, capsys, flags, ran):
    assert main(base_args(tiny_dir, "--prompt", "abcabc", "--json", *flags)) == 0
    captured = capsys.readouterr()
    [record] = json_lines(captured.out)
    assert record["lookahead"] == ran
    assert json.loads(captured.err.strip().splitlines()[-1])["summary"]["lookahead"] == ran


def test_compare_greedy_is_reported_in_the_summary_line(tiny_dir, capsys):
    assert main(base_args(tiny_dir, "--prompt", "hello", "--compare-greedy")) == 0
    assert "greedy match: yes, speedup " in capsys.readouterr().out.splitlines()[-1]


def test_deepspeeds_local_rank_argument_is_accepted(tiny_dir, capsys):
    assert main(base_args(tiny_dir, "--local_rank=0", "--prompt", "a", "--json")) == 0
    assert json_lines(capsys.readouterr().out)[0]["ranks"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/model"], "model path '/no/such/model' does not exist; pass --model"),
    (["--set", "lookahead.windw=3"], "unknown config key 'lookahead.windw' in --set; known lookahead keys: window"),
    (["--tp", "2"], "world size 1 is not divisible by tp=2: launch a multiple of 2 ranks"),
    (["--tp", "1", "--lp", "2"], "lp=2 x tp=1 = 2 ranks, but the world has 1"),
    (["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    (["--input", "/no/such.jsonl"], "input file '/no/such.jsonl' does not exist"),
    (["--no-compile", "--lookup", "2"], "turn compile on (--compile) or drop them"),
    (["--budget", "-1"], "budget must be an integer in [0, 4096], got -1"),
])
def test_user_mistakes_get_one_line_and_exit_2(tiny_dir, capsys, argv, message):
    args = base_args(tiny_dir, *argv) if "--model" not in argv else argv
    assert main(args) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err)
    assert captured.out == ""


def test_bad_option_values_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--kv-sync", "broadcast"])
    assert info.value.code == 2
    assert "invalid choice: 'broadcast'" in one_error_line(capsys.readouterr().err)


def test_a_prompt_longer_than_the_context_says_how_long_it_may_be(tmp_path, capsys):
    short = save_tiny_model(tmp_path / "short", max_position_embeddings=32)
    assert main(base_args(str(short), "--prompt", "x" * 40)) == 1
    assert "shorten it to at most 31 tokens" in one_error_line(capsys.readouterr().err)


def test_more_ranks_than_window_columns_is_refused_before_any_rendezvous(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "5")
    assert main(base_args(tiny_dir, "--prompt", "a")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "5 ranks per lookahead team but the window has 4 columns" in line and "--replicas" in line


def test_generation_settings_greedy_cannot_reproduce_are_refused_with_the_fix(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "penalised")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(dict(config, repetition_penalty=1.3)))
    assert main(base_args(str(folder), "--prompt", "a")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "generation_config.repetition_penalty=1.3" in line and "--set generation.<setting>=<value>" in line
    assert main(base_args(str(folder), "--prompt", "a", "--set", "generation.repetition_penalty=1.0",
                          "--compare-greedy", "--json")) == 0
    assert json_lines(capsys.readouterr().out)[0]["greedy_match"] is True


def test_remote_code_is_not_run_unless_asked(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoConfig": "conf.MyConfig",
                                                          "AutoModelForCausalLM": "modeling.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(folder), "--prompt", "a"]) == 2
    assert "pass --trust-remote-code if you trust it" in one_error_line(capsys.readouterr().err)


# -- real launchers, in subprocesses ------------------------------------------------------------------------------

@pytest.mark.slow
def test_plain_python_json_stdout_is_only_json(tiny_dir):
    out = run([sys.executable, RUN, *base_args(tiny_dir, "--prompt", "def g():", "--prompt", "ab", "--json")])
    assert out.returncode == 0, out.stderr[-2000:]
    records = json_lines(out.stdout)  # every stdout line parses, and there is one per prompt
    assert [r["id"] for r in records] == [0, 1] and all(r["ranks"] == 1 for r in records)


def test_with_json_what_a_library_prints_while_loading_goes_to_stderr(tiny_dir, capsys, monkeypatch):
    cli = sys.modules["lp.cli.main"]  # the module (lp.cli.main the attribute is the function)
    real = cli.load_model

    def chatty(*args, **kwargs):
        print("[WARNING] Setting accelerator to CPU.")  # as DeepSpeed does when accelerate imports it
        return real(*args, **kwargs)
    monkeypatch.setattr(cli, "load_model", chatty)
    assert main(base_args(tiny_dir, "--prompt", "ab", "--json")) == 0
    captured = capsys.readouterr()
    assert [r["id"] for r in json_lines(captured.out)] == [0]
    assert "Setting accelerator to CPU" in captured.err


@pytest.mark.slow
def test_the_tree_flags_reach_the_fast_path_and_keep_greedy_tokens(tiny_dir, capsys):
    argv = base_args(tiny_dir, "--prompt", "abcabcabc", "--compile", "--lookup", "1", "--lookup-len", "6",
                     "--budget", "7", "--window", "2", "--ngram", "3", "--guess", "2", "--json", "--compare-greedy")
    assert main(argv) == 0
    record = json_lines(capsys.readouterr().out)[0]
    assert record["greedy_match"] is True and record["compiled"] is True


@pytest.mark.slow
def test_a_temperature_samples_and_compare_greedy_checks_against_the_plain_sampler(tiny_dir, tmp_path, capsys):
    records = tmp_path / "in.jsonl"
    records.write_text('{"id": "a", "prompt": "abcabc", "seed": 1}\n{"id": "b", "prompt": "abcabc", "seed": 2}\n'
                       '{"id": "c", "prompt": "abcabc"}\n')
    argv = base_args(tiny_dir, "--input", str(records), "--temperature", "1.5", "--top-k", "40", "--json",
                     "--compare-greedy", "--max-new-tokens", "24")
    assert main(argv) == 0
    out = {r["id"]: r for r in json_lines(capsys.readouterr().out)}
    assert all(r["greedy_match"] is True for r in out.values())  # each equals the one-token sampler, same seed
    assert out["a"]["token_ids"] != out["b"]["token_ids"]  # the record's seed keys its draws
    assert main(base_args(tiny_dir, "--prompt", "abcabc", "--temperature", "1.5", "--top-k", "40", "--json",
                          "--max-new-tokens", "24", "--seed", "1")) == 0
    assert json_lines(capsys.readouterr().out)[0]["token_ids"] == out["a"]["token_ids"]  # --seed 1 = seed 1
    assert main(base_args(tiny_dir, "--prompt", "abcabc", "--temperature", "1.5", "--greedy", "--json",
                          "--compare-greedy", "--max-new-tokens", "24")) == 0
    greedy = json_lines(capsys.readouterr().out)[0]
    assert greedy["greedy_match"] is True and greedy["token_ids"] not in [r["token_ids"] for r in out.values()]


def test_the_tree_flags_set_the_lookahead_settings():
    from lp.cli.main import build_parser, resolve_config
    cfg = resolve_config(build_parser().parse_args(["--lookup", "1", "--lookup-len", "6", "--budget", "7",
                                                    "--chain", "3"]))
    assert (cfg.lookahead.lookup, cfg.lookahead.lookup_len, cfg.lookahead.budget, cfg.lookahead.chain) == (1, 6, 7, 3)
    cfg = resolve_config(build_parser().parse_args(["--set", "lookahead.budget=9"]))
    assert cfg.lookahead.budget == 9 and cfg.lookahead.lookup is None and cfg.lookahead.plain_steps is None


def test_plain_steps_flags_set_the_lookahead_setting_both_ways():
    from lp.cli.main import build_parser, resolve_config
    for flag, value in (("--plain-steps", True), ("--no-plain-steps", False)):
        assert resolve_config(build_parser().parse_args([flag])).lookahead.plain_steps is value
    cfg = resolve_config(build_parser().parse_args(["--set", "lookahead.plain_steps=false"]))
    assert cfg.lookahead.plain_steps is False


@pytest.mark.slow
def test_torchrun_two_ranks_give_one_result_per_prompt_equal_to_greedy(tiny_dir):
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               *base_args(tiny_dir, "--prompt", "abab", "--json", "--compare-greedy")])
    assert out.returncode == 0, out.stderr[-2000:]
    [record] = json_lines(out.stdout)
    assert record["ranks"] == 2 and record["greedy_match"] is True and record["new_tokens"] == 12


@pytest.mark.slow
def test_torchrun_with_a_missing_model_stops_every_rank_with_one_message(tiny_dir):
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               "--model", "./no/such/model", "--fault-timeout", "20"], timeout=60)
    assert out.returncode != 0
    assert "model path './no/such/model' does not exist" in one_error_line(out.stderr, launcher_traceback=True)


def srun_env(rank: int, port: int) -> dict:
    """What srun exports to task `rank` of 2 on one node."""
    return dict(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NNODES="1",
                SLURM_JOB_ID="4242", MASTER_PORT=str(port))


@pytest.mark.slow
def test_srun_style_tasks_form_one_team(tiny_dir):
    from lp.distributed.bootstrap import free_port

    port = free_port()
    args = base_args(tiny_dir, "--prompt", "abab", "--json")
    procs = [subprocess.Popen([sys.executable, str(RUN), *args], cwd=ROOT, env=clean_env(**srun_env(r, port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    [record] = json_lines(outs[0][0])
    assert record["ranks"] == 2 and record["new_tokens"] == 12
    assert outs[1][0] == ""  # only rank 0 prints results


@pytest.mark.slow
def test_a_rank_killed_mid_job_stops_the_others_with_a_message_naming_it(tiny_dir, tmp_path):
    from lp.distributed.bootstrap import free_port

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"{i}abab"}) + "\n" for i in range(400)))
    output = tmp_path / "out.jsonl"
    args = base_args(tiny_dir, "--input", source, "--output", output, "--fault-timeout", "5")
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, str(RUN), *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=clean_env(**env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 3):
        time.sleep(0.01)
    procs[1].kill()
    _, err = procs[0].communicate(timeout=60)  # no hang: the fault timeout bounds the wait
    procs[1].communicate()
    assert procs[0].returncode == 1
    assert "rank 1" in one_error_line(err)
    json_lines(output.read_text())  # what rank 0 finished is whole


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="no mpirun/mpiexec on PATH (pip install 'lp[mpi]')")
def test_mpirun_two_ranks_via_the_example_script(tiny_dir):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    out = run([ROOT / "launch" / "mpirun_example.sh", *base_args(tiny_dir, "--prompt", "abab", "--json",
                                                                 "--compare-greedy", "--kv-sync", "gather")],
              NP="2", PYTHON=sys.executable)
    assert out.returncode == 0, out.stderr[-2000:]
    [record] = json_lines(out.stdout)
    assert record["ranks"] == 2 and record["greedy_match"] is True


@pytest.mark.slow
def test_no_arguments_runs_the_embedded_model_on_its_prompts():
    from lp.default_model import DEFAULT_MODEL_PATH, DEFAULT_PROMPTS

    if not (DEFAULT_MODEL_PATH / "model.safetensors").exists():
        pytest.skip("the embedded default model is not built yet (lp/assets/code_model)")
    out = run([sys.executable, RUN], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("--- prompt ") for line in lines) == len(DEFAULT_PROMPTS)
    assert lines[-1].startswith(f"lp: {len(DEFAULT_PROMPTS)} of {len(DEFAULT_PROMPTS)} prompts, ")
    assert "Traceback" not in out.stderr


def test_launch_scripts_are_valid_shell():
    for script in ("slurm_multinode.sbatch", "mpirun_example.sh"):
        assert subprocess.run(["bash", "-n", ROOT / "launch" / script]).returncode == 0
    sbatch = (ROOT / "launch" / "slurm_multinode.sbatch").read_text()
    assert "srun" in sbatch and "--rdzv_backend c10d" in sbatch and "launch/run.py" in sbatch


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed "
                    "(pip install 'lp[deepspeed]')")
@pytest.mark.slow
def test_torchrun_with_tp_2_shards_one_replica_and_still_matches_greedy(tiny_dir):
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               *base_args(tiny_dir, "--prompt", "abab", "--json", "--compare-greedy", "--tp", "2")], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    [record] = json_lines(out.stdout)
    assert record["greedy_match"] is True and record["new_tokens"] == 12


@pytest.mark.slow
def test_compile_says_what_it_compiles_and_keeps_saying_it_is_still_compiling(tiny_dir, capsys, monkeypatch):
    from lp import progress
    monkeypatch.setattr(progress, "PROGRESS_S", 0.2)  # a line every 0.2 s instead of every 30
    assert main(base_args(tiny_dir, "--prompt", "abcabcabc", "--compile", "--lookup", "1", "--json")) == 0
    err = capsys.readouterr().err
    assert "compiling the fast path's step for a" in err and "later prompts of this size reuse it" in err
    assert re.search(r"still compiling the fast path's step: \d+ s so far", err)
