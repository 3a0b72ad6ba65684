"""Issue 27's fault cases, run again: kills and resumes, stopped ranks, lock races, odd outputs, odd values, bad
records and bad flags, each against launch/run.py on a tiny saved model, each checked automatically.

    python tools/fault_probe.py --out benchmarks/results/fault_probe.json          # every family, ~22 min on 2 CPUs
    python tools/fault_probe.py --only kill,flags                                 # a subset

A case passes when nothing is lost or duplicated (every id exactly once, whole lines, the tokens of an uninterrupted
one-process run), no wait outlasts its bound (the fault timeout plus SLACK seconds; torchrun's own 30 s grace for a
worker that ignores SIGTERM is allowed on top where a stopped rank must be reaped), and no traceback comes from the
project's frames (lp/ or launch/); a traceback from outside lp (torchrun's own report) is noted, not failed. Every
case runs under a hard alarm and its processes (found by a marker in their environment) are killed at its end.
Families: kill (SIGKILL and resume), items (issue items 1-9), more (items 10-14), records (bad and odd records),
flags (bad flags: one `lp: error:` line, exit 2).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "launch" / "run.py"
FAMILIES = ("kill", "items", "more", "records", "flags")
FAULT = 10.0  # --fault-timeout of the cases that measure detection
SLACK = 5.0  # "the fault timeout plus a few seconds"
TORCHRUN_GRACE = 30.0  # torchrun waits this long before it SIGKILLs a worker that ignores its SIGTERM (a stopped one)
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
PROJECT_DIRS = (str(REPO / "lp") + os.sep, str(REPO / "launch") + os.sep)


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


# -- processes ----------------------------------------------------------------------------------------------------

def _environ(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def tagged(tag: str) -> list[int]:
    """Live processes this probe started for one case (they carry LP_PROBE_TAG=tag in their environment)."""
    marker, pids = f"LP_PROBE_TAG={tag}".encode(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            env = _environ(int(name))
            if env and marker in env:
                try:
                    if Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(name))
                except OSError:
                    pass
    return pids


def rank_pid(tag: str, rank: int, timeout: float = 90) -> int:
    """The pid of the lp process of global rank `rank` under torchrun (RANK) or mpirun (PMI_RANK)."""
    wanted = {f"RANK={rank}".encode(), f"PMI_RANK={rank}".encode()}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in tagged(tag):
            env = _environ(pid) or []
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if wanted & set(env) and b"run.py" in cmdline and b"torch.distributed.run" not in cmdline:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process appeared within {timeout:g} s")


def reap(tag: str) -> int:
    """SIGCONT then SIGKILL every process of a case; returns how many were still alive."""
    pids = tagged(tag)
    for sig in (signal.SIGCONT, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    deadline = time.time() + 10
    while tagged(tag) and time.time() < deadline:
        time.sleep(0.1)
    return len(pids)


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- what came out ------------------------------------------------------------------------------------------------

def tracebacks(text: str) -> tuple[list[str], list[str]]:
    """(project, other): a one-line summary of each traceback in `text`, split by whether a frame is in lp/ or
    launch/."""
    project, other = [], []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        files, last = [], ""
        for nxt in lines[i + 1:i + 400]:
            body = re.sub(r"^\[(default)?rank\d+\]:", "", nxt)
            found = re.search(r'File "([^"]+)", line \d+', body)
            if found:
                files.append(os.path.realpath(found.group(1)))
            elif body and not body[0].isspace():
                last = body.strip()
                break
        mine = [f for f in files if f.startswith(PROJECT_DIRS)]
        where = (os.path.relpath(mine[-1], REPO) if mine else (files[-1] if files else "?"))
        (project if mine else other).append(f"{last[:160]} (last frame {where})")
    return project, other


def bare_interrupt(errors: list[str]) -> list[str]:
    """Issue 27 item 10: when a rank failed, rank 0's 'interrupted' line must say which and why."""
    bare = [e for e in errors if e.strip().startswith("lp: error: interrupted;")]
    return ["SILENT: rank 0 says only 'interrupted', not which rank failed"] if bare else []


def error_lines(text: str) -> list[str]:
    return [line[line.find("lp: error"):] for line in text.splitlines() if "lp: error" in line]


def key(record_id) -> str:
    return json.dumps(record_id)


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a results file and its problems (a partial last line, a line that is not JSON)."""
    problems, records = [], []
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        partial = len(data) - data.rfind(b"\n") - 1
        problems.append(f"{path.name} ends with a partial line ({partial} bytes)")
    for n, line in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if data.endswith(b"\n") or n < data.count(b"\n") + 1:
                problems.append(f"{path.name} line {n} is not a JSON record: {line[:80]!r}")
    return records, problems


def check_records(records: list[dict], ids: list, reference: dict | None = None, errors: frozenset = frozenset()
                  ) -> list[str]:
    """Problems: a missing id, an id twice, an unknown id, an error record where a result was due, other tokens."""
    problems, seen = [], {}
    for r in records:
        if "summary" in r:
            problems.append("a summary line among the records")
            continue
        seen.setdefault(key(r.get("id")), []).append(r)
    want = {key(i) for i in ids}
    missing = [k for k in want if k not in seen]
    twice = [k for k, rs in seen.items() if len(rs) > 1]
    extra = [k for k in seen if k not in want]
    if missing:
        problems.append(f"LOSS: {len(missing)} of {len(want)} ids missing ({', '.join(sorted(missing)[:5])})")
    if twice:
        problems.append(f"DUPLICATE: {len(twice)} ids written more than once ({', '.join(sorted(twice)[:5])})")
    if extra:
        problems.append(f"{len(extra)} ids that are not in the input ({', '.join(sorted(extra)[:5])})")
    wrong = []
    for k, rs in seen.items():
        r = rs[-1]
        if k in errors:
            continue
        if "error" in r:
            wrong.append(f"{k}: error {r['error'][:80]!r}")
        elif reference is not None and k in reference and r.get("token_ids") != reference[k]:
            wrong.append(f"{k}: tokens differ from the uninterrupted run")
    if wrong:
        problems.append(f"{len(wrong)} records wrong: {'; '.join(wrong[:3])}")
    return problems


def leftovers(output: Path) -> list[str]:
    """Shards or a lock note a finished job left beside its output."""
    found = sorted(output.parent.glob(output.name + ".replica-*.part"))
    note = output.with_name(output.name + ".lock")
    return [f"left {p.name}" for p in found] + ([f"left {note.name}"] if note.exists() else [])


def line_count(output: Path) -> int:
    """Lines in the output and in its replica shards."""
    total = 0
    for p in [output, *output.parent.glob(output.name + ".replica-*.part")]:
        try:
            total += p.read_bytes().count(b"\n")
        except OSError:
            pass
    return total


def partial_lines(output: Path) -> list[str]:
    """A partial last line in the output or in one of its shards (a write cut short)."""
    parts = [output, *output.parent.glob(output.name + ".replica-*.part")]
    return [p for part in parts for p in read_jsonl(part)[1] if "partial" in p]


def wait_lines(job: "Job", output: Path, count: int) -> None:
    """Until the output and its shards hold `count` lines (or the job ended)."""
    while line_count(output) < count and job.proc.poll() is None:
        time.sleep(0.02)


# -- the probe ----------------------------------------------------------------------------------------------------

class Job:
    def __init__(self, proc: subprocess.Popen, tag: str, folder: Path, started: float):
        self.proc, self.tag, self.folder, self.started = proc, tag, folder, started

    @property
    def err(self) -> str:
        return (self.folder / "stderr.txt").read_text(errors="replace")

    @property
    def out(self) -> str:
        path = self.folder / "stdout.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            return None

    def wait_error(self, timeout: float) -> float | None:
        """Seconds from now until an `lp: error` line appears (None if the job ends first or time runs out)."""
        start = time.time()
        while time.time() - start < timeout:
            if "lp: error" in self.err:
                return time.time() - start
            if self.proc.poll() is not None:
                return (time.time() - start) if "lp: error" in self.err else None
            time.sleep(0.05)
        return None


class Probe:
    def __init__(self, folder: Path):
        sys.path.insert(0, str(REPO / "tests"))
        sys.path.insert(0, str(REPO))
        from test_cli import save_tiny_model

        self.folder = folder
        self.model = str(save_tiny_model(folder / "tiny"))
        self.run_id = uuid.uuid4().hex[:8]
        self.n = 0
        self.results: list[dict] = []
        self.references: dict = {}
        drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE")
        self.env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
        self.env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        LP_CACHE_DIR=str(folder / "lp-cache"), TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"))
        self.inputs = folder / "inputs"
        self.inputs.mkdir()

    # commands
    def lp(self, *args) -> list[str]:
        return [sys.executable, str(RUN), "--model", self.model, "--dtype", "float64", *map(str, args)]

    def torchrun(self, *args) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUN),
                "--model", self.model, "--dtype", "float64", *map(str, args)]

    def mpirun(self, *args) -> list[str]:
        return [MPIRUN, "-np", "2", sys.executable, str(RUN), "--model", self.model, "--dtype", "float64",
                *map(str, args)]

    def command(self, kind: str, *args) -> list[str]:
        return {"single": self.lp, "torchrun": self.torchrun, "mpirun": self.mpirun}[kind](*args)

    def start(self, cmd, case_dir: Path, stdout=None, shell: bool = False, env: dict | None = None) -> Job:
        """Start a command in its own session with this case's marker; stdout and stderr go to files."""
        self.n += 1
        tag = f"{self.run_id}-{self.n}"
        folder = case_dir / f"run{self.n}"
        folder.mkdir(parents=True)
        environ = dict(self.env if env is None else env, LP_PROBE_TAG=tag)
        out = open(stdout if stdout is not None else folder / "stdout.txt", "wb")
        err = open(folder / "stderr.txt", "wb")
        if shell:
            (folder / "command.txt").write_text(cmd)
        else:
            (folder / "command.txt").write_text(" ".join(map(str, cmd)))
        proc = subprocess.Popen(cmd if shell else [str(c) for c in cmd], shell=shell, cwd=REPO, env=environ,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                executable="/bin/bash" if shell else None)
        out.close()
        err.close()
        return Job(proc, tag, folder, time.time())

    def run(self, cmd, case_dir: Path, timeout: float = 180, **kw) -> tuple[int | None, Job, float]:
        """Run to its end (None: killed at `timeout`); (exit status, job, seconds)."""
        job = self.start(cmd, case_dir, **kw)
        rc = job.wait(timeout)
        seconds = time.time() - job.started
        reap(job.tag)
        return rc, job, seconds

    def input_file(self, name: str, records: list[dict] | None = None, text: str | bytes | None = None) -> Path:
        path = self.inputs / name
        if records is not None:
            text = "".join(json.dumps(r) + "\n" for r in records)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def reference(self, source: Path, max_new_tokens: int) -> dict:
        """id -> token ids of an uninterrupted one-process run of `source`."""
        cache = (str(source), max_new_tokens)
        if cache not in self.references:
            out = self.folder / f"reference-{source.stem}-{max_new_tokens}.jsonl"
            rc, job, _ = self.run(self.lp("--input", source, "--output", out, "--max-new-tokens", max_new_tokens),
                                  self.folder / "references", timeout=300)
            if rc != 0:
                raise AssertionError(f"the reference run of {source.name} exited {rc}: {error_lines(job.err)[:1]}")
            records, _ = read_jsonl(out)
            self.references[cache] = {key(r["id"]): r["token_ids"] for r in records if "token_ids" in r}
        return self.references[cache]

    # bookkeeping
    def case(self, family: str, name: str, fn, limit: float, *args) -> None:
        """Run one case (or a group that reports several) under a hard alarm; record what it found."""
        case_dir = self.folder / family / name
        case_dir.mkdir(parents=True)
        start = time.time()
        before = self.n
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(limit))
        try:
            out = fn(case_dir, *args)
        except CaseTimeout:
            out = dict(ok=False, reason=f"HANG: the case ran past its hard limit of {limit:g} s")
        except Exception as exc:  # noqa: BLE001 - a probe failure is a result too
            out = dict(ok=False, reason=f"probe error: {type(exc).__name__}: {exc}"[:300])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            for n in range(before + 1, self.n + 1):
                reap(f"{self.run_id}-{n}")
        rows = out if isinstance(out, list) else [dict(out, name=name)]
        seconds = round(time.time() - start, 1)
        for row in rows:
            row = dict(family=family, **row)
            row.setdefault("seconds", seconds if len(rows) == 1 else None)
            row["ok"] = bool(row["ok"])
            row.setdefault("reason", "")
            self.results.append(row)
            print(f"{family:8s} {row['name']:38s} {'pass' if row['ok'] else 'FAIL'}  {row['seconds'] or '':>6}  "
                  f"{row['reason'][:150]}", flush=True)


def verdict(problems: list[str], details: dict | None = None, notes: list[str] | None = None) -> dict:
    out = dict(ok=not problems, reason="; ".join(problems) if problems else "; ".join(notes or []))
    if details:
        out["details"] = details
    return out


def traceback_problems(text: str, notes: list[str] | None = None) -> list[str]:
    project, other = tracebacks(text)
    if notes is not None and other:
        notes.append(f"traceback from outside lp: {other[0]}")
    return [f"TRACEBACK from lp: {project[0]}"] if project else []


# -- the cases ----------------------------------------------------------------------------------------------------

def rerun_completes(probe: "Probe", cmd, case_dir: Path, output: Path, ids: list, reference: dict,
                    notes: list[str], details: dict | None = None) -> list[str]:
    """Run the same command again: it must exit 0 and leave every id exactly once, in whole lines, with the tokens
    of an uninterrupted run, and no shard or lock note behind."""
    rc, rerun, seconds = probe.run(cmd, case_dir, timeout=240)
    if details is not None:
        details["rerun_s"] = round(seconds, 1)
    problems = [] if rc == 0 else [f"the rerun exited {rc}: {error_lines(rerun.err)[:1]}"]
    problems += traceback_problems(rerun.err, notes)
    records, bad = read_jsonl(output)
    return problems + bad + check_records(records, ids, reference) + leftovers(output)


def records_input(probe: Probe, name: str, count: int, prefix: str = "r") -> tuple[Path, list[str]]:
    ids = [f"{prefix}{i}" for i in range(count)]
    words = ["ab", "cd", "def", "x y", "lorem", "12", "zz top", "(a)"]
    records = [{"id": i, "prompt": f"{n}: {words[n % len(words)]} {words[(3 * n) % len(words)]} ab ab"}
               for n, i in enumerate(ids)]
    return probe.input_file(name, records), ids


KILLS = [  # name, launcher, extra flags, victim ("launcher" or a rank), kill after this many lines (None: 1.5 s in)
    ("single_during_load", "single", [], "launcher", None),
    ("single_after_2", "single", [], "launcher", 2),
    ("single_after_30", "single", [], "launcher", 30),
    ("single_batch2_after_2", "single", ["--batch-size", "2"], "launcher", 2),
    ("single_batch2_after_30", "single", ["--batch-size", "2"], "launcher", 30),
    ("replicas_torchrun_after_2", "torchrun", ["--lp", "1"], "launcher", 2),
    ("replicas_torchrun_after_30", "torchrun", ["--lp", "1"], "launcher", 30),
    ("replicas_rank1_after_10", "torchrun", ["--lp", "1"], 1, 10),
    ("replicas_rank0_after_10", "torchrun", ["--lp", "1"], 0, 10),
    ("replicas_batch2_rank1_after_10", "torchrun", ["--lp", "1", "--batch-size", "2"], 1, 10),
    ("replicas_batch2_torchrun_after_10", "torchrun", ["--lp", "1", "--batch-size", "2"], "launcher", 10),
    ("team_torchrun_after_5", "torchrun", [], "launcher", 5),
    ("team_rank1_after_5", "torchrun", [], 1, 5),
    ("team_rank0_after_5", "torchrun", [], 0, 5),
    ("mpirun_replicas_mpirun_after_10", "mpirun", ["--lp", "1"], "launcher", 10),
    ("mpirun_replicas_rank1_after_10", "mpirun", ["--lp", "1"], 1, 10),
    ("mpirun_team_mpirun_after_5", "mpirun", [], "launcher", 5),
    ("mpirun_team_rank0_after_5", "mpirun", [], 0, 5),
    ("mpirun_team_batch2_rank1_after_5", "mpirun", ["--batch-size", "2"], 1, 5),
]
KILL_RECORDS, KILL_TOKENS = 60, 32


def kill_and_resume(probe: Probe, case_dir: Path, kind: str, extra: list, victim, after: int | None) -> dict:
    source, ids = probe.kill_source
    reference = probe.reference(source, KILL_TOKENS)
    output = case_dir / "out.jsonl"
    cmd = probe.command(kind, "--input", source, "--output", output, "--max-new-tokens", KILL_TOKENS,
                        "--fault-timeout", FAULT, *extra)
    problems, notes, details = [], [], {}
    job = probe.start(cmd, case_dir)
    pid = job.proc.pid if victim == "launcher" or kind == "single" else rank_pid(job.tag, victim)
    if after is None:
        time.sleep(1.5)
    else:
        wait_lines(job, output, after)
    details["lines_at_kill"] = line_count(output)
    if job.proc.poll() is not None:
        notes.append(f"the job ended (status {job.proc.returncode}) before the kill")
    signal_pid(pid, signal.SIGKILL)
    killed = time.time()
    rc = job.wait(FAULT + SLACK)
    details["launcher_exit_after_s"] = round(time.time() - killed, 1)
    if rc is None:
        problems.append(f"HANG: the launcher still ran {FAULT + SLACK:g} s after the kill")
    while tagged(job.tag) and time.time() - killed < FAULT + SLACK:
        time.sleep(0.1)
    stragglers = reap(job.tag)
    if stragglers:
        problems.append(f"HANG: {stragglers} processes still ran {FAULT + SLACK:g} s after the kill")
    details["all_gone_after_s"] = round(time.time() - killed, 1)
    problems += partial_lines(output)
    details["first_run_errors"] = error_lines(job.err)[:3]
    problems += traceback_problems(job.err, notes)
    if victim != "launcher" and not any(f"rank {victim}" in e for e in error_lines(job.err)):
        notes.append(f"no lp: error line names rank {victim}")
    if victim != "launcher" and kind == "torchrun":
        problems += bare_interrupt(error_lines(job.err))
    problems += rerun_completes(probe, cmd, case_dir, output, ids, reference, notes, details)
    return verdict(problems, details, notes)


def family_kill(probe: Probe) -> None:
    probe.kill_source = records_input(probe, "kill.jsonl", KILL_RECORDS)
    for name, kind, extra, victim, after in KILLS:
        if kind == "mpirun" and MPIRUN is None:
            probe.results.append(dict(family="kill", name=name, ok=False, reason="no mpirun on PATH", seconds=0))
            continue
        probe.case("kill", name, lambda d, *a: kill_and_resume(probe, d, *a), 300, kind, extra, victim, after)


# items 1-9 --------------------------------------------------------------------------------------------------------

def lock_race(probe: Probe, case_dir: Path) -> dict:
    """Item 1: a replica job holds its output's lock until every replica's results are merged into it."""
    source, ids = records_input(probe, "race.jsonl", 40)
    other, other_ids = records_input(probe, "race_other.jsonl", 8, prefix="b")
    reference = probe.reference(source, 32)
    output = case_dir / "R.jsonl"
    first = probe.torchrun("--lp", "1", "--input", source, "--output", output, "--max-new-tokens", 32,
                           "--fault-timeout", 120)
    job = probe.start(first, case_dir)
    rank1 = rank_pid(job.tag, 1)
    wait_lines(job, output, 5)
    signal_pid(rank1, signal.SIGSTOP)
    problems, notes, details = [], [], {}
    last, still = line_count(output), time.time()
    while time.time() - still < 3 and job.proc.poll() is None:  # rank 1 is stopped: the count stalls once rank 0
        time.sleep(0.1)                                          # has drained the queue and waits for it
        if line_count(output) != last:
            last, still = line_count(output), time.time()
    details["lines_while_rank1_stopped"] = last
    fd = os.open(output, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        problems.append("LOCK: the output's flock was free while the job was alive")
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    second = probe.lp("--input", other, "--output", output, "--max-new-tokens", 8)
    rc, job2, _ = probe.run(second, case_dir, timeout=90)
    details["second_job"] = [rc, error_lines(job2.err)[:1]]
    if rc != 2 or not any("another lp job" in e for e in error_lines(job2.err)):
        problems.append(f"a second job on the same output was not refused (status {rc})")
    signal_pid(rank1, signal.SIGCONT)
    rc1 = job.wait(120)
    problems += traceback_problems(job.err, notes) + traceback_problems(job2.err, notes)
    if rc1 != 0:  # then what it left must still resume exactly
        problems.append(f"the first job exited {rc1}: {error_lines(job.err)[:1]}")
        problems += rerun_completes(probe, first, case_dir, output, ids, reference, notes)
    else:
        records, bad = read_jsonl(output)
        problems += bad + check_records(records, ids, reference)
    rc3, job3, _ = probe.run(second, case_dir, timeout=90)
    records, bad = read_jsonl(output)
    problems += bad + check_records(records, ids + other_ids, {**reference, **probe.reference(other, 8)})
    if rc3 != 0:
        problems.append(f"the second job, rerun after the first ended, exited {rc3}")
    problems += leftovers(output)
    return verdict(problems, details, notes)


def lock_spellings(probe: Probe, case_dir: Path) -> list[dict]:
    """Item 2: a symbolic link, a hard link and a `..` spelling of a busy output are refused."""
    source, ids = records_input(probe, "spell.jsonl", 40)
    other, _ = records_input(probe, "spell_other.jsonl", 4, prefix="s")
    reference = probe.reference(source, 32)
    output = case_dir / "c3.jsonl"
    (case_dir / "sub").mkdir()
    job = probe.start(probe.lp("--input", source, "--output", output, "--max-new-tokens", 32), case_dir)
    wait_lines(job, output, 1)
    signal_pid(job.proc.pid, signal.SIGSTOP)  # a controlled pause: the first job holds its lock, mid-way
    (case_dir / "c3link.jsonl").symlink_to("c3.jsonl")
    os.link(output, case_dir / "c3hard.jsonl")
    rows = []
    for name, path in (("lock_symlink", case_dir / "c3link.jsonl"), ("lock_hardlink", case_dir / "c3hard.jsonl"),
                       ("lock_dotdot", case_dir / "sub" / ".." / "c3.jsonl")):
        start = time.time()
        rc, job2, _ = probe.run(probe.lp("--input", other, "--output", path, "--max-new-tokens", 8), case_dir,
                                timeout=90)
        problems, notes = [], []
        errors = error_lines(job2.err)
        if rc != 2 or len(errors) != 1 or f"pid {job.proc.pid}" not in errors[0]:
            problems.append(f"not refused naming the first job's pid: status {rc}, {errors[:2]}")
        problems += traceback_problems(job2.err, notes)
        rows.append(dict(verdict(problems, dict(message=errors[:1]), notes), name=name,
                         seconds=round(time.time() - start, 1)))
    signal_pid(job.proc.pid, signal.SIGCONT)
    rc = job.wait(120)
    records, bad = read_jsonl(output)
    problems = bad + check_records(records, ids, reference) + leftovers(output)
    if rc != 0:
        problems.append(f"the first job exited {rc}")
    rows.append(dict(verdict(problems), name="lock_first_job_intact", seconds=None))
    return rows


def dev_entries() -> set[str]:
    return set(os.listdir("/dev"))


def stream_output(probe: Probe, case_dir: Path, kind: str, shell_tail: str, extra: tuple = (),
                  fifo: bool = False) -> dict:
    """Items 3 and 4: results to a pipe, a FIFO, or /dev/stdout redirected to a file: every record exactly once,
    nothing else among them, no file created in /dev."""
    source, ids = probe.in8
    reference = probe.reference(source, 16)
    before = dev_entries()
    problems, notes, details = [], [], {}
    args = ["--input", source, "--max-new-tokens", 16, *extra] + (["--lp", "1"] if kind != "single" else [])
    result = case_dir / "received.jsonl"
    if fifo:
        path = case_dir / "results.fifo"
        os.mkfifo(path)
        got = []
        reader = threading.Thread(target=lambda: got.append(path.read_bytes()), daemon=True)
        reader.start()
        rc, job, seconds = probe.run(probe.command(kind, *args, "--output", path), case_dir, timeout=120)
        reader.join(10)
        result.write_bytes(got[0] if got else b"")
        extra_files = [p.name for p in case_dir.iterdir() if p.name.startswith("results.fifo.")]
        if extra_files:
            problems.append(f"files beside the FIFO: {extra_files}")
    else:
        cmd = " ".join(f"'{c}'" for c in probe.command(kind, *args, "--output", "/dev/stdout")) + shell_tail
        rc, job, seconds = probe.run(cmd, case_dir, timeout=120, shell=True, stdout=result)
    new = sorted(dev_entries() - before)
    if new:
        problems.append(f"created in /dev: {new}")
    if rc != 0:
        problems.append(f"exited {rc}: {error_lines(job.err)[:1]}")
    records, bad = read_jsonl(result)
    problems += bad + check_records(records, ids, reference)
    if " of 8 prompts" in job.err and "8 of 8 prompts" not in job.err:
        problems.append("the summary does not say 8 of 8")
    problems += traceback_problems(job.err, notes)
    details["seconds"] = round(seconds, 1)
    return verdict(problems, details, notes)


def stopped_rank(probe: Probe, case_dir: Path, kind: str, extra: list, victim: int) -> dict:
    """Items 5-7: SIGSTOP one rank mid-job with --fault-timeout 10: the error names it within the fault timeout
    (plus what the other replica still had to decode), the job exits, and a rerun completes exactly."""
    source, ids = probe.stop_source
    reference = probe.reference(source, 24)
    output = case_dir / "out.jsonl"
    cmd = probe.command(kind, "--input", source, "--output", output, "--max-new-tokens", 24, "--fault-timeout",
                        FAULT, *extra)
    problems, notes, details = [], [], {}
    job = probe.start(cmd, case_dir)
    pid = rank_pid(job.tag, victim)
    wait_lines(job, output, 3)
    signal_pid(pid, signal.SIGSTOP)
    stopped = time.time()
    last, changed = line_count(output), stopped
    error_s = None
    while time.time() - stopped < FAULT + TORCHRUN_GRACE + 3 * SLACK:
        if line_count(output) != last:
            last, changed = line_count(output), time.time()
        if error_s is None and "lp: error" in job.err:
            error_s = time.time() - stopped
        if job.proc.poll() is not None:
            break
        time.sleep(0.05)
    exit_s = time.time() - stopped if job.proc.poll() is not None else None
    if error_s is None and "lp: error" in job.err:
        error_s = exit_s
    work_s = changed - stopped  # the other replica decoding on after the stop
    details.update(error_after_s=None if error_s is None else round(error_s, 1), exit_after_s=None if exit_s is None
                   else round(exit_s, 1), other_ranks_worked_s=round(work_s, 1), messages=error_lines(job.err)[:3])
    if error_s is None:
        problems.append("HANG: no lp: error line")
    elif error_s > FAULT + SLACK + work_s:
        problems.append(f"SLOW: the error came {error_s:.1f} s after the stop (bound {FAULT + SLACK + work_s:.1f})")
    if not any(f"rank {victim}" in e for e in error_lines(job.err)):
        problems.append(f"no lp: error line names rank {victim}")
    grace = TORCHRUN_GRACE if kind == "torchrun" else 0.0
    if exit_s is None or error_s is not None and exit_s > error_s + grace + SLACK:
        problems.append(f"HANG: the launcher exited {'never' if exit_s is None else f'{exit_s:.1f} s'} after the "
                        f"stop")
    elif kind == "torchrun" and exit_s > (error_s or 0) + SLACK:
        notes.append(f"torchrun took {exit_s - error_s:.0f} s more to SIGKILL the stopped worker (its own grace)")
    problems += traceback_problems(job.err, notes)
    reap(job.tag)
    problems += rerun_completes(probe, cmd, case_dir, output, ids, reference, notes, details)
    return verdict(problems, details, notes)


SURROGATE_RECORDS = '\n'.join([
    '{"id": "ok1", "prompt": "1: ab ab"}',
    '{"id": "sur\\udc80id", "prompt": "2: cd cd"}',
    '{"id": "ok2", "prompt": "3: ab cd"}',
    '{"id": "surprompt", "prompt": "bad \\ud800 text"}',
    '{"id": "ok3", "prompt": "4: zz"}',
    '{"id": "ok4", "prompt": "5: x y"}']) + "\n"


def surrogate(probe: Probe, case_dir: Path, kind: str, extra: list, with_output: bool = True) -> dict:
    """Item 8: a lone-surrogate id is written (escaped) and read back; a lone-surrogate prompt is an error record;
    the records after them are decoded; a rerun adds nothing and does not crash."""
    source = probe.input_file("surrogate.jsonl", text=SURROGATE_RECORDS)
    ids = ["ok1", "sur\udc80id", "ok2", "surprompt", "ok3", "ok4"]
    output = case_dir / "out.jsonl"
    args = ["--input", source, "--max-new-tokens", 8, *extra] + (["--output", output] if with_output else [])
    problems, notes, details = [], [], {}
    rc, job, _ = probe.run(probe.command(kind, *args), case_dir)
    if rc != 0:
        problems.append(f"exited {rc}: {error_lines(job.err)[:1]}")
    problems += traceback_problems(job.err, notes)
    if with_output:
        records, bad = read_jsonl(output)
        problems += bad + check_records(records, ids, errors=frozenset({key("surprompt")}))
        surprompt = [r for r in records if r.get("id") == "surprompt"]
        if not surprompt or "surrogate" not in surprompt[0].get("error", ""):
            problems.append(f"the lone-surrogate prompt is not an error record saying so: {surprompt[:1]}")
        rc2, job2, _ = probe.run(probe.command(kind, *args), case_dir)
        records2, bad = read_jsonl(output)
        if rc2 != 0 or len(records2) != len(records):
            problems.append(f"the rerun exited {rc2} and left {len(records2)} lines (was {len(records)})")
        problems += traceback_problems(job2.err, notes)
    else:
        shown = job.out
        if "ok4" not in shown or "sur" not in shown:
            problems.append("not every record was printed")
    return verdict(problems, details, notes)


HUGE = 10 ** 30


def huge_budget(probe: Probe, case_dir: Path, extra: list, flag: bool, progress: bool = False) -> dict:
    """Item 9 (and 11): max_new_tokens past 2**63, by flag or record, with a batch or compiled: clamped to the
    context (or an error record), never a traceback; with --compile a line says what is compiling."""
    records = [{"id": "small", "prompt": "1: ab ab"}, {"id": "huge", "prompt": "2: cd cd"},
               {"id": "small2", "prompt": "3: ef"}]
    if not flag:
        records[1]["max_new_tokens"] = HUGE
    source = probe.input_file(f"huge-{case_dir.name}.jsonl", records)
    output = case_dir / "out.jsonl"
    budget = str(10 ** 23) if flag else "8"
    rc, job, seconds = probe.run(probe.lp("--input", source, "--output", output, "--max-new-tokens", budget, *extra),
                                 case_dir, timeout=420)
    problems, notes, details = [], [], dict(seconds=round(seconds, 1))
    if rc != 0:
        problems.append(f"exited {rc}: {error_lines(job.err)[:1]}")
    problems += traceback_problems(job.err, notes)
    got, bad = read_jsonl(output)
    problems += bad + check_records(got, [r["id"] for r in records])
    for r in got:
        if r.get("id") == "huge" or flag:
            details[str(r.get("id"))] = r.get("stop_reason") or r.get("error")
            if "error" not in r and r.get("stop_reason") != "context":
                problems.append(f"{r.get('id')}: stopped by {r.get('stop_reason')}, not the context")
    compiled = sum(r.get("compile_time_s") or 0 for r in got)
    if "--compile" not in extra and compiled:  # the budget the tuner saw is the context's room, not 10**30
        problems.append(f"SLOW: self-tuning compiled for {compiled:.0f} s on a job of 3 short records")
    if progress:
        compiling = [line for line in job.err.splitlines() if "compiling" in line]
        details["compile_lines"] = compiling[:2]
        if not compiling:
            problems.append("no line says what is compiling")
        compile_s = [r.get("compile_time_s") for r in got if r.get("compile_time_s")]
        details["compile_s"] = compile_s
    return verdict(problems, details, notes)


def family_items(probe: Probe) -> None:
    probe.in8 = records_input(probe, "in8.jsonl", 8)
    probe.stop_source = records_input(probe, "stop.jsonl", 60)
    probe.case("items", "1_lock_race_replicas", lambda d: lock_race(probe, d), 300)
    probe.case("items", "2_lock_spellings", lambda d: lock_spellings(probe, d), 400)
    probe.case("items", "3_replicas_devstdout_pipe", lambda d: stream_output(probe, d, "torchrun", " | cat"), 150)
    probe.case("items", "3_replicas_fifo", lambda d: stream_output(probe, d, "torchrun", "", fifo=True), 150)
    if MPIRUN:
        probe.case("items", "3_mpirun_replicas_devstdout_pipe",
                   lambda d: stream_output(probe, d, "mpirun", " | cat"), 150)
    probe.case("items", "4_devstdout_to_file", lambda d: stream_output(probe, d, "single", " "), 150)
    probe.case("items", "4_devstdout_pipe", lambda d: stream_output(probe, d, "single", " | cat"), 150)
    probe.case("items", "4_json_devstdout_pipe",
               lambda d: stream_output(probe, d, "single", " | cat", extra=("--json",)), 150)
    probe.case("items", "4_replicas_devstdout_to_file",
               lambda d: stream_output(probe, d, "torchrun", " "), 150)
    stops = [("5_replicas_stop_rank1", "torchrun", ["--lp", "1"], 1), ("7_team_stop_rank1", "torchrun", [], 1),
             ("7_team_stop_rank0", "torchrun", [], 0)]
    if MPIRUN:
        stops += [("5_mpirun_replicas_stop_rank1", "mpirun", ["--lp", "1"], 1),
                  ("6_mpirun_team_stop_rank0", "mpirun", [], 0), ("7_mpirun_team_stop_rank1", "mpirun", [], 1)]
    for name, kind, extra, victim in stops:
        probe.case("items", name, lambda d, *a: stopped_rank(probe, d, *a), 400, kind, extra, victim)
    probe.case("items", "8_surrogate_single", lambda d: surrogate(probe, d, "single", []), 150)
    probe.case("items", "8_surrogate_batch2_json", lambda d: surrogate(probe, d, "single", ["--batch-size", "2",
                                                                                          "--json"]), 150)
    probe.case("items", "8_surrogate_replicas", lambda d: surrogate(probe, d, "torchrun", ["--lp", "1"]), 200)
    probe.case("items", "8_surrogate_to_terminal", lambda d: surrogate(probe, d, "single", [], False), 150)
    probe.case("items", "9_record_huge_batch2", lambda d: huge_budget(probe, d, ["--batch-size", "2"], False), 150)
    probe.case("items", "9_flag_huge_batch2", lambda d: huge_budget(probe, d, ["--batch-size", "2"], True), 150)
    probe.case("items", "9_11_record_huge_compile",
               lambda d: huge_budget(probe, d, ["--compile"], False, progress=True), 450)
    probe.case("items", "9_flag_huge_compile_batch2",
               lambda d: huge_budget(probe, d, ["--compile", "--batch-size", "2"], True, progress=True), 450)


# items 10-14 ------------------------------------------------------------------------------------------------------

def failed_job(job: Job, details: dict, problems: list[str]) -> list[str]:
    """Wait for a job that must fail: it ends within the fault timeout plus slack (and the time its other replica
    needs), and not with 0; its lp: error lines."""
    rc = job.wait(FAULT + SLACK + 20)
    errors = error_lines(job.err)
    details.update(status=rc, messages=errors[:3])
    if rc is None:
        problems.append("HANG: the job did not end")
    elif rc == 0:
        problems.append("the job exited 0")
    return errors


def replica_write_fails(probe: Probe, case_dir: Path, kind: str, how: str) -> dict:
    """Item 10: replica 1 cannot write its results (a file-size limit put on it mid-job: EFBIG, as a full disk
    would fail it) or is SIGKILLed: one line says which rank and why, no traceback, no partial line after the
    job, and the rerun completes exactly."""
    source, ids = probe.stop_source
    reference = probe.reference(source, 24)
    output = case_dir / "out.jsonl"
    cmd = probe.command(kind, "--input", source, "--output", output, "--max-new-tokens", 24, "--fault-timeout",
                        FAULT, "--lp", "1")
    problems, notes, details = [], [], {}
    job = probe.start(cmd, case_dir)
    pid = rank_pid(job.tag, 1)
    shard = output.with_name(output.name + ".replica-1.part")
    wait_lines(job, output, 4)
    if how == "fsize":
        size = shard.stat().st_size if shard.exists() else 0
        subprocess.run(["prlimit", "--pid", str(pid), f"--fsize={size + 40}"], check=True)
    else:
        signal_pid(pid, signal.SIGKILL)
    errors = failed_job(job, details, problems)
    if not any("rank 1" in e for e in errors):
        problems.append("no lp: error line names rank 1")
    problems += bare_interrupt(errors)
    if how == "fsize" and not any("write" in e for e in errors):
        problems.append("no line says a write failed")
    problems += traceback_problems(job.err, notes) + partial_lines(output)
    reap(job.tag)
    problems += rerun_completes(probe, cmd, case_dir, output, ids, reference, notes, details)
    return verdict(problems, details, notes)


def full_disk(probe: Probe, case_dir: Path, kind: str) -> dict:
    """Item 10: the output's file system fills up mid-job (a 64 KiB tmpfs, then a filler file takes what is left):
    one `lp: error:` line, the output ends with a whole record, and after space is freed the rerun completes."""
    mount = case_dir / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        return dict(ok=False, reason="skipped: needs root and mount for a small tmpfs")
    try:
        source, ids = probe.stop_source
        reference = probe.reference(source, 24)
        output = mount / "out.jsonl"
        extra = ["--lp", "1"] if kind != "single" else []
        cmd = probe.command(kind, "--input", source, "--output", output, "--max-new-tokens", 24, "--fault-timeout",
                            FAULT, *extra)
        problems, notes, details = [], [], {}
        job = probe.start(cmd, case_dir)
        wait_lines(job, output, 4)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: the file system is full
            pass
        finally:
            os.close(fd)
        errors = failed_job(job, details, problems)
        if not any("space" in e or "write" in e for e in errors):
            problems.append("no lp: error line says the disk is full")
        problems += traceback_problems(job.err, notes) + partial_lines(output)
        reap(job.tag)
        filler.unlink()
        problems += rerun_completes(probe, cmd, case_dir, output, ids, reference, notes, details)
        return verdict(problems, details, notes)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def hub_offline(probe: Probe, case_dir: Path) -> dict:
    """Item 12: a hub id not in the cache, HF_HUB_OFFLINE unset, no network: one line, at once."""
    env = {k: v for k, v in probe.env.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(case_dir / "hf-home")
    cmd = [sys.executable, str(RUN), "--model", "lp-probe/no-such-model", "--prompt", "hi", "--max-new-tokens", "2"]
    rc, job, seconds = probe.run(cmd, case_dir, timeout=120, env=env)
    lines = [line for line in job.err.splitlines() if line.strip() and not line.startswith("lp: loading")]
    problems, notes = [], []
    if rc != 2 or len(error_lines(job.err)) != 1:
        problems.append(f"status {rc}, {len(error_lines(job.err))} error lines")
    if len(lines) > 1:
        problems.append(f"{len(lines)} lines on stderr besides the loading line (retry spam?)")
    if seconds > 20:
        problems.append(f"SLOW: {seconds:.0f} s to fail")
    problems += traceback_problems(job.err, notes)
    return verdict(problems, dict(seconds=round(seconds, 1), message=error_lines(job.err)[:1]), notes)


def all_failed(probe: Probe, case_dir: Path) -> dict:
    """Item 13: a job whose every record ended in an error exits 3."""
    source = probe.input_file("all_failed.jsonl", [{"id": 1}, {"id": 2, "prompt": ""}, {"id": 3, "prompt": 5}])
    rc, job, _ = probe.run(probe.lp("--input", source, "--output", case_dir / "out.jsonl", "--max-new-tokens", 4),
                           case_dir)
    problems = [] if rc == 3 else [f"exited {rc}, not 3"]
    return verdict(problems + traceback_problems(job.err))


def shipped_prompts(probe: Probe, case_dir: Path, path: Path) -> dict:
    """Item 13: the prompt files the repository ships work as --input."""
    rc, job, _ = probe.run(probe.lp("--input", path, "--output", case_dir / "out.jsonl", "--max-new-tokens", 4),
                           case_dir)
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    records, bad = read_jsonl(case_dir / "out.jsonl")
    problems = bad + check_records(records, ids)
    if rc != 0:
        problems.append(f"exited {rc}: {error_lines(job.err)[:1]}")
    return verdict(problems + traceback_problems(job.err))


def big_batch(probe: Probe, case_dir: Path) -> dict:
    """Item 14: --batch-size 256 with 8 records takes about what batch 1 takes (idle lanes compute nothing)."""
    source, ids = probe.in8
    walls = {}
    problems = []
    for size in (1, 256):
        out = case_dir / f"out{size}.jsonl"
        rc, job, _ = probe.run(probe.lp("--input", source, "--output", out, "--max-new-tokens", 32,
                                        "--batch-size", size), case_dir)
        summary = [json.loads(line)["summary"] for line in job.err.splitlines() if line.startswith('{"summary"')]
        if rc != 0 or not summary:
            problems.append(f"batch {size} exited {rc}")
            continue
        walls[size] = summary[0]["wall_s"]
        records, bad = read_jsonl(out)
        problems += bad + check_records(records, ids, probe.reference(source, 32))
    if len(walls) == 2 and walls[256] > 3 * walls[1] + 1.0:
        problems.append(f"SLOW: batch 256 took {walls[256]:.1f} s, batch 1 {walls[1]:.1f} s")
    return verdict(problems, dict(wall_s=walls), [f"decoding wall: batch 1 {walls.get(1)} s, batch 256 "
                                                  f"{walls.get(256)} s"])


def family_more(probe: Probe) -> None:
    probe.in8 = getattr(probe, "in8", None) or records_input(probe, "in8.jsonl", 8)
    probe.stop_source = getattr(probe, "stop_source", None) or records_input(probe, "stop.jsonl", 60)
    probe.case("more", "10_replica_killed_named", lambda d: replica_write_fails(probe, d, "torchrun", "kill"), 300)
    probe.case("more", "10_replica_write_fails_torchrun",
               lambda d: replica_write_fails(probe, d, "torchrun", "fsize"), 300)
    if MPIRUN:
        probe.case("more", "10_replica_write_fails_mpirun",
                   lambda d: replica_write_fails(probe, d, "mpirun", "fsize"), 300)
    probe.case("more", "10_full_disk_single", lambda d: full_disk(probe, d, "single"), 300)
    probe.case("more", "10_full_disk_replicas", lambda d: full_disk(probe, d, "torchrun"), 300)
    probe.case("more", "12_hub_id_offline", lambda d: hub_offline(probe, d), 150)
    probe.case("more", "13_every_record_failed_exits_3", lambda d: all_failed(probe, d), 150)
    for path in sorted((REPO / "benchmarks" / "prompts").glob("*.jsonl")):
        probe.case("more", f"13_shipped_{path.stem}", lambda d, p: shipped_prompts(probe, d, p), 150, path)
    probe.case("more", "14_batch_256_of_8_records", lambda d: big_batch(probe, d), 200)


# bad and odd records ----------------------------------------------------------------------------------------------

DEEP = "[" * 100000 + "]" * 100000
BAD_RECORDS = [  # name, the line as written in the file (its id, when it has one, is the name)
    ("not_json", '{"id": "not_json", "prompt": "x"'),
    ("json_array", '[1, 2]'),
    ("json_string", '"just a string"'),
    ("json_number", '42'),
    ("json_null", 'null'),
    ("no_id", '{"prompt": "no id here"}'),
    ("id_null", '{"id": null, "prompt": "x"}'),
    ("id_float", '{"id": 1.5, "prompt": "x"}'),
    ("id_bool", '{"id": true, "prompt": "x"}'),
    ("id_list", '{"id": [1], "prompt": "x"}'),
    ("id_object", '{"id": {"a": 1}, "prompt": "x"}'),
    ("id_nan", '{"id": NaN, "prompt": "x"}'),
    ("no_prompt", '{"id": "no_prompt"}'),
    ("empty_prompt", '{"id": "empty_prompt", "prompt": ""}'),
    ("prompt_number", '{"id": "prompt_number", "prompt": 5}'),
    ("prompt_list", '{"id": "prompt_list", "prompt": ["a", "b"]}'),
    ("prompt_null", '{"id": "prompt_null", "prompt": null}'),
    ("prompt_object", '{"id": "prompt_object", "prompt": {"text": "x"}}'),
    ("prompt_and_messages", '{"id": "prompt_and_messages", "prompt": "x", "messages": [{"role": "user", '
                            '"content": "x"}]}'),
    ("messages_empty", '{"id": "messages_empty", "messages": []}'),
    ("messages_string", '{"id": "messages_string", "messages": "hello"}'),
    ("messages_no_role", '{"id": "messages_no_role", "messages": [{"content": "x"}]}'),
    ("messages_content_number", '{"id": "messages_content_number", "messages": [{"role": "user", "content": 3}]}'),
    ("messages_item_string", '{"id": "messages_item_string", "messages": ["hello"]}'),
    ("mnt_zero", '{"id": "mnt_zero", "prompt": "x", "max_new_tokens": 0}'),
    ("mnt_negative", '{"id": "mnt_negative", "prompt": "x", "max_new_tokens": -5}'),
    ("mnt_string", '{"id": "mnt_string", "prompt": "x", "max_new_tokens": "10"}'),
    ("mnt_float", '{"id": "mnt_float", "prompt": "x", "max_new_tokens": 1.5}'),
    ("mnt_bool", '{"id": "mnt_bool", "prompt": "x", "max_new_tokens": true}'),
    ("mnt_nan", '{"id": "mnt_nan", "prompt": "x", "max_new_tokens": NaN}'),
    ("mnt_infinity", '{"id": "mnt_infinity", "prompt": "x", "max_new_tokens": Infinity}'),
    ("seed_negative", '{"id": "seed_negative", "prompt": "x", "seed": -1}'),
    ("seed_string", '{"id": "seed_string", "prompt": "x", "seed": "abc"}'),
    ("seed_huge", '{"id": "seed_huge", "prompt": "x", "seed": 18446744073709551616}'),
    ("seed_float", '{"id": "seed_float", "prompt": "x", "seed": 1.5}'),
    ("misspelt_budget", '{"id": "misspelt_budget", "prompt": "x", "max_new_token": 3}'),
    ("misspelt_prompt", '{"id": "misspelt_prompt", "promt": "x"}'),
    ("job_setting_temperature", '{"id": "job_setting_temperature", "prompt": "x", "temperature": 0.7}'),
    ("job_setting_window", '{"id": "job_setting_window", "prompt": "x", "window": 4}'),
    ("surrogate_prompt", '{"id": "surrogate_prompt", "prompt": "a \\udc80 b"}'),
    ("prompt_too_long", json.dumps({"id": "prompt_too_long", "prompt": "ab " * 400})),
    ("deep_nested_line", DEEP),
    ("deep_nested_field", '{"id": "deep_nested_field", "prompt": ' + DEEP + '}'),
]
ODD_RECORDS = [  # valid records with odd values: each a result under its own id
    ("huge_int_id", 10 ** 30, {}),
    ("negative_id", -7, {}),
    ("zero_id", 0, {}),
    ("empty_string_id", "", {}),
    ("long_string_id", "x" * 10000, {}),
    ("unicode_id", "ïd-ß-中-🙂", {}),
    ("newline_in_id", "a\nb\u2028c", {}),
    ("surrogate_id", "s\udc80id", {}),
    ("nul_in_prompt", "nul_in_prompt", {"prompt": "a\u0000b"}),
    ("emoji_prompt", "emoji_prompt", {"prompt": "🙂🙂 ab"}),
    ("unknown_field_ignored", "unknown_field_ignored", {"source": "suite", "tags": ["a"]}),
    ("max_new_tokens_one", "max_new_tokens_one", {"max_new_tokens": 1}),
    ("seed_on_greedy", "seed_on_greedy", {"seed": 5}),
    ("messages_ok", "messages_ok", {"prompt": None, "messages": [{"role": "user", "content": "hi"}]}),
]


def bad_records_file(probe: Probe) -> tuple[Path, dict]:
    """The input: good records between the bad and odd ones; returns (path, name -> how to find its output)."""
    lines, where = [], {}
    for n, (name, text) in enumerate(BAD_RECORDS):
        lines.append(json.dumps({"id": f"good{n}", "prompt": f"{n}: ab ab"}))
        lines.append(text)
        try:
            has_id = json.loads(text).get("id") == name
        except (ValueError, RecursionError, AttributeError):
            has_id = False
        where[name] = ("id", name) if has_id else ("line", len(lines))
    for name, record_id, fields in ODD_RECORDS:
        record = {"id": record_id, "prompt": f"{name}: ab"}
        record.update(fields)
        record = {k: v for k, v in record.items() if v is not None}
        lines.append(json.dumps(record))
        where[name] = ("id", record_id)
    text = "\n".join(lines[:-1]) + "\r\n" + lines[-1] + "\n"  # one CRLF line ending too
    return probe.input_file("bad_records.jsonl", text=text), where


def find(records: list[dict], how: tuple) -> list[dict]:
    kind, value = how
    if kind == "id":
        return [r for r in records if "id" in r and r["id"] == value and type(r["id"]) is type(value)]
    return [r for r in records if r.get("id") is None and r.get("line") == value]


def family_records(probe: Probe) -> None:
    source, where = bad_records_file(probe)
    folder = probe.folder / "records" / "_job"
    folder.mkdir(parents=True)
    output = folder / "out.jsonl"
    start = time.time()
    rc, job, _ = probe.run(probe.lp("--input", source, "--output", output, "--max-new-tokens", 4), folder,
                           timeout=300)
    records, bad = read_jsonl(output)
    seconds = round(time.time() - start, 1)
    job_problems = bad + traceback_problems(job.err) + ([] if rc == 0 else [f"the job exited {rc}"])
    goods = [f"good{n}" for n in range(len(BAD_RECORDS))]
    job_problems += check_records([r for r in records if str(r.get("id")).startswith("good")], goods)
    probe.results.append(dict(family="records", name="job_goes_on", ok=not job_problems,
                              reason="; ".join(job_problems) or f"{len(records)} lines, status {rc}",
                              seconds=seconds))
    print(f"records  job_goes_on {'pass' if not job_problems else 'FAIL'} {job_problems}", flush=True)
    outcomes = {}
    for name, _ in BAD_RECORDS:
        found = find(records, where[name])
        problems = []
        if len(found) != 1:
            problems.append(f"{len(found)} output lines for it")
        elif "error" not in found[0]:
            problems.append("decoded instead of an error record")
        elif re.match(r"^[A-Z]\w+(Error|Exception): ", found[0]["error"]):
            problems.append(f"a raw exception, not a clear message: {found[0]['error'][:100]}")
        message = found[0].get("error", "") if found else ""
        outcomes[name] = message
        probe.results.append(dict(family="records", name=f"bad_{name}", ok=not problems,
                                  reason="; ".join(problems) or message[:120], seconds=None))
    for name, _, _ in ODD_RECORDS:
        found = find(records, where[name])
        problems = []
        if len(found) != 1:
            problems.append(f"{len(found)} output lines for it")
        elif "error" in found[0]:
            problems.append(f"an error record: {found[0]['error'][:100]}")
        outcomes[name] = "ok" if found and "error" not in found[0] else (found[0].get("error") if found else None)
        probe.results.append(dict(family="records", name=f"odd_{name}", ok=not problems,
                                  reason="; ".join(problems) or (found[0].get("stop_reason") or "ok"), seconds=None))
    # the same file under replicas with batches: the same outcome for every record
    output2 = folder / "out_replicas.jsonl"
    start = time.time()
    rc2, job2, _ = probe.run(probe.torchrun("--input", source, "--output", output2, "--max-new-tokens", 4, "--lp", "1",
                                            "--batch-size", "2"), folder, timeout=300)
    records2, bad2 = read_jsonl(output2)
    problems = bad2 + traceback_problems(job2.err) + ([] if rc2 == 0 else [f"exited {rc2}"])
    for name in outcomes:
        found = find(records2, where[name])
        got = "ok" if found and "error" not in found[0] else (found[0].get("error") if found else None)
        if len(found) != 1 or (got == "ok") != (outcomes[name] == "ok"):
            problems.append(f"{name}: {len(found)} lines, {got!r:.60} (one process: {outcomes[name]!r:.60})")
    probe.results.append(dict(family="records", name="same_outcomes_replicas_batch2", ok=not problems,
                              reason="; ".join(problems[:4]), seconds=round(time.time() - start, 1)))
    print(f"records  same_outcomes_replicas_batch2 {'pass' if not problems else 'FAIL'} {problems[:4]}", flush=True)
    # whole-file cases: the job is refused with one line (2), runs (0), or every record failed (3)
    files = [
        ("file_duplicate_ids", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', 2),
        ("file_not_utf8", b'{"id": 1, "prompt": "caf\xe9"}\n', 2),
        ("file_no_object", "[1]\n2\n", 2),
        ("file_empty", "", 0),
        ("file_blank_lines", "\n\n   \n", 0),
        ("file_bom", "\ufeff" + '{"id": 1, "prompt": "a b"}\n', 0),
        ("file_every_record_bad", '{"id": 1}\n{"id": 2, "prompt": ""}\n', 3),
    ]
    for name, text, want in files:
        path = probe.input_file(f"{name}.jsonl", text=text)
        probe.case("records", name, lambda d, p, w: whole_file(probe, d, p, w), 150, path, want)


def whole_file(probe: Probe, case_dir: Path, path: Path, want: int) -> dict:
    rc, job, _ = probe.run(probe.lp("--input", path, "--output", case_dir / "out.jsonl", "--max-new-tokens", 4),
                           case_dir)
    problems = [] if rc == want else [f"exited {rc}, not {want}"]
    errors = error_lines(job.err)
    if want == 2 and len(errors) != 1:
        problems.append(f"{len(errors)} lp: error lines")
    return verdict(problems + traceback_problems(job.err), notes=errors[:1])


# bad flags --------------------------------------------------------------------------------------------------------

def bad_flags(probe: Probe) -> list[tuple[str, list]]:
    folder = probe.folder / "flag-inputs"
    folder.mkdir(exist_ok=True)
    bad_yaml = folder / "bad.yaml"
    bad_yaml.write_text("lookahead: [window: 3\n")
    same = folder / "same.jsonl"
    same.write_text('{"id": 1, "prompt": "a"}\n')
    in8 = str(probe.in8[0])
    return [
        ("max_new_tokens_1e23", ["--max-new-tokens", "1e23"]),
        ("max_new_tokens_zero", ["--max-new-tokens", "0"]),
        ("max_new_tokens_negative", ["--max-new-tokens", "-5"]),
        ("window_zero", ["--window", "0"]),
        ("window_negative", ["--window", "-3"]),
        ("ngram_one", ["--ngram", "1"]),
        ("guess_negative", ["--guess", "-1"]),
        ("dtype_unknown", ["--dtype", "float8"]),
        ("device_meta", ["--device", "meta"]),
        ("device_cuda_absent", ["--device", "cuda"]),
        ("device_bogus", ["--device", "tpu9"]),
        ("fault_timeout_tiny", ["--fault-timeout", "0.001"]),
        ("fault_timeout_negative", ["--fault-timeout", "-1"]),
        ("fault_timeout_nan", ["--fault-timeout", "nan"]),
        ("fault_timeout_inf", ["--fault-timeout", "inf"]),
        ("batch_size_zero", ["--batch-size", "0"]),
        ("batch_size_huge", ["--batch-size", "100000"]),
        ("lp_more_than_world", ["--lp", "3"]),
        ("tp_more_than_world", ["--tp", "2"]),
        ("replicas_more_than_world", ["--replicas", "2"]),
        ("temperature_negative", ["--temperature", "-1"]),
        ("top_p_above_one", ["--top-p", "2"]),
        ("top_k_negative", ["--top-k", "-1"]),
        ("min_p_above_one", ["--min-p", "1.5"]),
        ("seed_negative", ["--seed", "-1"]),
        ("set_not_a_number", ["--set", "lookahead.window=abc"]),
        ("set_unknown_key", ["--set", "nosuch=1"]),
        ("set_no_equals", ["--set", "window"]),
        ("config_missing", ["--config", "/nonexistent/lp.yaml"]),
        ("config_bad_yaml", ["--config", str(bad_yaml)]),
        ("model_missing_path", ["--model", "/nonexistent/model"]),
        ("input_missing", ["--input", "/nonexistent/in.jsonl"]),
        ("input_directory", ["--input", str(folder)]),
        ("output_folder_missing", ["--input", in8, "--output", "/nonexistent/dir/out.jsonl"]),
        ("output_is_directory", ["--input", in8, "--output", str(folder)]),
        ("input_is_output", ["--input", str(same), "--output", str(same)]),
        ("prompt_empty", ["--prompt", ""]),
        ("prompt_and_input", ["--prompt", "x", "--input", in8]),
        ("unknown_flag", ["--no-such-flag"]),
        ("kv_sync_unknown", ["--kv-sync", "bogus"]),
        ("memory_unknown", ["--memory", "bogus"]),
        ("memory_tokens_negative", ["--memory-tokens", "-1"]),
        ("budget_negative", ["--budget", "-1"]),
        ("lookup_negative", ["--lookup", "-1"]),
        ("backend_nccl_on_cpu", ["--backend", "nccl"]),
        ("auto_tune_with_window", ["--auto-tune", "--window", "4"]),
        ("memory_file_with_record_memory", ["--memory-file", str(folder / "m.safetensors"), "--memory", "record"]),
    ]


def one_bad_flag(probe: Probe, case_dir: Path, kind: str, args: list) -> dict:
    base = [] if any(a in args for a in ("--prompt", "--input")) else ["--prompt", "ab ab"]
    rc, job, seconds = probe.run(probe.command(kind, *base, "--max-new-tokens", 2, *args), case_dir, timeout=120)
    errors = error_lines(job.err)
    problems, notes = [], []
    want = 2 if kind == "single" else None
    if rc is None:
        problems.append("HANG: killed at 120 s")
    elif (want is not None and rc != want) or rc == 0:
        problems.append(f"exited {rc}, not {want or 'non-zero'}")
    if len(errors) != 1:
        problems.append(f"{len(errors)} lp: error lines{': ' + ' | '.join(e[:80] for e in errors[:3]) if errors else ''}")
    problems += traceback_problems(job.err, notes)
    return verdict(problems, dict(message=errors[:1], seconds=round(seconds, 1)), errors[:1] + notes)


def family_flags(probe: Probe) -> None:
    probe.in8 = getattr(probe, "in8", None) or records_input(probe, "in8.jsonl", 8)
    cases = bad_flags(probe)
    for name, args in cases:
        probe.case("flags", name, lambda d, a: one_bad_flag(probe, d, "single", a), 150, args)
    named = dict(cases)
    for name in ("window_zero", "input_missing", "lp_more_than_world", "fault_timeout_tiny", "output_folder_missing"):
        probe.case("flags", f"torchrun_{name}", lambda d, a: one_bad_flag(probe, d, "torchrun", a), 150, named[name])
    if MPIRUN:
        for name in ("window_zero", "input_missing"):
            probe.case("flags", f"mpirun_{name}", lambda d, a: one_bad_flag(probe, d, "mpirun", a), 150, named[name])


# -- main ---------------------------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    lines = ["| family | case | result | s | reason / note |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        reason = r["reason"].replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r['family']} | {r['name']} | {'pass' if r['ok'] else '**FAIL**'} | "
                     f"{'' if r['seconds'] is None else r['seconds']} | {reason} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated families: {', '.join(FAMILIES)}")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fault_probe.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = p.parse_args()
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(only) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    folder = Path(tempfile.mkdtemp(prefix="lp-fault-probe-"))
    start = time.time()
    try:
        probe = Probe(folder)
        for family in FAMILIES:
            if family in only:
                globals()[f"family_{family}"](probe)
    finally:
        if args.keep:
            print(f"work folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    seconds = round(time.time() - start, 1)
    results = probe.results
    counts = {f: dict(passed=sum(r["ok"] for r in results if r["family"] == f),
                      failed=sum(not r["ok"] for r in results if r["family"] == f)) for f in only}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = dict(command=" ".join(sys.argv), commit=commit, seconds=seconds, fault_timeout_s=FAULT,
                  slack_s=SLACK, counts=counts, date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  cases=results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=True))
    print(table(results))
    print(f"\n{sum(c['passed'] for c in counts.values())} passed, {sum(c['failed'] for c in counts.values())} "
          f"failed in {seconds:.0f} s: {counts}; results in {out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
