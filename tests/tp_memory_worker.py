"""One rank of a tensor-parallel loading run: load each saved model as `lp` does, decode, report peak host memory.

Started by tests/test_tensor_parallel.py with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (as torchrun does).
Spec: {"tp": 1 or world, "cases": [{"folder", "dtype", "prompt", "wng", "max_new", "whole"?}]}. With tp > 1 each model is
built on the meta device and only this rank's shards are read (lp.distributed.tensor_parallel.empty_model);
with tp = 1 it is loaded whole, as `lp --tp 1` does. Peak RSS is the kernel's high-water mark (VmHWM).
"""
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lp of this checkout, installed or not
torch.set_num_threads(1)

import lp  # noqa: E402
from lp.distributed.tensor_parallel import empty_model, make_team, plan_groups, shard_model  # noqa: E402


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, tp = dist.get_rank(), spec["tp"]
    plan = plan_groups(dist.get_world_size(), tp) if tp > 1 else None
    results = []
    for case in spec["cases"]:
        dtype = getattr(torch, case["dtype"])
        if plan and case.get("whole"):  # loaded whole first, then sharded (what every rank did before)
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(case["folder"], dtype=dtype).eval()
            model = shard_model(model, plan.tp_group, plan.tp)
            team = make_team("gather", plan)
        elif plan:
            model = shard_model(empty_model(case["folder"], dtype), plan.tp_group, plan.tp)
            team = make_team("gather", plan)
        else:
            from transformers import AutoModelForCausalLM
            model, team = AutoModelForCausalLM.from_pretrained(case["folder"], dtype=dtype).eval(), None
        loaded_mb = peak_rss_mb()
        kinds = sorted({p.device.type for p in model.parameters()})
        result = lp.Decoder(model, lp.LookaheadConfig(*case["wng"]), team).generate(case["prompt"], case["max_new"])
        results.append({"tokens": result.token_ids, "loaded_mb": loaded_mb, "devices": kinds,
                        "params": sum(p.numel() for p in model.parameters())})
        if team is not None:
            team.close()
        del model
    out = {"cases": results, "peak_mb": peak_rss_mb()}
    Path(out_path.replace("{rank}", str(rank))).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
