"""Batch jobs: JSONL records in, JSONL results out, one fsynced line per record, resumable after a kill."""
from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, check_int


class InputError(ValueError):
    """The input or output file as a whole cannot be used (a single bad line becomes an error record instead)."""


@dataclass
class Record:
    """One unit of work. key identifies it for resuming: its id, or its line number when it has no usable id."""

    key: str
    id: object = None
    line: int | None = None
    prompt: str | None = None
    messages: list | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    error: str | None = None

    def error_result(self, message: str) -> dict:
        out = {"id": self.id, "error": message}
        if self.id is None and self.line is not None:
            out["line"] = self.line
        return out


def id_key(record_id) -> str:
    return "id:" + json.dumps(record_id)


def prompt_records(prompts: list[str]) -> list[Record]:
    """Records for prompts given on the command line (ids 0, 1, ...)."""
    return [Record(id_key(i), i, prompt=p) for i, p in enumerate(prompts)]


def read_records(path: str | Path) -> list[Record]:
    """Parse a JSONL input. Bad lines become error records; duplicate ids or an unreadable file raise InputError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark some editors write is not content
    except FileNotFoundError:
        raise InputError(f"input file {str(path)!r} does not exist; check the --input path") from None
    except IsADirectoryError:
        raise InputError(f"--input {str(path)!r} is a directory; give a .jsonl file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"input file {str(path)!r} is not UTF-8 text (byte {exc.start}); give a JSONL file") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {str(path)!r}: {exc.strerror or exc}") from None
    records, seen, parsed, lines = [], {}, 0, 0
    # JSONL lines end at "\n" only: str.splitlines would also split inside strings at U+2028, U+0085, ...
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(Record(f"line:{number}", line=number, error=f"line {number}: not valid JSON ({exc.msg})"))
            continue
        if not isinstance(value, dict):
            records.append(Record(f"line:{number}", line=number, error=f"line {number}: expected a JSON object"))
            continue
        parsed += 1
        record = _record(value, number)
        if record.id is not None:
            if record.key in seen:
                raise InputError(f"{path}: id {record.id!r} appears on lines {seen[record.key]} and {number}; "
                                 "ids must be unique")
            seen[record.key] = number
        records.append(record)
    if lines and not parsed:
        raise InputError(f"no line of {str(path)!r} is a JSON object; expected JSONL records like "
                         '{"id": 1, "prompt": "..."}')
    return records


def _record(value: dict, number: int) -> Record:
    record_id = value.get("id")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        why = "has no id" if record_id is None else f"has id {record_id!r}, which is not a string or integer"
        return Record(f"line:{number}", line=number, error=f"line {number}: {why}")
    record = Record(id_key(record_id), record_id, number)
    prompt, messages, budget = value.get("prompt"), value.get("messages"), value.get("max_new_tokens")
    seed = value.get("seed")
    unknown = sorted(set(value) - {"id", "prompt", "messages", "max_new_tokens", "seed"})
    if unknown:
        record.error = f"unknown field {unknown[0]!r}; records have id, prompt or messages, max_new_tokens, seed"
    elif (prompt is None) == (messages is None):
        record.error = "give exactly one of prompt or messages"
    elif prompt is not None and (not isinstance(prompt, str) or not prompt):
        record.error = "prompt must be a non-empty string"
    elif messages is not None and not _valid_messages(messages):
        record.error = 'messages must be a non-empty list of {"role": str, "content": str}'
    elif budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        record.error = f"max_new_tokens must be a positive integer, got {budget!r}"
    elif seed is not None and (seed_error := _seed_error(seed)):
        record.error = seed_error
    record.prompt, record.messages, record.max_new_tokens, record.seed = prompt, messages, budget, seed
    return record


def _seed_error(seed) -> str | None:
    """LookaheadConfig's check of a seed, as a record's error message (None when valid)."""
    try:
        check_int("seed", seed, 0, 2**63 - 1)
    except ConfigError as error:
        return str(error)
    return None


def _valid_messages(messages) -> bool:
    return (isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages))


def prompt_text(record: Record, tokenizer, chat: bool) -> str:
    """The text fed to the model: the prompt as is, or messages (or a chat-mode prompt) through the chat template."""
    messages = record.messages
    if messages is None and chat:
        messages = [{"role": "user", "content": record.prompt}]
    if messages is None:
        return record.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; give prompt instead of messages (and no --chat)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(record: Record, tokenizer, chat: bool) -> list[int]:
    """Token ids of the record's prompt; a chat template already holds its special tokens."""
    text = prompt_text(record, tokenizer, chat)
    templated = record.messages is not None or chat
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def done_keys(path: str | Path, retry_errors: bool = False) -> set[str]:
    """Keys of the records an earlier run finished (with `retry_errors`, error records do not count).
    A trailing partial line (a killed writer) is cut off."""
    path = Path(path)
    if not path.exists():
        return set()
    if path.is_dir():
        raise InputError(f"--output {str(path)!r} is a directory; give a .jsonl file")
    if not path.is_file():  # a pipe or a device: nothing to resume from, never read or truncated
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    keys = set()
    for line in data[:end].splitlines():
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(value, dict) and "id" in value and ("text" in value or ("error" in value and not retry_errors)):
            if value["id"] is not None:
                keys.add(id_key(value["id"]))
            elif isinstance(value.get("line"), int):
                keys.add(f"line:{value['line']}")
    return keys


class JsonlWriter:
    """Appends whole lines: one os.write per record, then fsync, so a kill never leaves half a record.

    A regular file is locked for the job (a second job on the same --output is refused, naming the holder's
    pid); a pipe or device (/dev/stdout, >(cmd), /dev/null) is streamed to, with no lock, fsync or resume."""

    def __init__(self, path: str | Path, lock: bool = True):
        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"the folder of --output {str(path)!r} does not exist; create it first")
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot write --output {str(path)!r}: {exc.strerror or exc}") from None
        self.path = path
        self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.lock_fd = _lock(path) if self.regular and lock else None

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            while data:
                data = data[os.write(self.fd, data):]
            if self.regular:
                os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(f"cannot write --output {str(self.path)!r}: {exc.strerror or exc}; the records written "
                              "so far are kept, rerun the same command to resume") from None

    def close(self) -> None:
        os.close(self.fd)
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock; the .lock file stays (removing it would race a new holder)


def shard_path(output: str | Path, replica: int) -> Path:
    """Where replica `replica` (> 0) of a job writes its results until rank 0 merges them into `output`."""
    output = Path(output)
    return output.with_name(f"{output.name}.replica-{replica}.part")


def merge_shards(output: str | Path) -> int:
    """Append the whole lines of every replica shard of `output` that `output` does not already hold, fsync, and
    delete the shards; returns how many lines moved. A merge cut short is finished by the next one: a line
    already in `output` is not written twice."""
    output = Path(output)
    shards = sorted(output.parent.glob(f"{output.name}.replica-*.part"))
    if not shards or not output.is_file():
        return 0
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):  # a writer killed mid-line: cut it, as done_keys would
        data = data[: data.rfind(b"\n") + 1]
        with open(output, "r+b") as f:
            f.truncate(len(data))
    have = set(data.splitlines())
    moved = 0
    fd = os.open(output, os.O_WRONLY | os.O_APPEND)
    try:
        for shard in shards:
            text = shard.read_bytes()
            for line in text[: text.rfind(b"\n") + 1].splitlines():
                if line.strip() and line not in have:
                    os.write(fd, line + b"\n")
                    have.add(line)
                    moved += 1
            os.fsync(fd)
            shard.unlink()
    finally:
        os.close(fd)
    return moved


class OutputError(OSError):
    """The results file cannot take more records (disk full, unwritable); the message says so in one line."""


def _lock(path: Path) -> int:
    """Hold an exclusive lock on `<output>.lock` for the whole job, or refuse naming the pid that holds it."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"another lp job (pid {holder}) is writing {str(path)!r}; wait for it to end or choose "
                         "another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@dataclass
class Totals:
    """Running totals of a job, for the progress bar and the final summary."""

    records: int = 0
    errors: int = 0
    skipped: int = 0
    new_tokens: int = 0
    steps: int = 0
    latency_s: float = 0.0
    compile_time_s: float = 0.0
    compiled: bool = False
    greedy: list = field(default_factory=list)  # (match, greedy_latency_s, latency_s) per compared record

    def as_dict(self) -> dict:
        """The totals as plain JSON (to send a replica's totals to rank 0)."""
        return {k: getattr(self, k) for k in ("records", "errors", "skipped", "new_tokens", "steps", "latency_s",
                                              "compile_time_s", "compiled", "greedy")}

    def merge(self, other: dict) -> None:
        """Add another replica's totals (as_dict) to these."""
        for k in ("records", "errors", "skipped", "new_tokens", "steps", "latency_s", "compile_time_s"):
            setattr(self, k, getattr(self, k) + other[k])
        self.compiled = self.compiled or other["compiled"]
        self.greedy.extend(tuple(g) for g in other["greedy"])

    def add(self, result: dict) -> None:
        self.records += 1
        if "error" in result:
            self.errors += 1
            return
        self.new_tokens += result["new_tokens"]
        self.steps += result["steps"]
        self.latency_s += result["latency_s"]
        self.compile_time_s += result.get("compile_time_s", 0.0)
        self.compiled = self.compiled or bool(result.get("compiled"))
        if "greedy_match" in result:
            self.greedy.append((result["greedy_match"], result["greedy_latency_s"], result["latency_s"]))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.latency_s if self.latency_s > 0 else 0.0

    def summary(self, ranks: int, wall_s: float) -> dict:
        out = {"records": self.records, "ok": self.records - self.errors, "errors": self.errors,
               "skipped": self.skipped, "new_tokens": self.new_tokens, "steps": self.steps,
               "tokens_per_step": round(self.new_tokens / self.steps, 4) if self.steps else 0.0,
               "latency_s": round(self.latency_s, 6), "tokens_per_second": round(self.tokens_per_second, 3),
               "wall_s": round(wall_s, 3), "ranks": ranks, "compiled": self.compiled,
               "compile_time_s": round(self.compile_time_s, 3)}
        if self.greedy:
            greedy_s = sum(g for _, g, _ in self.greedy)
            lookahead_s = sum(t for _, _, t in self.greedy)
            out["greedy_match"] = all(m for m, _, _ in self.greedy)
            out["greedy_mismatches"] = sum(not m for m, _, _ in self.greedy)
            out["speedup"] = round(greedy_s / lookahead_s, 3) if lookahead_s > 0 else 0.0
        return out
