"""One rank of a lookahead x tensor-parallel test run: shard, decode the cases of a JSON spec, write what it got.

Started P_lp * P_tp times by tests/test_tensor_parallel.py with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set.
"""
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the lp of this checkout, installed or not
torch.set_num_threads(1)

import lp  # noqa: E402
from lp.tensor_parallel import make_team, plan_groups, shard_model  # noqa: E402
from models import stories, tiny_model  # noqa: E402


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    plan = plan_groups(dist.get_world_size(), spec["tp"])
    report = {"plan": {"lp": plan.lp, "tp": plan.tp, "replica": plan.replica, "tp_rank": plan.tp_rank,
                       "tp_group": dist.get_process_group_ranks(plan.tp_group),
                       "lp_group": dist.get_process_group_ranks(plan.lp_group)}, "cases": []}
    for case in spec["cases"]:
        if case["model"] == "stories":
            model, tokenizer = stories()
            prompt = tokenizer(case["prompt"]).input_ids
        else:
            model = tiny_model(case["model"], seed=case.get("seed", 0))
            prompt = case["prompt"]
        model = shard_model(model, plan.tp_group, plan.tp)
        team = make_team(case["kv_sync"], plan)
        result = lp.Decoder(model, lp.LookaheadConfig(*case["wng"]), team).generate(prompt, case["max_new"])
        report["cases"].append({"tokens": result.token_ids, "steps": result.steps, "comm_bytes": result.comm_bytes})
        team.close()
    Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
