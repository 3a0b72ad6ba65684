"""Lookahead x tensor parallelism (DeepSpeed AutoTP) on real gloo groups: every rank's output equals greedy."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lp.distributed.bootstrap import free_port
from lp.distributed.tensor_parallel import SHARDABLE, TensorParallelError, shard_model
from lp.greedy_rules import hf_greedy
from models import FAMILIES, STORIES, stories, tiny_model
from test_exactness import repetitive_prompt
from test_parallel import run_team

NO_DEEPSPEED = "DeepSpeed is not installed (pip install 'lp[deepspeed]'): multi-process tensor parallelism is untested"

WNG = {"llama": (15, 5, 15), "mistral": (4, 3, 4), "qwen2": (5, 4, 0), "gemma": (7, 4, 7), "gpt_neox": (3, 6, 5),
       "phi": (1, 2, 1)}


def all_cases() -> tuple[list[dict], list[list[int]]]:
    """Every shardable tiny family and stories260k (when present), both KV strategies; with greedy references."""
    cases, expected = [], []
    for i, family in enumerate(SHARDABLE):
        prompt = repetitive_prompt(300 + i, 24)
        reference = hf_greedy(tiny_model(family, seed=i), prompt, 40)
        for kv_sync in ("recompute", "gather"):
            cases.append(dict(model=family, seed=i, prompt=prompt, wng=WNG[family], max_new=40, kv_sync=kv_sync))
            expected.append(reference)
    if STORIES.exists():
        model, tokenizer = stories()
        reference = hf_greedy(model, tokenizer("Once upon a time").input_ids, 128)
        for kv_sync in ("recompute", "gather"):
            cases.append(dict(model="stories", prompt="Once upon a time", wng=(15, 5, 15), max_new=128,
                              kv_sync=kv_sync))
            expected.append(reference)
    return cases, expected


@pytest.fixture(scope="module", params=[(2, 2), (1, 2)], ids=lambda p: f"lp{p[0]}xtp{p[1]}")
def grid_run(request, tmp_path_factory):
    """Run every case once on P_lp * P_tp ranks started as torchrun would (LOCAL_SIZE set, as launchers do)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip(NO_DEEPSPEED)
    lp_size, tp = request.param
    world = lp_size * tp
    tmp = tmp_path_factory.mktemp(f"lp{lp_size}tp{tp}")
    cases, expected = all_cases()
    port = free_port()
    outs, codes = run_team(world, {"tp": tp, "cases": cases}, tmp, timeout=600, port=port, LOCAL_SIZE=str(world))
    assert codes == [0] * world
    plans = [json.loads((tmp / f"out{r}.json").read_text())["plan"] for r in range(world)]
    outs = [dict(plan=plan, cases=got) for plan, got in zip(plans, outs)]
    return dict(lp=lp_size, tp=tp, cases=cases, expected=expected, outs=outs, port=port)


@pytest.mark.slow
def test_every_rank_of_every_replica_matches_single_process_greedy(grid_run):
    for rank, out in enumerate(grid_run["outs"]):
        for case, got, want in zip(grid_run["cases"], out["cases"], grid_run["expected"]):
            assert got["tokens"] == want, f"rank {rank}, {case['model']} {case['kv_sync']}"


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.exists(), reason="tests/assets/stories260k is absent: LP x TP ran on tiny models only")
def test_stories260k_is_among_the_cases_every_replica_decodes_exactly(grid_run):
    stories_cases = [i for i, case in enumerate(grid_run["cases"]) if case["model"] == "stories"]
    assert len(stories_cases) == 2
    for out in grid_run["outs"]:
        assert all(out["cases"][i]["tokens"] == grid_run["expected"][i] for i in stories_cases)


@pytest.mark.slow
def test_replicas_are_consecutive_ranks_and_lookahead_groups_share_a_tensor_index(grid_run):
    lp_size, tp = grid_run["lp"], grid_run["tp"]
    for rank, out in enumerate(grid_run["outs"]):
        g, t = divmod(rank, tp)
        assert out["plan"] == {"lp": lp_size, "tp": tp, "replica": g, "tp_rank": t,
                               "tp_group": list(range(g * tp, (g + 1) * tp)),
                               "lp_group": [h * tp + t for h in range(lp_size)]}


def cache_bytes(name: str, seed: int, tokens: int) -> int:
    """Bytes transformers itself stores for `tokens` positions of the whole (unsharded) model's KV cache."""
    model = stories()[0] if name == "stories" else tiny_model(name, seed=seed)
    cache = model(input_ids=torch.arange(1, tokens + 1)[None], use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.slow
def test_the_tp_ranks_of_a_replica_together_move_one_whole_kv_copy_of_the_winners_slots(grid_run):
    """KV bytes a step moves = gather's bytes minus recompute's (the same exchange rows, no KV); summed over a
    replica's tp ranks they equal the whole model's cache for N positions, so each rank moved only its shard."""
    lp_size, tp = grid_run["lp"], grid_run["tp"]
    cases = grid_run["cases"]
    split = 0
    for i, case in enumerate(cases):
        if case["kv_sync"] != "gather":
            continue
        j = next(k for k, c in enumerate(cases) if c["kv_sync"] == "recompute" and c["model"] == case["model"])
        kv = []
        for out in grid_run["outs"]:
            gather, recompute = out["cases"][i], out["cases"][j]
            kv.append(gather["comm_bytes"] / gather["steps"] - recompute["comm_bytes"] / recompute["steps"])
        with torch.no_grad():
            whole = cache_bytes(case["model"], case.get("seed", 0), case["wng"][1])
        for g in range(lp_size):
            shards = kv[g * tp:(g + 1) * tp]
            assert sum(shards) == whole, f"{case['model']}: replica {g} moved {shards}, the whole cache is {whole}"
            split += min(shards) > 0  # a rank holding no KV head (gemma's single one sits on rank 0) moves none
    assert split >= len(cases) // 4  # most models' heads are shared out, so every rank moves a part


@pytest.mark.slow
def test_no_shared_memory_segment_is_left_behind(grid_run):
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{grid_run['port']}_"
    assert not [p for p in Path("/dev/shm").glob(prefix + "*")]


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(SHARDABLE)))
def test_a_family_autotp_cannot_shard_is_refused_before_any_work(family):
    with pytest.raises(TensorParallelError, match=f"'{family}'.*tp=1"):
        shard_model(tiny_model(family), tp_group=None, tp=2)


def test_tp_of_one_leaves_the_model_alone():
    model = tiny_model("gpt2")
    assert shard_model(model, tp_group=None, tp=1) is model


def test_deepspeed_never_picks_an_address_itself(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(TensorParallelError, match="MASTER_ADDR is not set"):
        shard_model(tiny_model("llama"), tp_group=None, tp=2)


def test_a_missing_deepspeed_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(TensorParallelError, match=r"needs DeepSpeed \(pip install 'lp\[deepspeed\]'\)"):
        shard_model(tiny_model("llama"), tp_group=None, tp=2)


def save_random_llama(folder: Path, layers_per_file: int = 4, **overrides) -> None:
    """A random Llama checkpoint written tensor by tensor (sharded safetensors with an index), never whole in memory."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**{**dict(vocab_size=8000, hidden_size=2048, intermediate_size=5632,
                                                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                                                max_position_embeddings=256, tie_word_embeddings=False,
                                                bos_token_id=1, eos_token_id=None, pad_token_id=0), **overrides})
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    files, weight_map = {}, {}
    for name, shape in shapes.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        file = f"model-{int(layer) // layers_per_file if layer else 'rest'}.safetensors"
        tensor = torch.ones(shape) if "norm" in name else torch.empty(shape).uniform_(-0.05, 0.05, generator=generator)
        files.setdefault(file, {})[name] = tensor
        weight_map[name] = file
        if layer and all(n in files[file] for n in shapes if n.startswith(f"model.layers.{layer}.")) \
                and (int(layer) + 1) % layers_per_file == 0:
            save_file(files.pop(file), folder / file, metadata={"format": "pt"})
    for file, tensors in files.items():
        save_file(tensors, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def run_memory_team(ranks: int, spec: dict, tmp: Path) -> list[dict]:
    """tests/tp_memory_worker.py on `ranks` ranks started as torchrun would; each rank's report."""
    import subprocess
    import time

    spec_file = tmp / f"spec{ranks}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOCAL_SIZE=str(ranks))
    worker = Path(__file__).resolve().parent / "tp_memory_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(spec_file), str(tmp / f"mem{ranks}_{r}.json")],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    deadline = time.time() + 300
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{ranks} ranks hung past 300 s")
        assert p.returncode == 0, f"rank {r} of {ranks} failed: {err[-2000:]}"
    return [json.loads((tmp / f"mem{ranks}_{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    """Every shardable tiny family saved with save_pretrained, with a prompt and its greedy continuation."""
    folder = tmp_path_factory.mktemp("families")
    cases, expected = [], []
    for i, family in enumerate(SHARDABLE):
        model, prompt = tiny_model(family, seed=i), repetitive_prompt(300 + i, 24)
        model.save_pretrained(folder / family)
        cases.append(dict(folder=str(folder / family), dtype="float64", prompt=prompt, wng=WNG[family], max_new=40))
        expected.append(hf_greedy(model, prompt, 40))
    return cases, expected


@pytest.mark.slow
def test_every_family_loaded_shard_by_shard_from_its_checkpoint_decodes_exactly(saved_families, tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip(NO_DEEPSPEED)
    cases, expected = saved_families
    outs = run_memory_team(2, {"tp": 2, "cases": cases}, tmp_path)
    for rank, out in enumerate(outs):
        for case, got, want in zip(cases, out["cases"], expected):
            assert got["tokens"] == want, f"rank {rank}, {Path(case['folder']).name}"
            assert got["devices"] == ["cpu"]  # nothing left on the meta device


@pytest.mark.slow
def test_a_tp2_rank_holds_about_half_the_host_memory_of_a_whole_model(tmp_path):
    """Each rank builds the model on the meta device and reads only its own slices of the checkpoint: the peak
    RSS of a tp=2 rank (weights, Python, torch, DeepSpeed) is at most 0.6x that of a tp=1 process on a ~4.7 GB model."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip(NO_DEEPSPEED)
    import torch
    import transformers

    folder = tmp_path / "llama"
    folder.mkdir()
    save_random_llama(folder)
    prompt = [5, 17, 99, 5, 17, 99, 5, 17, 42, 5, 17]
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = hf_greedy(reference, prompt, 6)
    del reference
    case = dict(folder=str(folder), dtype="float32", prompt=prompt, wng=(4, 3, 4), max_new=6)
    whole = run_memory_team(1, {"tp": 1, "cases": [case]}, tmp_path)
    sharded = run_memory_team(2, {"tp": 2, "cases": [case]}, tmp_path)
    assert [out["cases"][0]["tokens"] for out in whole + sharded] == [expected] * 3
    assert all(out["cases"][0]["params"] < 0.55 * whole[0]["cases"][0]["params"] for out in sharded)
    peaks = [out["peak_mb"] for out in whole + sharded]
    print(f"peak RSS per rank: tp=1 {peaks[0]:.0f} MB, tp=2 {peaks[1]:.0f} / {peaks[2]:.0f} MB "
          f"({max(peaks[1:]) / peaks[0]:.2f}x)")
    assert max(peaks[1:]) <= 0.6 * peaks[0], f"peak RSS per rank: tp=1 {peaks[0]:.0f} MB, tp=2 {peaks[1:]} MB"


@pytest.mark.parametrize("dim, sizes", [(0, [4, 2]), (1, [3, 1]), (1, [4, 0])])
def test_a_shard_autotp_describes_as_one_block_is_read_as_that_block(dim, sizes):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip(NO_DEEPSPEED)
    import torch
    from deepspeed.checkpoint.affine import contiguous_split_map, sub_param_map
    from lp.distributed.tensor_parallel import _box

    full = torch.arange(24.0).reshape(6, 4)
    layout = contiguous_split_map((6, 4), sizes, dim)
    for rank in range(2):
        assert torch.equal(full[_box(layout, rank, (6, 4))], layout.extract(full, rank))
    fused = sub_param_map(shape=(6, 4), sub_dim_sizes=[2, 2, 2], shard_widths=[[1, 1]] * 3, partition_dim=0)
    assert _box(fused, 0, (6, 4)) is None  # interleaved (a fused qkv): read whole, then its pieces
