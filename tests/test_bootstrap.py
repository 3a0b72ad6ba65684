"""Launcher detection and process-group setup: torchrun/deepspeed, mpirun, srun and plain python."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lp.distributed import bootstrap
from lp.distributed.bootstrap import BootstrapError, Launch, detect

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")


def subprocess_env(**extra) -> dict:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars and not k.startswith("SLURM_")}
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def test_plain_python_is_one_rank_on_loopback():
    assert detect({}) == Launch("single", 0, 1, 0, 1, "127.0.0.1")


def test_torchrun_and_deepspeed_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29511"}
    assert detect(env) == Launch("torchrun", 3, 4, 1, 2, "node7", 29511)
    # deepspeed's launcher exports the same variables (and passes --local_rank, which the CLI ignores)
    assert detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == Launch("torchrun", 0, 2, 0, 2)


def test_torchrun_inside_a_slurm_job_is_still_torchrun():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "n1"}
    assert detect(env).launcher == "torchrun"


def test_srun_on_one_node_uses_loopback():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77"}
    assert detect(env) == Launch("slurm", 1, 4, 1, 4, "127.0.0.1", 20077)


def test_srun_on_many_nodes_takes_the_first_host_from_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[03-04]" ] && printf "gpu03\\ngpu04\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "12345"}
    assert detect(env) == Launch("slurm", 5, 8, 1, 4, "gpu03", 32345)
    assert detect(dict(env, MASTER_ADDR="head", MASTER_PORT="1234")).master_addr == "head"


def test_srun_without_scontrol_says_to_set_master_addr(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    with pytest.raises(BootstrapError, match="set MASTER_ADDR"):
        detect(env)


def test_cpu_ranks_use_gloo_and_the_flag_wins():
    launch = Launch("torchrun", 0, 2, 0, 2)
    if not torch.cuda.is_available():
        assert bootstrap.choose_backend("auto", launch) == "gloo"
        assert bootstrap.choose_device("auto", "gloo", launch) == torch.device("cpu")
    assert bootstrap.choose_backend("nccl", launch) == "nccl"
    with pytest.raises(BootstrapError, match="--backend gloo"):
        bootstrap.choose_device("cpu", "nccl", launch)


def test_nccl_asked_for_on_a_machine_without_enough_gpus_names_the_backend_not_a_device(monkeypatch):
    """--backend nccl with no --device: the fix is the backend (the device was only implied by it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BootstrapError, match=r"nccl backend needs a CUDA device per rank.*use --backend gloo"):
        bootstrap.choose_device("auto", "nccl", Launch("torchrun", 1, 2, 1, 2))
    with pytest.raises(BootstrapError, match=r"device cuda:1 does not exist here"):  # a device asked for by name
        bootstrap.choose_device("cuda", "nccl", Launch("torchrun", 1, 2, 1, 2))


def test_free_port_is_free_on_loopback():
    port = bootstrap.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_missing_peers_time_out_with_a_one_line_error(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME",
                 "NCCL_SOCKET_IFNAME"):  # joining exports these: restore them for the tests that follow
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    launch = Launch("torchrun", 0, 2, 0, 2, "127.0.0.1", bootstrap.free_port())
    with pytest.raises(BootstrapError, match=r"could not join 2 ranks .* within 2s") as info:
        bootstrap.init_process_group(launch, "gloo", timeout_s=2)
    assert "\n" not in str(info.value)


AGREE = """
import json, os, sys
from lp.distributed import bootstrap
launch = bootstrap.detect()
bootstrap.init_process_group(launch, "gloo", 30)
assert os.environ["GLOO_SOCKET_IFNAME"] in ("lo", "lo0")
mine = "model folder missing" if launch.rank == 1 else None
seen = [launch.launcher, launch.master_addr, bootstrap.first_error(mine, launch),
        bootstrap.broadcast_json({"items": [launch.rank, "é"]}, launch)]
open(f"{sys.argv[1]}/rank{launch.rank}.json", "w").write(json.dumps(seen))
bootstrap.shutdown()
"""


def seen_by_each_rank(folder) -> list:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_torchrun_ranks_agree_on_one_ranks_error(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert seen_by_each_rank(tmp_path) == [["torchrun", "localhost", "rank 1: model folder missing",
                                            {"items": [0, "é"]}]] * 2


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="no mpirun/mpiexec on PATH (pip install 'lp[mpi]')")
def test_mpirun_ranks_get_a_broadcast_loopback_port(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    out = subprocess.run([MPIRUN, "-np", "2", sys.executable, str(script), str(tmp_path)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert seen_by_each_rank(tmp_path) == [["mpi", "127.0.0.1", "rank 1: model folder missing",
                                            {"items": [0, "é"]}]] * 2


def start_worker_under_a_stand_in_launcher(tmp_path, then: str, worker_prelude: str = "") -> subprocess.Popen:
    """A stand-in for torchrun: starts one worker (launch/run.py, after `worker_prelude` when given) with torchrun's
    variables and minutes of work (it must not end by itself), writes the worker's pid to tmp_path/worker.pid,
    then runs `then` (Python)."""
    from test_cli import ROOT, RUN, clean_env, save_tiny_model
    model = save_tiny_model(tmp_path / "m")
    args = [str(RUN), "--model", str(model), "--max-new-tokens", "100000", "--window", "2"] + ["--prompt", "a"] * 200
    worker = args if not worker_prelude else [
        "-c", f"{worker_prelude}\nimport runpy, sys\nsys.argv = {args!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"]
    return subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable] + {worker!r}, stdout=subprocess.DEVNULL,
                          stderr=open({str(tmp_path / 'err')!r}, "w"))
open({str(tmp_path / 'worker.pid')!r}, "w").write(str(worker.pid))
{then}
"""], cwd=ROOT, env=clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"))


def wait_until(ready, seconds: float, failure: str) -> None:
    import time
    deadline = time.time() + seconds
    while not ready():
        assert time.time() < deadline, failure
        time.sleep(0.2)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_a_rank_whose_launcher_was_killed_stops_by_itself(tmp_path):
    import signal
    launcher = start_worker_under_a_stand_in_launcher(tmp_path, "worker.wait()")
    pid_file, err = tmp_path / "worker.pid", tmp_path / "err"
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, "the worker did not start")
    worker = int(pid_file.read_text())
    # printed once the watch has begun (imports can take seconds)
    wait_until(lambda: "lp: loading" in err.read_text(), 60, "the worker never got going")
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    try:
        wait_until(lambda: gone(worker), 20, "the worker outlived its launcher by 20 s")
    finally:
        if not gone(worker):
            os.kill(worker, signal.SIGKILL)
    assert "the launcher" in err.read_text() and "died; stopping" in err.read_text()


def test_a_rank_whose_launcher_died_while_it_was_still_importing_stops_too(tmp_path):
    # the worker imports lp (which notes its launcher), says so, and goes on only once the stand-in is gone: as if
    # the launcher died while the worker was still importing torch
    imported = tmp_path / "imported"
    prelude = (f"import os, time, lp\nopen({str(imported)!r}, 'w').close()\n"
               "while os.getppid() == lp.STARTED_BY:\n    time.sleep(0.05)")
    launcher = start_worker_under_a_stand_in_launcher(
        tmp_path, f"while not os.path.exists({str(imported)!r}):\n    time.sleep(0.05)", prelude)
    assert launcher.wait(timeout=120) == 0
    worker = int((tmp_path / "worker.pid").read_text())
    try:  # imports, then the watch's first check
        wait_until(lambda: gone(worker), 90, "the worker kept running for 90 s after its launcher died")
    finally:
        if not gone(worker):
            os.kill(worker, 9)
    err = (tmp_path / "err").read_text()
    assert "died; stopping" in err and "lp: loading" not in err  # stopped before it loaded the model
