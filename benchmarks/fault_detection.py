"""How long a job takes to name a hung rank: a 2-rank team under torchrun on a tiny model, one rank SIGSTOPped after
3 records; the time from the stop to rank 0's `lp: error:` line, and to torchrun's exit.

python benchmarks/fault_detection.py --fault-timeout 10 --out benchmarks/results_published/fault_detection
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from test_cli import save_tiny_model  # noqa: E402
from test_replicas import _rank_pid  # noqa: E402


def stop_one(victim: int, folder: Path, model: str, timeout: float) -> dict:
    """Start the team, SIGSTOP rank `victim` once 3 records are written; when did the error and the exit come."""
    source, output = folder / "in.jsonl", folder / f"out{victim}.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"{i}: ab ab ab"}) + "\n" for i in range(400)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "run.py"), "--model", model, "--dtype", "float64", "--input", str(source),
           "--output", str(output), "--max-new-tokens", "40", "--window", "4", "--ngram", "3", "--guess", "4",
           "--fault-timeout", str(timeout)]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid = _rank_pid(job, victim)
    while not output.exists() or output.read_text().count("\n") < 3:
        time.sleep(0.05)
    os.kill(pid, signal.SIGSTOP)
    stopped, error_s, line = time.time(), None, None
    for text in job.stderr:
        if "lp: error" in text and error_s is None:
            error_s, line = round(time.time() - stopped, 1), text[text.find("lp: error"):].strip()[:200]
    job.wait()
    exit_s = round(time.time() - stopped, 1)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    return dict(stopped_rank=victim, error_after_s=error_s, torchrun_exit_after_s=exit_s, message=line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault-timeout", type=float, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fault_detection"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = str(save_tiny_model(Path(folder) / "tiny"))
        rows = [stop_one(victim, Path(folder), model, args.fault_timeout) for victim in (1, 0)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(fault_timeout_s=args.fault_timeout, rows=rows,
                                                        date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                                                   indent=1))
    lines = [f"2 ranks under torchrun, --fault-timeout {args.fault_timeout:g}, one rank SIGSTOPped after 3 records", "",
             "| stopped rank | error after (s) | torchrun exits after (s) | message |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['stopped_rank']} | {r['error_after_s']} | {r['torchrun_exit_after_s']} | {r['message']} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
