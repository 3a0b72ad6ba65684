"""One rank of a timed lookahead-parallel team: `python benchmarks/rank_worker.py SPEC.json OUT.json`.

Started P times by benchmarks/sweep.py with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (as torchrun does).
Every rank times its own runs; rank 0 keeps the tokens and prints one "tick" line per run for the progress bar.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loading import load_model  # noqa: E402
from benchmarks.timing import time_lookahead  # noqa: E402
from lp.config import LookaheadConfig  # noqa: E402
from lp.decoding import Decoder  # noqa: E402
from lp.distributed.parallel import ProcessGroupTeam  # noqa: E402
from lp.distributed.tensor_parallel import make_team, plan_groups, shard_model  # noqa: E402


def run_jobs(spec: dict) -> list[dict]:
    """Warm up each job, then time it on every prompt (one repeat, numbered spec["repeat"]); this rank's records."""
    rank = dist.get_rank()
    model, _ = load_model(spec["model"], getattr(torch, spec["dtype"]))
    plan = None
    if spec.get("tp", 1) > 1:  # replicas of tp ranks sharded with DeepSpeed AutoTP; lookahead between replicas
        plan = plan_groups(dist.get_world_size(), spec["tp"])
        model = shard_model(model, plan.tp_group, plan.tp)
    records = []
    for j, job in enumerate(spec["jobs"]):
        team = (make_team(job["kv_sync"], plan, spec["fault_timeout"]) if plan else
                ProcessGroupTeam(job["kv_sync"], fault_timeout_s=spec["fault_timeout"]))
        decoder = Decoder(model, LookaheadConfig(job["window"], job["ngram"], job["guess"]), team)
        first = spec["prompts"][0]["ids"]
        for _ in range(spec["warmup"]):
            dist.barrier()
            time_lookahead(decoder, first, spec["max_new_tokens"])
        for prompt in spec["prompts"]:
            dist.barrier()
            run = time_lookahead(decoder, prompt["ids"], spec["max_new_tokens"])
            records.append(dict(job=j, prompt=prompt["id"], repeat=spec["repeat"], rank=rank,
                                **run.record(keep_tokens=rank == 0)))
            if rank == 0:
                print("tick", flush=True)
        team.close()
    return records


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["fault_timeout"]))
    records = run_jobs(spec)
    Path(out_path).write_text(json.dumps(records))
    dist.barrier()  # every rank has written its records
    sys.stdout.flush()
    # skip interpreter teardown: gloo/store threads torn down while rank 0's store closes can abort a peer
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
