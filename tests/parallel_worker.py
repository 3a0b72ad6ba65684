"""One rank of a lookahead-parallel test run (optionally with tensor-parallel replicas): decode the cases of a
JSON spec, write what it got.

Started P times by tests/test_parallel.py with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (as torchrun does).
"""
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the lp of this checkout, installed or not
torch.set_num_threads(1)

import lp  # noqa: E402
from lp.batched_decoding import BatchedDecoder  # noqa: E402
from lp.fast_decoding import FastDecoder  # noqa: E402
from lp.distributed.parallel import DivergenceError, ProcessGroupTeam, RankFailure  # noqa: E402
from lp.distributed.tensor_parallel import make_team, plan_groups, shard_model  # noqa: E402
from models import stories, tiny_model  # noqa: E402


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mpi_comm = None
    if spec.get("mpi"):  # started by mpirun: ranks from MPI, the exchange through mpi4py's buffer collectives
        from mpi4py import MPI
        mpi_comm = MPI.COMM_WORLD
        os.environ.update(RANK=str(mpi_comm.Get_rank()), WORLD_SIZE=str(mpi_comm.Get_size()))
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.get("fault_timeout", 60)))
    rank = dist.get_rank()
    plan = plan_groups(dist.get_world_size(), spec["tp"]) if spec.get("tp", 1) > 1 else None
    results = []
    for case in spec["cases"]:
        if case["model"] == "stories":
            model, tokenizer = stories()
            prompt = tokenizer(case["prompt"]).input_ids
        else:
            model = tiny_model(case["model"], seed=case.get("seed", 0))
            model.generation_config.eos_token_id = case.get("eos")
            prompt = case.get("prompt")
        if plan:  # replicas of tp ranks sharded with DeepSpeed AutoTP, lookahead between replicas
            model = shard_model(model, plan.tp_group, plan.tp)
            team = make_team(case["kv_sync"], plan)
        else:
            team = ProcessGroupTeam(case["kv_sync"], fault_timeout_s=spec.get("fault_timeout", 60), mpi_comm=mpi_comm)
        seed = case.get("window_seed_per_rank", [0] * (rank + 1))[rank]
        config = lp.LookaheadConfig(*case["wng"], **{"seed": seed, **case.get("tree", {})})  # tree: lookup, budget, sampling
        steps = []

        def maybe_die(tokens):
            steps.append(tokens)
            if rank == spec.get("die_rank") and len(steps) == spec.get("die_step"):
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == spec.get("stop_rank") and len(steps) == spec.get("stop_step"):
                Path(out_path).with_name("stopped_at").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: a hung rank

        if case.get("batch"):  # batched lookahead: several prompts, B lanes, one forward a step
            decoder = BatchedDecoder(model, config, case["batch"], team, compile=case.get("fast") == "compiled")
            kv_sums = []  # a spy: how many KV all-reduces the batch steps make
            sum_kv = team.sum_kv
            team.sum_kv = lambda buffer: (kv_sums.append(buffer.shape), sum_kv(buffer))
            done = decoder.generate_many(case["prompts"], case["max_new"])
            results.append({"batch_tokens": [r.token_ids for r in done], "kv_sums": len(kv_sums),
                            "compile_error": decoder.compile_error,
                            "exchanges": len(team.comm.seconds),
                            "comm": [(r.comm_time_s, r.comm_bytes, r.steps) for r in done]})
            team.close()
            continue
        try:
            if case.get("fast"):  # the fixed-shape step, compiled or not
                decoder = FastDecoder(model, config, team, compile=case["fast"] == "compiled")
            else:
                decoder = lp.Decoder(model, config, team)
            if str(rank) in case.get("corpus_per_rank", {}):  # one rank's memory differs: a drifted team
                decoder.remember_corpus(case["corpus_per_rank"][str(rank)])
            if case.get("prompts"):  # one decoder, the prompts in turn (a job: its memory carries over)
                done = [decoder.generate(p, case["max_new"]) for p in case["prompts"]]
                results.append({"sequence_tokens": [r.token_ids for r in done], "steps": [r.steps for r in done]})
                team.close()
                continue
            result = decoder.generate(prompt, case["max_new"], on_tokens=maybe_die)
        except (RankFailure, DivergenceError) as failure:
            results.append({"failure": f"{type(failure).__name__}: {failure}", "failed_at": time.time()})
            break
        results.append({"tokens": result.token_ids, "steps": result.steps,
                        "fed": result.tokens_fed_per_step, "comm_bytes": result.comm_bytes,
                        "compile_error": getattr(decoder, "compile_error", None)})
        team.close()
    layout = plan and dict(lp=plan.lp, tp=plan.tp, replica=plan.replica, tp_rank=plan.tp_rank,
                           tp_group=dist.get_process_group_ranks(plan.tp_group),
                           lp_group=dist.get_process_group_ranks(plan.lp_group))
    Path(out_path.replace("{rank}", str(rank))).write_text(json.dumps({"plan": layout, "cases": results}))
    if any(r.get("failure", "").startswith("RankFailure") for r in results):
        os._exit(0)  # the group is broken: tearing it down can abort the exit
    dist.barrier()  # a clean exit: nobody leaves while a peer still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the command line does: no gloo teardown, which has aborted ranks under load


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
