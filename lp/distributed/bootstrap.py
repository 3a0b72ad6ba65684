"""Find out how this process was launched (plain, torchrun/deepspeed, mpirun, srun) and join the process group.

Single-node runs talk over loopback only: MASTER_ADDR defaults to 127.0.0.1, the rendezvous store that
rank 0 hosts (mpirun, srun) listens on 127.0.0.1 alone, and gloo, NCCL's bootstrap and MPI's own transports
are pinned to the loopback interface, so no library gets to pick a public address by itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from .parallel import default_store

LOOPBACK = "127.0.0.1"
SETUP_TIMEOUT_S = 1800.0  # how long ranks wait for each other to load the model (the fault timeout covers decoding)
MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class BootstrapError(RuntimeError):
    """The ranks could not be set up; the message says what to change."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits: launcher, global rank and size, rank and size on its node, rendezvous address."""

    launcher: str  # "single", "torchrun", "mpi" or "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = LOOPBACK
    master_port: int = 29500
    mpi_comm: object = None


def env_rank(env=os.environ) -> int:
    """This process's rank as far as the environment tells, without any communication (0 if unknown)."""
    for name in ("RANK", *MPI_RANK_VARS, "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def detect(env=os.environ) -> Launch:
    """Read the launcher's environment. torchrun and deepspeed export RANK/WORLD_SIZE; mpirun and srun their own."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return Launch("torchrun", _int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0),
                      _int(env, "LOCAL_WORLD_SIZE", world), env.get("MASTER_ADDR", LOOPBACK),
                      _int(env, "MASTER_PORT", 29500))
    if any(name in env for name in MPI_RANK_VARS):
        return _detect_mpi(env)
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        return _detect_slurm(env)
    return Launch("single")


def _detect_mpi(env) -> Launch:
    """mpirun/mpiexec: ranks from mpi4py; rank 0 picks a free loopback port and broadcasts the address."""
    if _mpi_ranks_all_local(env):  # keep MPI's own transports off public interfaces too (set before MPI_Init)
        lo = loopback_interface()
        if lo:
            for name in ("UCX_NET_DEVICES", "FI_TCP_IFACE"):
                os.environ.setdefault(name, lo)
    try:
        from mpi4py import MPI
    except ImportError:
        raise BootstrapError("launched by mpirun but mpi4py is missing; pip install 'lp[mpi]' "
                             "(mpi4py and mpich) or launch with torchrun") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    hosts = comm.allgather(socket.gethostname())
    addr = env.get("MASTER_ADDR")
    problem = None
    if addr is None and len(set(hosts)) > 1:
        problem = (f"the MPI ranks span {len(set(hosts))} hosts ({', '.join(sorted(set(hosts))[:3])}...); set "
                   "MASTER_ADDR (exported with mpirun -x / -genv) to an address of rank 0's host that every "
                   "node reaches")
    port = None
    if rank == 0 and problem is None:
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else free_port(addr or LOOPBACK)
    problem, port = comm.bcast((problem, port), root=0)
    if problem:
        raise BootstrapError(problem)
    return Launch("mpi", rank, world, local_rank, local_world, addr or LOOPBACK, port, comm)


def _mpi_ranks_all_local(env) -> bool:
    """Whether the MPI launcher says every rank runs on this node (MPICH hydra, Open MPI)."""
    pairs = (("MPI_LOCALNRANKS", "PMI_SIZE"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return any(env.get(local) is not None and env.get(local) == env.get(world) for local, world in pairs)


def _detect_slurm(env) -> Launch:
    """srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR from env or the job's first host."""
    world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
    nodes = _int(env, "SLURM_STEP_NUM_NODES", 0) or _int(env, "SLURM_NNODES", 1)
    addr = env.get("MASTER_ADDR")
    if addr is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        addr = LOOPBACK if nodes == 1 else first_host(nodelist)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
    local_world = _int(env, "SLURM_NTASKS_PER_NODE", 0) or max(1, world // max(nodes, 1))
    return Launch("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), local_world, addr, port)


def first_host(nodelist: str) -> str:
    """The first hostname of a Slurm nodelist ("gpu[03-05]" -> "gpu03"), expanded by scontrol."""
    if not nodelist:
        raise BootstrapError("multi-node srun without SLURM_JOB_NODELIST: set MASTER_ADDR to rank 0's host")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        raise BootstrapError(f"cannot expand the Slurm nodelist {nodelist!r} with scontrol; "
                             "set MASTER_ADDR to rank 0's host") from None
    if not out:
        raise BootstrapError(f"scontrol returned no hosts for {nodelist!r}; set MASTER_ADDR to rank 0's host")
    return out[0]


def free_port(addr: str = LOOPBACK) -> int:
    """A TCP port that is free on `addr` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def is_loopback(addr: str) -> bool:
    return addr in ("localhost", "::1") or addr.startswith("127.")


def choose_backend(requested: str, launch: Launch) -> str:
    """NCCL when every rank on this node has its own CUDA device, gloo otherwise (or what was asked for)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and launch.local_world_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def choose_device(requested: str, backend: str, launch: Launch) -> torch.device:
    """cuda:LOCAL_RANK under NCCL (or 'cuda' asked for), cpu when there is no GPU, else what was asked for."""
    for_nccl = requested == "auto" and backend == "nccl"  # the device follows from the backend asked for
    if requested == "auto":
        requested = "cuda" if backend == "nccl" or (launch.world_size == 1 and torch.cuda.is_available()) else "cpu"
    if requested == "cuda":
        requested = f"cuda:{launch.local_rank}"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise BootstrapError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BootstrapError(f"lp decodes on cpu or cuda, not {requested!r}; use --device cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count and for_nccl:
            raise BootstrapError(f"the nccl backend needs a CUDA device per rank, and rank {launch.rank} has none "
                                 f"({count} CUDA devices here); use --backend gloo (or leave --backend out) for "
                                 "CPU runs")
        if (device.index or 0) >= count:
            raise BootstrapError(f"device {device} does not exist here ({count} CUDA devices); "
                                 "use --device cpu or fewer ranks per node")
    if backend == "nccl" and device.type != "cuda":
        raise BootstrapError("the nccl backend needs a CUDA device per rank; use --backend gloo for CPU runs")
    return device


def watch_launcher(launch: Launch, parent: int, period_s: float = 1.0) -> threading.Thread | None:
    """Under a launcher, stop this rank when the launcher (pid `parent`, read when the process started) dies: a
    kill -9ed torchrun leaves its workers running, and a rerun of the same job would then write the same results
    twice. The first check is at once, for a launcher that died while this rank was importing."""
    if launch.launcher == "single":
        return None

    def check() -> None:
        if os.getppid() != parent:  # re-parented: the launcher (pid `parent`) is gone
            sys.stderr.write(f"lp: error: rank {launch.rank}: the launcher (pid {parent}) died; stopping\n")
            sys.stderr.flush()
            os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(period_s)
            check()

    check()  # here, not in the thread: a rank whose launcher is gone already goes no further
    thread = threading.Thread(target=watch, name="lp-launcher-watch", daemon=True)
    thread.start()
    return thread


def init_process_group(launch: Launch, backend: str, timeout_s: float) -> None:
    """Join the default process group (only when there is more than one rank)."""
    import torch.distributed as dist

    if launch.world_size <= 1 or dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port), RANK=str(launch.rank),
                      WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    if is_loopback(launch.master_addr) and launch.local_world_size >= launch.world_size:
        lo = loopback_interface()
        if lo:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    timeout = timedelta(seconds=timeout_s)
    try:
        if launch.launcher != "torchrun" and is_loopback(launch.master_addr):
            store = _loopback_store(launch, timeout)
            dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                    timeout=timeout)
        else:  # torchrun's agent (or a multi-node MASTER_ADDR) hosts the store
            dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                    timeout=timeout)
    except Exception as exc:  # torch raises DistStoreError, RuntimeError, ValueError... for the same mistakes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BootstrapError(
            f"rank {launch.rank} could not join {launch.world_size} ranks at {launch.master_addr}:{launch.master_port} "
            f"within {timeout_s:g}s ({first}); check that all ranks were started, the world size, and MASTER_ADDR"
        ) from None


def _loopback_store(launch: Launch, timeout: timedelta):
    """The rendezvous store, listening on loopback only (torch would listen on every interface by itself)."""
    import torch.distributed as dist

    if launch.rank != 0:
        return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, False, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, launch.master_port))
    sock.listen(128)
    return dist.TCPStore(LOOPBACK, launch.master_port, launch.world_size, True, timeout,
                         master_listen_fd=sock.detach())


def loopback_interface() -> str | None:
    """Name of the loopback network interface ('lo' on Linux, 'lo0' on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def first_error(message: str | None, launch: Launch, timeout_s: float = SETUP_TIMEOUT_S) -> str | None:
    """Agree on the lowest rank's setup error (or None) on every rank, so that all stop together.

    Goes through the rendezvous store with its own generous timeout: loading weights may take some ranks far
    longer than the fault timeout (a dead rank is still noticed: launchers stop the others when one exits).
    """
    if launch.world_size <= 1:
        return message
    store, tag = default_store(), next_tag("setup")
    store.set(f"{tag}/{launch.rank}", json.dumps(message))
    _wait(store, [f"{tag}/{r}" for r in range(launch.world_size)], timeout_s, launch, "finish setting up")
    for r in range(launch.world_size):
        text = json.loads(store.get(f"{tag}/{r}"))
        if text:
            return text if r == 0 else f"rank {r}: {text}"
    return None


def release(launch: Launch, timeout_s: float = SETUP_TIMEOUT_S) -> None:
    """Rank 0 lets the others go on once it is done with work of its own (e.g. the greedy comparison)."""
    if launch.world_size <= 1:
        return
    store, tag = default_store(), next_tag("release")
    if launch.rank == 0:
        store.set(tag, "1")
    else:
        _wait(store, [tag], timeout_s, launch, "release the others")


def _wait(store, keys: list[str], timeout_s: float, launch: Launch, what: str) -> None:
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:
        missing = [k.rsplit("/", 1)[-1] for k in keys if not _has(store, k)]
        raise BootstrapError(f"rank {launch.rank}: rank(s) {', '.join(missing) or '0'} did not {what} within "
                             f"{timeout_s:g}s; a rank died or hung") from None


def _has(store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:
        return False


_TAGS: dict[str, int] = {}


def gather_json(obj, launch: Launch, timeout_s: float = 7 * 24 * 3600.0, alive=None) -> list | None:
    """Every rank's JSON-able `obj`, in rank order, on rank 0 (None elsewhere). Waits for the slowest rank (an
    independent replica may finish hours later); with `alive` (the job's heartbeats, lp.distributed.parallel) it
    stops with RankFailure naming a rank that has not sent its part and stopped beating (dead or hung)."""
    if launch.world_size <= 1:
        return [obj]
    store = default_store()
    if store is None:  # no rendezvous store (MPI): one broadcast per rank
        got = [broadcast_json(obj if launch.rank == r else None, launch, src=r) for r in range(launch.world_size)]
        return got if launch.rank == 0 else None
    tag = next_tag("gather")
    store.set(f"{tag}/{launch.rank}", json.dumps(obj))
    if launch.rank != 0:
        return None
    keys = [f"{tag}/{r}" for r in range(launch.world_size)]
    if alive is None:
        _wait(store, keys, timeout_s, launch, "finish its work")
    else:
        alive.wait_for(store, keys, "finishing its share of the job")
    return [json.loads(store.get(f"{tag}/{r}")) for r in range(launch.world_size)]


def next_tag(kind: str) -> str:
    """Store keys unique per call; every rank makes the same calls in the same order, so they agree."""
    _TAGS[kind] = _TAGS.get(kind, 0) + 1
    return f"lp-cli/{kind}/{_TAGS[kind]}"


def broadcast_json(obj, launch: Launch, src: int = 0):
    """Send a JSON-able object from `src` to every rank (no pickle)."""
    if launch.world_size <= 1:
        return obj
    import torch.distributed as dist

    device = _comm_device()
    data = json.dumps(obj).encode() if launch.rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, src=src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if launch.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=src)
    return json.loads(buf.cpu().numpy().tobytes().decode()) if launch.rank != src else obj


def shutdown(clean: bool = False, destroy: bool = True) -> None:
    """Leave the process group; after a clean run, first wait for every rank, so rank 0 (which may host the
    store) does not exit while a peer still talks to it (that can abort the peer at exit). A process about to
    exit passes destroy=False: tearing gloo down has itself aborted ranks, and exiting closes the sockets."""
    import torch.distributed as dist

    if dist.is_initialized():
        if clean:
            dist.barrier()
        if destroy:
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _int(env, name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(str(value).split("(")[0])
    except (TypeError, ValueError):
        raise BootstrapError(f"environment variable {name}={value!r} is not an integer; check the launcher") from None
