"""Tensor parallelism inside each lookahead replica (DeepSpeed AutoTP): world = P_lp x P_tp ranks.

Replica g is held by the P_tp consecutive ranks [g*P_tp, (g+1)*P_tp), its weights sharded over their own
process group; all of them compute the same logits, so each runs the same Decoder and commits the same
tokens. The lookahead exchange runs between replicas: the rank with tensor index t joins lookahead group t,
{g*P_tp + t for every g}, and only ever exchanges its own head shard of the KV cache there.

    plan = plan_groups(dist.get_world_size(), tp=2)
    model = shard_model(empty_model(folder, torch.bfloat16), plan.tp_group, plan.tp)  # reads 1/tp of the weights
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
from .replicas import split_world

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
    replica: int  # this rank's model copy inside its lookahead team
    tp_rank: int
    team: int = 0  # which independent team (lp.distributed.replicas) the rank belongs to


def plan_groups(world: int, tp: int, lp: int | None = None, replicas: int | None = None) -> Plan:
    """Create every replica's tensor-parallel and lookahead groups (same calls, same order on every rank)."""
    layout = split_world(world, tp, lp, replicas)
    lp, tp, size = layout.lp, layout.tp, layout.team_size
    rank = dist.get_rank()
    tp_groups, lp_groups = {}, {}
    for r in range(layout.replicas):
        base = r * size
        for g in range(lp):
            tp_groups[r, g] = dist.new_group([base + g * tp + t for t in range(tp)])
        for t in range(tp):
            lp_groups[r, t] = dist.new_group([base + g * tp + t for g in range(lp)])
    replica = layout.replica_of(rank)
    copy, tp_rank = divmod(rank - replica * size, tp)
    return Plan(lp, tp, tp_groups[replica, copy], lp_groups[replica, tp_rank], copy, tp_rank, replica)


def make_team(kv_sync: str, plan: Plan, fault_timeout_s: float = 60.0) -> ProcessGroupTeam:
    """The lookahead team of this rank's tensor index; its heartbeats live under their own store prefix."""
    store = default_store()
    store = dist.PrefixStore(f"lp-team{plan.team}-tp{plan.tp_rank}", store) if store is not None else None
    return ProcessGroupTeam(kv_sync, group=plan.lp_group, fault_timeout_s=fault_timeout_s, store=store)


def check_shardable(model) -> None:
    """Refuse, before any work starts, a model family AutoTP is not known to shard correctly."""
    family = getattr(model.config, "model_type", None)
    if family not in SHARDABLE:
        raise TensorParallelError(f"tensor parallelism supports model types {', '.join(SHARDABLE)}; "
                                  f"{type(model).__name__} is {family!r}: run it with tp=1")


def shard_model(model, tp_group, tp: int, weights: str | os.PathLike | None = None):
    """Shard `model` in place over `tp_group` with DeepSpeed AutoTP and return it (unchanged when tp == 1).

    Every rank of the world calls it (DeepSpeed broadcasts an RNG state over the world). AutoTP always splits
    a meta-device copy of the model; then each parameter is filled with this rank's slice only, read from the
    safetensors checkpoint in `weights` (default: the folder `empty_model` built it from) when the model came
    on the meta device, so a rank holds its shards plus at most one whole tensor (about 1/tp of the model),
    or cut from the model's own tensors when it came loaded whole.
    """
    if tp == 1:
        return model
    check_shardable(model)
    deepspeed = _import_deepspeed()
    _reuse_torch_distributed()
    dtype = next(model.parameters()).dtype
    if any(p.is_meta for p in model.parameters()):
        source = _FileWeights(model, Path(weights or model.config.name_or_path))
    else:
        source = _MemoryWeights(model)
        _move_parameters_to_meta(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # init_inference's to_empty wipes them
    # DeepSpeed casts the model to its dtype and refuses one its accelerator does not list (float64 on CPU,
    # which the exact tests run): on a meta model the cast costs nothing, and every tensor is then filled
    # in the model's own dtype.
    from deepspeed.accelerator import get_accelerator
    listed = get_accelerator().supported_dtypes()
    tensor_parallel = {"tp_size": tp, "tp_group": tp_group, "mpu": _GroupMpu(tp_group)}
    with contextlib.redirect_stdout(sys.stderr):  # AutoTP prints its plan
        engine = deepspeed.init_inference(model, dtype=dtype if dtype in listed else listed[0],
                                          tensor_parallel=tensor_parallel, replace_with_kernel_inject=False)
    model = engine.module
    for module_name, module in model.named_modules():
        for name in module._buffers:
            key = f"{module_name}.{name}" if module_name else name
            if key in buffers and module._buffers[name] is not None:
                module._buffers[name] = buffers[key].to(module._buffers[name].device)
    _load_shards(model, source, dist.get_rank(tp_group), dtype)
    return model


def _move_parameters_to_meta(model) -> None:
    """Swap every parameter for a meta one of its shape and dtype (tied parameters stay tied)."""
    moved: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in moved:
                    moved[id(param)] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=False)
                module._parameters[name] = moved[id(param)]


class _MemoryWeights:
    """The full tensors of a model loaded whole, by parameter name (taken before it moves to the meta device)."""

    def __init__(self, model):
        self.tensors = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
        self.where = "the model"

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @contextlib.contextmanager
    def open(self, key: str):
        yield self.tensors[key]


class _FileWeights:
    """A safetensors checkpoint's tensors by model parameter name; each read opens its file and slices lazily."""

    def __init__(self, model, folder: Path):
        self.files = _model_names(model, _checkpoint_files(folder))
        self.where = f"the checkpoint in {folder}"

    def __contains__(self, key: str) -> bool:
        return key in self.files

    @contextlib.contextmanager
    def open(self, key: str):
        from safetensors import safe_open

        file, stored = self.files[key]
        with safe_open(str(file), framework="pt") as f:
            yield _LazyTensor(f, stored)


class _LazyTensor:
    """One stored tensor: its shape, a block of it (read alone), or all of it."""

    def __init__(self, handle, name: str):
        self.handle, self.name, self.slice = handle, name, handle.get_slice(name)
        self.shape = tuple(self.slice.get_shape())

    def __getitem__(self, box):
        return self.slice[box]  # a view of a buffer as large as the whole tensor: copied before it is kept

    def whole(self) -> torch.Tensor:
        return self.handle.get_tensor(self.name)


def empty_model(source: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False):
    """The causal LM saved in the local folder `source`, built with its parameters on the meta device.

    Buffers (rotary frequencies) are real; `shard_model` later fills the parameters, each rank its own slices.
    None when the folder holds no safetensors checkpoint (load it whole instead).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    source = Path(source)
    if not _checkpoint_files(source):
        return None
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if (source / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(source))
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to the meta device at once (buffers stay real)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint in `folder` (empty when there is none)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _model_names(model, files: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """Model parameter name -> (file, checkpoint name), renamed the way transformers renames when it loads
    (gpt_neox's `embed_out` is `lm_head`); a checkpoint needing more than renames (fused or split tensors)
    is refused."""
    names = {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings: the names are the checkpoint's
        return {name: (file, name) for name, file in files.items()}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    ours = dict.fromkeys(model.state_dict(), True)
    for stored, file in files.items():
        name, converter = rename_source_key(stored, renamings, converters, model.base_model_prefix, ours)
        if converter is not None:
            raise TensorParallelError(f"{stored} in {file.parent} must be converted ({converter}) before it can be "
                                      "sharded while loading: load the model whole (no meta device) instead")
        names[name] = (file, stored)
    return names


def _box(layout, rank: int, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """This rank's shard as one rectangular block of the full tensor (slices), or None when it is not one."""
    pieces = layout.pieces_by_rank[rank]
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    if len(pieces) != 1 or pieces[0].scale != 1.0 or len(pieces[0].shape) != len(shape) \
            or list(pieces[0].source_strides) != strides or list(pieces[0].shape) != list(layout.shard_shapes[rank]):
        return None
    if pieces[0].numel == 0:  # an empty shard (AutoTP's grain left this rank nothing)
        return tuple(slice(0, size) for size in pieces[0].shape)
    piece, offset, box = pieces[0], pieces[0].source_offset, []
    for axis, size in enumerate(piece.shape):
        start, offset = divmod(offset, strides[axis])
        box.append(slice(start, start + size))
    return tuple(box)


def _load_shards(model, source, tp_rank: int, dtype: torch.dtype) -> None:
    """Replace every parameter of the AutoTP-sharded meta `model` by this rank's slice of the source's tensor.

    AutoTP records on each parameter it splits the exact map from the full tensor to each rank's shard (its
    universal-checkpoint metadata, the one DeepSpeed's checkpoint conversion uses); parameters it left whole
    are read whole. A checkpoint file is opened per tensor, so its memory map never stays resident.
    """
    from deepspeed.checkpoint.affine import ParamAffineMap
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.module_inject.layers import collect_autotp_universal_checkpoint_info

    # init_inference's to_empty dropped the layout each split layer marked on its meta parameters; this
    # marks it again on the empty ones (the returned summary, by name pattern, is not needed).
    collect_autotp_universal_checkpoint_info(model)
    embeddings = model.get_input_embeddings().weight
    embedding_name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is embeddings)
    loaded: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:  # (init_inference's to_empty left them all real but uninitialised)
                continue
            if id(param) in loaded:  # tied: the same parameter under another name
                module._parameters[name] = loaded[id(param)]
                continue
            key = f"{module_name}.{name}" if module_name else name
            if key not in source and key.endswith("lm_head.weight") and model.config.tie_word_embeddings:
                key = embedding_name  # a tied output head: the embedding matrix, split as AutoTP split it
            if key not in source:
                raise TensorParallelError(f"{key} is missing from {source.where}")
            layout = ((getattr(param, DS_AUTOTP_UC_META, None) or {}).get("conversion") or {}).get("affine_map")
            layout = ParamAffineMap.from_dict(layout) if layout is not None else None
            with source.open(key) as full:
                shape = tuple(full.shape)
                box = _box(layout, tp_rank, shape) if layout is not None else tuple(slice(0, n) for n in shape)
                if box is not None:  # only this rank's block is read
                    shard = full[box].to(dtype)
                else:  # an interleaved layout (fused qkv): the pieces of the whole tensor
                    whole = full.whole() if hasattr(full, "whole") else full
                    shard = layout.extract(whole.to(dtype), tp_rank)
            if tuple(shard.shape) != tuple(param.shape):
                raise TensorParallelError(f"AutoTP split {key} {shape} -> {tuple(param.shape)}, but the slice read "
                                          f"is {tuple(shard.shape)}")
            new = torch.nn.Parameter(shard.to(param.device, copy=True).contiguous(), requires_grad=False)
            for attr, value in vars(param).items():  # AutoTP's markers (tensor-parallel flags, layout)
                setattr(new, attr, value)
            loaded[id(param)] = module._parameters[name] = new


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
    torch.distributed.all_reduce on the replica group is used instead. DeepSpeed (0.19) has no public switch
    for it: init_distributed takes none, no environment variable is read, and the op is built whenever the
    CPU accelerator finds it compatible; setting shm_vector_kernel_level to 0 is DeepSpeed's own fallback
    for a CPU without the kernel's instructions.
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
