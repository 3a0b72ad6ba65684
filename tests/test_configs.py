"""Run configs: every shipped YAML is valid, unknown keys are named, and the override order holds."""
from pathlib import Path

import pytest

from lp import ConfigError, LookaheadConfig
from lp.cli import build_parser, resolve_config
from lp.cli.run_config import RunConfig, build, load_yaml, merge, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The lookahead paper's settings: (W, N, G) = (15, 5, 15) for 7-8B models, (10, 5, 10) for 13B, (7, 5, 7) for 34B.
PAPER = {
    "llama-2-7b-chat.yaml": ("meta-llama/Llama-2-7b-chat-hf", (15, 5, 15)),
    "codellama-7b-instruct.yaml": ("codellama/CodeLlama-7b-Instruct-hf", (15, 5, 15)),
    "llama-3.1-8b-instruct.yaml": ("meta-llama/Llama-3.1-8B-Instruct", (15, 5, 15)),
    "qwen2.5-coder-7b-instruct.yaml": ("Qwen/Qwen2.5-Coder-7B-Instruct", (15, 5, 15)),
    "mistral-7b-instruct.yaml": ("mistralai/Mistral-7B-Instruct-v0.2", (15, 5, 15)),
    "llama-2-13b-chat.yaml": ("meta-llama/Llama-2-13b-chat-hf", (10, 5, 10)),
    "codellama-34b-instruct.yaml": ("codellama/CodeLlama-34b-Instruct-hf", (7, 5, 7)),
}


def config_for(*argv: str) -> RunConfig:
    return resolve_config(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_is_valid(name):
    cfg = build(load_yaml(CONFIGS / name))
    assert cfg.trust_remote_code is False
    assert cfg.tp == 1


@pytest.mark.parametrize("name", sorted(PAPER))
def test_real_model_configs_use_the_papers_settings(name):
    model, wng = PAPER[name]
    cfg = build(load_yaml(CONFIGS / name))
    assert cfg.model == model
    assert (cfg.lookahead.window, cfg.lookahead.ngram, cfg.lookahead.guess) == wng
    assert cfg.dtype in ("float16", "bfloat16") and cfg.chat is True


def test_default_yaml_spells_out_the_built_in_defaults():
    assert build(load_yaml(CONFIGS / "default.yaml")) == RunConfig()
    assert config_for() == RunConfig()
    assert RunConfig().model is None  # the embedded model


def test_unknown_top_level_key_is_named_with_the_known_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\nwindow_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'window_size' in .*bad.yaml; known keys: model, ") as e:
        load_yaml(path)
    assert "max_new_tokens" in str(e.value) and "\n" not in str(e.value)


def test_unknown_lookahead_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lookahead:\n  window: 3\n  branches: 2\n")
    with pytest.raises(ConfigError, match=r"'lookahead.branches'.*known lookahead keys: window, ngram, guess"):
        load_yaml(path)


def test_unknown_set_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown config key 'lookahead.widow' in --set"):
        parse_overrides(["lookahead.widow=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["window"])


def test_generation_overrides_must_be_generation_config_fields():
    assert config_for("--set", "generation.repetition_penalty=1.0").generation == {"repetition_penalty": 1.0}
    with pytest.raises(ConfigError, match=r"'generation.repetition_penalti' in --set; it must be a field of"):
        config_for("--set", "generation.repetition_penalti=1.0")


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)


def test_set_values_are_yaml_scalars_and_dotted_keys_nest():
    assert parse_overrides(["lookahead.window=7", "dtype=float64", "chat=true", "model=null"]) == {
        "lookahead": {"window": 7}, "dtype": "float64", "chat": True, "model": None}


def test_precedence_file_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_new_tokens: 10\nseed: 3\nlookahead: {window: 9, ngram: 4, guess: 2}\n")
    cfg = config_for("--config", str(path), "--set", "lookahead.window=8", "--set", "max_new_tokens=20",
                     "--max-new-tokens", "30", "--guess", "5")
    assert cfg.max_new_tokens == 30  # flag beats --set beats file
    assert cfg.lookahead == LookaheadConfig(window=8, ngram=4, guess=5, seed=3)  # --set beats file; seed flows in


def test_merge_is_deep():
    assert merge({"lookahead": {"window": 1, "ngram": 2}}, {"lookahead": {"window": 3}}) == {
        "lookahead": {"window": 3, "ngram": 2}}


@pytest.mark.parametrize("override,message", [
    ("tp=0", "tp must be an integer >= 1"),
    ("kv_sync=broadcast", "kv_sync must be one of recompute, gather"),
    ("max_new_tokens=0", "max_new_tokens must be an integer >= 1"),
    ("fault_timeout=-1", "fault_timeout must be a number of seconds from 1"),
    ("fault_timeout=0.001", r"fault_timeout must be a number of seconds from 1 \(a peer needs that long"),
    ("fault_timeout=inf", r"fault_timeout must be a number of seconds from 1 .* to 604800 \(a week\), got 'inf'"),
    ("fault_timeout=1e300", "fault_timeout must be a number of seconds from 1 .* to 604800"),
    ("trust_remote_code=yes please", "trust_remote_code must be true or false"),
    ("lookahead.window=0", r"window must be an integer in \[1, 1024\], got 0"),
])
def test_bad_values_get_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_for("--set", override)
    assert "\n" not in str(info.value)


def test_the_memory_of_a_job_is_on_unless_records_are_asked_to_start_afresh():
    assert config_for().lookahead.job_memory
    assert config_for("--memory", "record").lookahead.memory == "record"
    assert not config_for("--set", "lookahead.memory=record").lookahead.job_memory
    with pytest.raises(ConfigError, match="memory must be 'job' or 'record', got 'all'"):
        LookaheadConfig(memory="all")


def test_the_jobs_corpus_is_sized_per_device_unless_given_and_absent_without_job_memory_or_lookup():
    assert LookaheadConfig().corpus_tokens_on("cpu") == 8192 and LookaheadConfig().corpus_tokens_on("cuda") == 262144
    assert config_for("--set", "lookahead.memory_tokens=100").lookahead.corpus_tokens_on("cuda") == 100
    assert config_for("--memory-tokens", "0").lookahead.corpus_tokens_on("cuda") == 0
    assert LookaheadConfig(memory_tokens=0).corpus_tokens_on("cpu") == 0
    assert LookaheadConfig(memory="record").corpus_tokens_on("cpu") == 0  # a record's own text only
    assert LookaheadConfig(lookup=0).corpus_tokens_on("cpu") == 0  # nothing searches it
    with pytest.raises(ConfigError, match=r"memory_tokens must be an integer in \[0, 67108864\], got -1"):
        LookaheadConfig(memory_tokens=-1)


def test_a_sharded_replica_stays_eager_unless_compile_is_asked_for():
    from lp.cli.main import engine_settings
    assert engine_settings(config_for("--tp", "2")).compile is False  # not CUDA's compiled default
    assert engine_settings(config_for("--tp", "2", "--compile")).compile is True
    assert engine_settings(config_for()).compile is None  # one model copy: the device's default
