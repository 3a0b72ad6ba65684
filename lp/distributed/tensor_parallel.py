"""Tensor parallelism inside each lookahead replica (DeepSpeed AutoTP): world = P_lp x P_tp ranks.

Replica g is held by the P_tp consecutive ranks [g*P_tp, (g+1)*P_tp), its weights sharded over their own
process group; all of them compute the same logits, so each runs the same Decoder and commits the same
tokens. The lookahead exchange runs between replicas: the rank with tensor index t joins lookahead group t,
{g*P_tp + t for every g}, and only ever exchanges its own head shard of the KV cache there.

    plan = plan_groups(dist.get_world_size(), tp=2)
    model = shard_model(model, plan.tp_group, plan.tp)
    team = make_team("gather", plan)
    result = lp.Decoder(model, config, team).generate(prompt, 128)
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from .parallel import ProcessGroupTeam, default_store

# Families whose tiny float64 models shard under AutoTP with logits equal to the unsharded model's and
# decode exactly in tests/test_tensor_parallel.py. AutoTP refuses gpt2; phi3's fused qkv/gate_up break.
SHARDABLE = ("llama", "mistral", "qwen2", "gemma", "gpt_neox", "phi")


class TensorParallelError(ValueError):
    """Tensor parallelism cannot be set up as asked (world size, model family, missing DeepSpeed)."""


class Plan(NamedTuple):
    """This rank's place in the P_lp x P_tp grid and the two process groups it belongs to."""

    lp: int
    tp: int
    tp_group: object  # the ranks sharing this rank's replica
    lp_group: object  # the ranks with this rank's tensor index, one per replica
    replica: int
    tp_rank: int


def split_world(world: int, tp: int, lp: int | None = None) -> tuple[int, int]:
    """(P_lp, P_tp) for `world` ranks; P_lp defaults to world // tp; a world not divisible by tp is refused."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TensorParallelError(f"tp must be a positive integer, got {tp!r}")
    if world % tp:
        raise TensorParallelError(f"world size {world} is not divisible by tp={tp}: launch a multiple of {tp} ranks")
    if lp is not None and lp * tp != world:
        raise TensorParallelError(f"lp={lp} x tp={tp} = {lp * tp} ranks, but the world has {world}")
    return world // tp, tp


def plan_groups(world: int, tp: int, lp: int | None = None) -> Plan:
    """Create every replica group and every lookahead group (same calls, same order on every rank)."""
    lp, tp = split_world(world, tp, lp)
    rank = dist.get_rank()
    replica, tp_rank = divmod(rank, tp)
    tp_groups = [dist.new_group([g * tp + t for t in range(tp)]) for g in range(lp)]
    lp_groups = [dist.new_group([g * tp + t for g in range(lp)]) for t in range(tp)]
    return Plan(lp, tp, tp_groups[replica], lp_groups[tp_rank], replica, tp_rank)


def make_team(kv_sync: str, plan: Plan, fault_timeout_s: float = 60.0) -> ProcessGroupTeam:
    """The lookahead team of this rank's tensor index; its heartbeats live under their own store prefix."""
    store = default_store()
    store = dist.PrefixStore(f"lp-tp{plan.tp_rank}", store) if store is not None else None
    return ProcessGroupTeam(kv_sync, group=plan.lp_group, fault_timeout_s=fault_timeout_s, store=store)


def check_shardable(model) -> None:
    """Refuse, before any work starts, a model family AutoTP is not known to shard correctly."""
    family = getattr(model.config, "model_type", None)
    if family not in SHARDABLE:
        raise TensorParallelError(f"tensor parallelism supports model types {', '.join(SHARDABLE)}; "
                                  f"{type(model).__name__} is {family!r}: run it with tp=1")


def shard_model(model, tp_group, tp: int):
    """Shard `model` in place over `tp_group` with DeepSpeed AutoTP and return it (unchanged when tp == 1).

    Every rank of the world calls it (DeepSpeed broadcasts an RNG state over the world). Load the model on
    the CPU: only this rank's shards move to the current accelerator device.
    """
    if tp == 1:
        return model
    check_shardable(model)
    deepspeed = _import_deepspeed()
    _reuse_torch_distributed()
    dtype = next(model.parameters()).dtype
    tensor_parallel = {"tp_size": tp, "tp_group": tp_group, "mpu": _GroupMpu(tp_group)}
    with _accelerator_accepts(dtype), contextlib.redirect_stdout(sys.stderr):  # AutoTP prints its plan
        engine = deepspeed.init_inference(model, dtype=dtype, tensor_parallel=tensor_parallel,
                                          replace_with_kernel_inject=False)
    return engine.module


class _GroupMpu:
    """The model-parallel unit DeepSpeed asks for: our replica group (its default would be ranks 0..tp-1)."""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.group)


def _import_deepspeed():
    if not os.environ.get("MASTER_ADDR"):
        # DeepSpeed's own discovery would pick `hostname -I`; never let it choose a non-loopback address
        raise TensorParallelError("MASTER_ADDR is not set: initialise torch.distributed (torchrun/launch) first")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its logger binds to stdout at import: keep stdout for results
            import deepspeed
    except ImportError as error:
        raise TensorParallelError(f"tensor parallelism needs DeepSpeed (pip install 'lp[deepspeed]'): {error}") \
            from error
    return deepspeed


def _reuse_torch_distributed() -> None:
    """Make DeepSpeed wrap our initialised process group, with its shared-memory all-reduce off.

    That kernel reduces over every local rank whatever group it is given (logits off by 0.4 at P_lp = 2),
    leaves float64 unreduced, crashes without LOCAL_SIZE and leaves a /dev/shm buffer per rank; plain
    torch.distributed.all_reduce on the replica group is used instead.
    """
    if not dist.is_initialized():
        raise TensorParallelError("torch.distributed is not initialised: launch with torchrun or mpirun")
    ds_comm = importlib.import_module("deepspeed.comm.comm")
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would find the torch attribute

    if ds_comm.cdb is None:
        build = ds_torch.build_shm_op
        ds_torch.build_shm_op = lambda: None
        try:
            ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                     dist_init_required=False, verbose=False)
        finally:
            ds_torch.build_shm_op = build
    ds_comm.cdb.shm_vector_kernel_level = 0  # an op loaded earlier by someone else is bypassed as well
    if getattr(ds_comm.cdb, "shm_comm_op", None) is not None:
        atexit.register(_remove_shm_buffer, dist.get_rank())


def _remove_shm_buffer(rank: int) -> None:
    """Delete the ~69 MB /dev/shm segment DeepSpeed's shared-memory all-reduce created for this rank."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


@contextlib.contextmanager
def _accelerator_accepts(dtype: torch.dtype):
    """Let DeepSpeed's dtype check pass for `dtype` (its CPU list omits float64, which AutoTP's torch layers run)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    listed = accelerator.supported_dtypes
    if dtype in listed():
        yield
        return
    accelerator.supported_dtypes = lambda: listed() + [dtype]
    try:
        yield
    finally:
        del accelerator.supported_dtypes
