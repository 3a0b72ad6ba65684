"""Batch jobs: JSONL records in, JSONL results out, one fsynced line per record, resumable after a kill."""
from __future__ import annotations

import dataclasses
import difflib
import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, LookaheadConfig, check_int


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
    ignored: tuple[str, ...] = ()  # fields the record has that lp does not read (a prompt suite's "source", ...)

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
        except RecursionError:
            records.append(Record(f"line:{number}", line=number, error=f"line {number}: nested too deeply to read"))
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
    unknown = sorted(set(value) - set(FIELDS))
    misspelt = [(name, close[0]) for name in unknown if (close := difflib.get_close_matches(name, FIELDS, 1, 0.75))]
    record.ignored = tuple(name for name in unknown if name not in dict(misspelt))
    settings = [name for name in unknown if name in JOB_SETTINGS]
    if misspelt:
        name, meant = misspelt[0]
        record.error = f"unknown field {name!r}; did you mean {meant!r}? Records have id, prompt or messages, " \
                       "max_new_tokens, seed"
    elif settings:
        record.error = f"{settings[0]!r} is a setting of the whole job, not of a record: give it on the command " \
                       f"line (--{settings[0].replace('_', '-')}) or in --config; records have id, prompt or " \
                       "messages, max_new_tokens, seed"
    elif (prompt is None) == (messages is None):
        record.error = "give exactly one of prompt or messages"
    elif prompt is not None and (not isinstance(prompt, str) or not prompt):
        record.error = "prompt must be a non-empty string"
    elif messages is not None and not _valid_messages(messages):
        record.error = 'messages must be a non-empty list of {"role": str, "content": str}'
    elif (where := _lone_surrogate(prompt if prompt is not None else [m["content"] for m in messages])) is not None:
        record.error = f"the {'prompt' if prompt is not None else 'messages'} hold a lone surrogate ({where}), which " \
                       "is not text; fix the input's encoding"
    elif budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        record.error = f"max_new_tokens must be a positive integer, got {budget!r}"
    elif seed is not None and (seed_error := _seed_error(seed)):
        record.error = seed_error
    record.prompt, record.messages, record.max_new_tokens, record.seed = prompt, messages, budget, seed
    return record


FIELDS = ("id", "prompt", "messages", "max_new_tokens", "seed")
# fields a record might carry hoping to set them for itself: refused (ignoring them would change what the user gets),
# while any other unknown field (a prompt suite's "source", "tags", ...) is ignored
JOB_SETTINGS = frozenset({f.name for f in dataclasses.fields(LookaheadConfig)} | {
    "do_sample", "max_length", "min_new_tokens", "min_length", "repetition_penalty", "stop", "eos_token_id",
    "num_beams", "model", "dtype", "chat"})


def _lone_surrogate(text) -> str | None:
    """Where `text` (a string, or a list of them) holds a code point that UTF-8 cannot encode, or None."""
    for part in [text] if isinstance(text, str) else text:
        try:
            part.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{part[exc.start]!a} at character {exc.start}"
    return None


def json_line(record: dict) -> bytes:
    """One JSON line, UTF-8; text that UTF-8 cannot hold (a lone surrogate in an id) is written escaped, which
    reads back as the same string."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


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

    A regular file is locked for the whole job through the file itself (flock on its inode: a second job on the
    same file is refused, whatever path, symbolic link or hard link names it, naming the holder's pid from
    /proc/locks, else from the note `<file>.lock`, which the job removes at its end); a pipe or device
    (/dev/stdout, >(cmd), /dev/null) is streamed to, with no lock, fsync or resume. When the output is this
    process's own standard output, records go through that very descriptor (the shell's redirection keeps its
    offset), and `to_stdout` tells the caller to print nothing else there."""

    def __init__(self, path: str | Path, lock: bool = True):
        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"the folder of --output {str(path)!r} does not exist; create it first")
        self.to_stdout = is_stdout(path)
        try:
            self.fd = os.dup(1) if self.to_stdout else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot write --output {str(path)!r}: {exc.strerror or exc}") from None
        self.path = path
        self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.note: Path | None = None
        if self.regular and lock:
            try:
                self.note = _lock(self.fd, path)
            except InputError:
                os.close(self.fd)
                raise

    def write(self, record: dict) -> None:
        data = memoryview(json_line(record))
        end = os.fstat(self.fd).st_size if self.regular else 0
        try:
            while data:
                data = data[os.write(self.fd, data):]
            if self.regular:
                os.fsync(self.fd)
        except OSError as exc:
            if self.regular:  # a full disk took part of the line: cut it, so the file ends with a whole record
                try:
                    os.ftruncate(self.fd, end)
                except OSError:
                    pass
            raise OutputError(f"cannot write --output {str(self.path)!r}: {exc.strerror or exc}; the records written "
                              "so far are kept, rerun the same command to resume") from None

    def close(self) -> None:
        """Remove the lock's note (while still holding the lock), then close, which releases it."""
        if self.fd < 0:
            return
        if self.note is not None:
            try:
                if self.note.read_text().strip() == str(os.getpid()):
                    self.note.unlink()
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1


def is_stdout(path: str | Path) -> bool:
    """Whether `path` is this process's standard output (/dev/stdout, /proc/self/fd/1, or the file it goes to)."""
    try:
        mine, there = os.fstat(1), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


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


def _lock(fd: int, path: Path) -> Path | None:
    """Hold an exclusive flock on the output file's own inode for the whole job, or refuse naming the pid that
    holds it (from /proc/locks, else the note `<real path>.lock`, which this job then writes: best effort, the lock
    is the flock)."""
    real = Path(os.path.realpath(path))
    note = real.with_name(real.name + ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _flock_holder(fd) or _noted_holder(note)
        raise InputError(f"another lp job (pid {holder}) is writing {str(path)!r}; wait for it to end or choose "
                         "another --output") from None
    try:
        note.write_text(str(os.getpid()))
    except OSError:
        return None
    return note


def _noted_holder(note: Path) -> str:
    """The pid a job wrote into its lock note, or "unknown"."""
    try:
        return note.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _flock_holder(fd: int) -> str | None:
    """The pid holding a flock on fd's file, from /proc/locks (Linux), which names the file by device and inode:
    found whatever path, link or hard link the holder opened it by. None where /proc/locks does not say."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2343483 0 EOF"; a waiter's line has "->" in it
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            return fields[4]
    return None


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
