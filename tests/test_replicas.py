"""Replicas: the world splits into replicas x lp x tp ranks; independent teams drain one queue of prompts, every id
lands in the one --output exactly once with the tokens a one-rank run gives, and a job killed mid-way resumes."""
import importlib.util
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from lp.cli import batch
from lp.distributed.bootstrap import free_port
from lp.distributed.replicas import Layout, LayoutError, WorkQueue, split_world
from test_cli import RUN, ROOT, base_args, clean_env, json_lines, run, tiny_dir  # noqa: F401 (fixture)


# -- the layout -----------------------------------------------------------------------------------------------

def test_the_world_splits_into_replicas_of_lp_by_tp_ranks():
    assert split_world(4) == Layout(1, 4, 1)  # one team of every rank, as before replicas existed
    assert split_world(4, lp=1) == Layout(4, 1, 1)  # torchrun --nproc_per_node 4 ... --lp 1: 4 teams of 1
    assert split_world(8, tp=2, replicas=2) == Layout(2, 2, 2)
    assert split_world(8, tp=2, lp=1) == Layout(4, 1, 2)
    assert split_world(6, lp=3, replicas=2) == Layout(2, 3, 1)
    layout = Layout(2, 2, 2)
    assert [layout.replica_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.ranks_of(1) == [4, 5, 6, 7]


@pytest.mark.parametrize("world,kwargs,message", [
    (6, dict(tp=4), "world size 6 is not divisible by tp=4"),
    (4, dict(tp=2, lp=3), "lp=3 x tp=2 = 6 ranks, but the world has 4"),
    (6, dict(lp=4), "lp=4 x tp=1 = 4 ranks a team does not divide the world of 6 ranks: launch a multiple of 4"),
    (6, dict(replicas=4), "replicas=4 x tp=1 does not divide the world of 6 ranks"),
    (8, dict(lp=2, replicas=2), "replicas=2 x lp=2 x tp=1 = 4 ranks, but the world has 8"),
    (4, dict(replicas=0), "replicas must be a positive integer, got 0"),
])
def test_a_layout_that_does_not_fit_the_world_says_what_to_launch(world, kwargs, message):
    with pytest.raises(LayoutError, match=message):
        split_world(world, **kwargs)


# -- the queue ------------------------------------------------------------------------------------------------

def test_replicas_claim_every_index_exactly_once_in_claim_order():
    store = dist.HashStore()
    layout = Layout(3, 1, 1)
    queues = [WorkQueue(10, layout, rank, store=store) for rank in range(3)]
    got = {r: [] for r in range(3)}
    order = [0, 0, 2, 1, 0, 2, 2, 2, 1, 0, 1, 1, 0]  # replicas ask at their own pace
    for r in order:
        index = queues[r].claim()
        if index is not None:
            got[r].append(index)
    assert sorted(i for claims in got.values() for i in claims) == list(range(10))
    assert got[0][:2] == [0, 1] and got[2][0] == 2  # first come, first served
    assert all(q.claim() is None for q in queues)


def test_without_a_store_replicas_take_interleaved_indices():
    queues = [WorkQueue(7, Layout(2, 1, 1), rank) for rank in range(2)]
    assert [queues[0].claim() for _ in range(5)] == [0, 2, 4, 6, None]
    assert [queues[1].claim() for _ in range(4)] == [1, 3, 5, None]


# -- shard files ----------------------------------------------------------------------------------------------

def test_shards_merge_into_the_output_once_even_after_a_merge_was_cut_short(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_bytes(b'{"id": 1, "text": "a"}\n{"id": 2, "te')  # a writer killed mid-line
    batch.shard_path(output, 1).write_bytes(b'{"id": 3, "text": "c"}\n{"id": 4, "text": "d"}\n{"id": 5, "t')
    batch.shard_path(output, 2).write_bytes(b'{"id": 6, "error": "bad"}\n')
    # as if an earlier merge had copied id 3 and died before deleting shard 1
    with open(output, "r+b") as f:
        f.truncate(len(b'{"id": 1, "text": "a"}\n'))
        f.seek(0, 2)
        f.write(b'{"id": 3, "text": "c"}\n')
    assert batch.merge_shards(output) == 2
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == [1, 3, 4, 6]
    assert not list(tmp_path.glob("*.part"))
    assert batch.merge_shards(output) == 0


# -- whole jobs under torchrun --------------------------------------------------------------------------------

def _records(tmp_path: Path, count: int) -> str:
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": f"{i}: abcab", "max_new_tokens": 4 + (i * 7) % 17})
             for i in range(count)]
    path.write_text("\n".join(lines + [json.dumps({"id": "bad", "prompt": ""})]) + "\n")
    return str(path)


def _by_id(path: Path) -> dict:
    return {r["id"]: r.get("token_ids", r.get("error")) for r in json_lines(path.read_text())}


@pytest.fixture(scope="module")
def one_rank_run(tiny_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("one_rank")
    source, output = _records(tmp, 120), tmp / "out.jsonl"
    out = run([sys.executable, RUN, *base_args(tiny_dir, "--input", source, "--output", output)], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return source, _by_id(output)


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
@pytest.mark.parametrize("procs,flags", [(2, ["--lp", "1"]), (2, ["--replicas", "2", "--batch-size", "3"]),
                                         (4, ["--lp", "2", "--batch-size", "2"]), (4, ["--tp", "2", "--lp", "1"])],
                         ids=["2x1", "2x1-batch3", "2x2-batch2", "2x1xtp2"])
def test_replicas_write_every_id_once_with_the_one_rank_tokens(tiny_dir, one_rank_run, tmp_path, procs, flags):  # noqa: F811
    if "--tp" in flags and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (pip install 'lp[deepspeed]'): replicas of tp-sharded copies untested")
    source, expected = one_rank_run
    output = tmp_path / "out.jsonl"
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", procs, RUN,
               *base_args(tiny_dir, "--input", source, "--output", output, *flags)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = json_lines(output.read_text())
    assert len(lines) == len(expected) and _by_id(output) == expected  # each id once, same tokens
    assert not list(tmp_path.glob("*.part"))  # the shards were merged
    summary = json.loads([line for line in out.stderr.splitlines() if line.startswith('{"summary"')][-1])["summary"]
    assert summary["records"] == len(expected) and summary["errors"] == 1 and summary["replicas"] == 2


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of the worker torchrun started with RANK=rank."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if parent == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher.pid}")


@pytest.mark.slow
def test_a_replica_killed_mid_job_stops_the_job_and_the_rerun_loses_and_repeats_nothing(tiny_dir, one_rank_run,  # noqa: F811
                                                                                          tmp_path):
    source, expected = one_rank_run
    output = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUN),
           *base_args(tiny_dir, "--input", source, "--output", str(output), "--lp", "1", "--max-new-tokens", "12")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    victim = _rank_pid(job, 1)
    shard = batch.shard_path(output, 1)
    deadline = time.time() + 240
    while time.time() < deadline and (not shard.exists() or shard.read_text().count("\n") < 3):
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    job.wait(timeout=120)
    assert job.returncode != 0  # the job stopped, and torchrun's report names the killed rank as the root cause
    err = job.stderr.read()
    assert re.search(r"rank\s*:\s*1 \(local_rank", err)
    # and rank 0, which torchrun stops, says why instead of a bare "interrupted"
    assert "lp: error: interrupted by the launcher after rank 1 stopped responding (dead or hung)" in err, err[-3000:]
    written = (output.read_text() if output.exists() else "") + shard.read_text()
    assert 3 <= written.count("\n") < len(expected), "the kill must land mid-job"

    rerun = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = [r["id"] for r in json_lines(output.read_text())]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))  # nothing lost, nothing twice
    assert _by_id(output) == expected


@pytest.mark.slow
def test_a_team_rank_killed_under_torchrun_is_named_by_rank_0(tiny_dir, tmp_path):  # noqa: F811
    # one team of 2 ranks: torchrun stops rank 0 before its next collective fails, and it said only "interrupted"
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"{i}: ab ab"}) + "\n" for i in range(200)))
    output = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUN),
           *base_args(tiny_dir, "--input", source, "--output", str(output), "--fault-timeout", "10")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    victim = _rank_pid(job, 1)
    deadline = time.time() + 240
    while time.time() < deadline and _lines(output) < 3:
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "lp: error: interrupted by the launcher after rank 1 stopped responding (dead or hung)" in err, err[-3000:]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _stop_replica_1_mid_job(tiny_dir: str, tmp_path: Path, records: int, *flags: str):
    """Start 2 replicas of 1 rank on `records` records and SIGSTOP replica 1 once its shard holds 2 lines: the job,
    its command, the output, the shard and the stopped pid."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{i}: ab"}) + "\n" for i in range(records)))
    output = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUN),
           *base_args(tiny_dir, "--input", str(source), "--output", str(output), "--lp", "1", *flags)]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    replica = _rank_pid(job, 1)
    shard = batch.shard_path(output, 1)
    deadline = time.time() + 240
    while time.time() < deadline and _lines(shard) < 2:
        time.sleep(0.01)
    os.kill(replica, signal.SIGSTOP)
    return job, cmd, output, shard, replica


@pytest.mark.slow
def test_a_replica_job_holds_its_outputs_lock_until_every_replica_is_merged(tiny_dir, tmp_path):  # noqa: F811
    job, _, output, shard, replica = _stop_replica_1_mid_job(tiny_dir, tmp_path, 30)
    deadline = time.time() + 240  # replica 1 holds its claimed record; rank 0 decodes all the others
    try:
        while time.time() < deadline and _lines(output) + _lines(shard) < 29:
            time.sleep(0.05)
        assert _lines(output) + _lines(shard) >= 29, "rank 0 must have run out of records"
        for _ in range(50):  # rank 0 now waits for replica 1: a second job must still be refused
            with pytest.raises(batch.InputError, match="another lp job"):
                batch.JsonlWriter(output)
            time.sleep(0.1)
    finally:
        os.kill(replica, signal.SIGCONT)
    _, err = job.communicate(timeout=240)
    assert job.returncode == 0, err[-2000:]
    ids = [r["id"] for r in json_lines(output.read_text())]
    assert sorted(ids) == sorted(f"r{i}" for i in range(30))  # each once
    assert not shard.exists() and not (tmp_path / "out.jsonl.lock").exists()


@pytest.mark.slow
def test_a_replica_lost_while_rank_0_waits_at_the_end_is_named_by_rank_0(tiny_dir, tmp_path):  # noqa: F811
    # rank 0, stopped by torchrun in its end-of-job wait, said only "interrupted" (issue 27 item 10)
    job, cmd, output, shard, replica = _stop_replica_1_mid_job(tiny_dir, tmp_path, 30)
    deadline = time.time() + 240  # replica 1 holds its claimed record; rank 0 decodes all the others, then waits
    while time.time() < deadline and _lines(output) + _lines(shard) < 29:
        time.sleep(0.05)
    os.kill(replica, signal.SIGKILL)  # torchrun sees it die and stops rank 0 where it waits
    _, err = job.communicate(timeout=240)
    assert job.returncode != 0
    assert "lp: error: interrupted by the launcher after rank 1 stopped responding (dead or hung)" in err, err[-3000:]
    rerun = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(r["id"] for r in json_lines(output.read_text())) == sorted(f"r{i}" for i in range(30))


@pytest.mark.slow
def test_replicas_writing_to_a_pipe_deliver_every_record_through_rank_0(tiny_dir, tmp_path):  # noqa: F811
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"{i}: ab"}) + "\n" for i in range(8)))
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               *base_args(tiny_dir, "--input", source, "--output", "/dev/stdout", "--lp", "1")], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(r["id"] for r in json_lines(out.stdout)) == list(range(8))  # the pipe got all 8, once each
    assert not os.path.exists("/dev/stdout.replica-1.part")  # no shard beside a pipe
    assert "lp: 8 of 8 prompts" in out.stderr


@pytest.mark.slow
def test_a_stopped_replica_is_named_within_the_fault_timeout_and_the_rerun_finishes_the_job(tiny_dir, tmp_path):  # noqa: F811
    # alive but silent: it used to keep rank 0 waiting for ever
    job, cmd, output, _, replica = _stop_replica_1_mid_job(tiny_dir, tmp_path, 20, "--fault-timeout", "6")
    rank0 = Path(f"/proc/{_rank_pid(job, 0)}")
    deadline = time.time() + 120
    while rank0.exists() and time.time() < deadline:  # rank 0 gives up on rank 1 and leaves
        time.sleep(0.1)
    try:
        os.kill(replica, signal.SIGCONT)  # so torchrun's SIGTERM ends it now, not its SIGKILL 30 s later
    except ProcessLookupError:
        pass
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "rank 1 stopped responding (dead or hung)" in err
    rerun = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = [r["id"] for r in json_lines(output.read_text())]
    assert sorted(ids) == sorted(f"r{i}" for i in range(20))  # nothing lost, nothing twice


@pytest.mark.slow
def test_a_full_disk_on_replica_1_is_named_with_its_cause_and_leaves_no_half_record(tiny_dir, tmp_path):  # noqa: F811
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{i}: ab"}) + "\n" for i in range(200)))
    output = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUN),
           *base_args(tiny_dir, "--input", str(source), "--output", str(output), "--lp", "1")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    resource.prlimit(_rank_pid(job, 1), resource.RLIMIT_FSIZE, (150, 150))  # its disk fills up mid-record
    _, err = job.communicate(timeout=240)
    assert job.returncode != 0
    assert re.search(r"lp: error: rank 1: cannot write --output '.*replica-1\.part'", err)  # its own line
    # rank 0, which torchrun stops, says who failed and why instead of a bare "interrupted"
    assert re.search(r"lp: error: .*rank 1 failed: cannot write --output '.*replica-1\.part': File too large", err)
    shard = batch.shard_path(output, 1)
    assert shard.exists() and shard.read_text() == ""  # the half-written record was cut off
    assert output.read_text().endswith("\n")

    rerun = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = [r["id"] for r in json_lines(output.read_text())]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200))  # each once


@pytest.mark.slow
def test_a_rank_that_loses_rank_0s_store_says_so_in_one_line(tiny_dir, tmp_path):  # noqa: F811
    """Launched without torchrun (as mpirun and srun do), rank 0 hosts the store: when it is killed, the other
    replica stops with one line naming rank 0, not a traceback."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{i}: ab"}) + "\n" for i in range(200)))
    output = tmp_path / "out.jsonl"
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    cmd = [sys.executable, str(RUN), *base_args(tiny_dir, "--input", str(source), "--output", str(output), "--lp", "1")]
    ranks = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    shard = batch.shard_path(output, 1)
    deadline = time.time() + 240
    while time.time() < deadline and _lines(shard) < 2:
        time.sleep(0.01)
    ranks[0].kill()
    _, err = ranks[1].communicate(timeout=120)
    ranks[0].wait()
    assert ranks[1].returncode == 1
    assert "Traceback" not in err
    assert re.search(r"lp: error: rank 1: lost contact with the other ranks .*rank 0 ended or failed", err), err[-2000:]
