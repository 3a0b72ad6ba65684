"""The lp command line (launch/run.py): one program for python, torchrun, mpirun, srun and deepspeed.

stdout carries results only: streamed completions and a one-line summary, or with --json exactly one JSON
record per prompt. Logs, errors, the progress bar and (with --json or --input) the JSON summary go to stderr.
Exit status: 0 done (a batch job's failed records are error records in the output and counted in its summary); 1 a
--prompt failed or a peer rank died; 2 a usage mistake (nothing decoded); 3 a batch job (--input) ran to its end
but every one of its records ended in an error; 130 interrupted (rerun the same command to resume). torchrun turns
any non-zero status of its workers into 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import threading
import sys
import time
from pathlib import Path

import torch

from ..config import ConfigError, LookaheadConfig
from ..auto_tune import AutoDecoder, choose_for_batch
from ..batched_decoding import BatchedDecoder, Work
from ..decoding import Decoder, GenerationResult, PromptError, context_length, within_context
from ..distributed import bootstrap
from ..distributed.agreement import GroupAgreement
from ..distributed.bootstrap import BootstrapError, Launch
from ..distributed.parallel import (KV_SYNC, DivergenceError, ProcessGroupTeam, RankFailure, default_store,
                                    job_heartbeat)
from ..distributed.replicas import Layout, LayoutError, WorkQueue, replica_groups, split_world
from ..distributed.tensor_parallel import TensorParallelError, empty_model, make_team, plan_groups, shard_model
from ..greedy_rules import UnsupportedGenerationSetting, greedy_rules, hf_greedy
from .. import STARTED_BY, memory_file, named_models, step_cost
from ..sampling import reference_sample, sampling_settings
from . import batch, run_config
from .batch import InputError, Record
from .run_config import RunConfig

EXIT_USAGE, EXIT_FAILED, EXIT_RECORDS = 2, 1, 3


class UsageError(ValueError):
    """A user mistake found by the command line itself; the message says what to change."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: a scheduler's stop, or the launcher ending the job because another rank failed (`why` says which)."""

    why = ""


USER_ERRORS = (UsageError, ConfigError, PromptError, UnsupportedGenerationSetting, FileNotFoundError, InputError,
               batch.OutputError, TensorParallelError, LayoutError, memory_file.MemoryFileError,
               BootstrapError)
PEER_FAILURES = (RankFailure, DivergenceError)  # the group is broken or the ranks disagree: stop the job
RECORD_ERRORS = (PromptError, UnsupportedGenerationSetting)  # deterministic: every rank raises them alike


EPILOG = """settings: built-in defaults < --config FILE.yaml < --set key=value < the flags above.
output:   stdout gets the streamed completions and a one-line summary, or with --json one JSON record per
          prompt; logs, errors, the progress bar and (with --json or --input) a JSON summary go to stderr.
exit:     0 done (a batch job's failed records are error records in --output, counted in the summary), 1 a
          --prompt failed or a peer rank died, 2 a usage mistake (nothing was decoded), 3 a batch job ran to its
          end but every record ended in an error, 130 interrupted (rerun the same command to resume)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"lp: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch/run.py", description="Exact lookahead decoding of a Hugging Face causal LM, "
                "on one process or many (torchrun, mpirun, srun, deepspeed). With no arguments: the embedded "
                "default model on its built-in prompts.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub id, local model folder or a named model: smollm2-135m (its install line "
                   "is in the README) (default: the embedded code model)")
    p.add_argument("--config", metavar="FILE.yaml", help="run settings file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, dotted keys ok: --set lookahead.window=7 (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text (repeatable)")
    src.add_argument("--input", metavar="FILE.jsonl",
                     help="batch input, one {id, prompt | messages, max_new_tokens?} per line; bad lines become "
                     "error records")
    p.add_argument("--output", metavar="FILE.jsonl", help="append results here; rerun to resume (done ids skipped)")
    p.add_argument("--retry-errors", action="store_true", help="on resume, run again the records that ended in an "
                   "error (their new line follows the old one: the last line of an id wins)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--window", type=int, help="W: lookahead window width")
    p.add_argument("--ngram", type=int, help="N: n-gram size")
    p.add_argument("--guess", type=int, help="G: candidate n-grams verified per step")
    p.add_argument("--lookup", type=int, help="prompt-lookup candidates per step (fast path; default 2)")
    p.add_argument("--lookup-len", type=int, help="tokens per prompt-lookup candidate (fast path; default 10)")
    p.add_argument("--chain", type=int, help="continuations chained onto each pool candidate, up to the tree's depth "
                   "(fast path; default 2, 0: none)")
    p.add_argument("--budget", type=int, help="tokens the verification tree feeds per step (fast path; default "
                   "guess x (ngram - 1) on GPUs, half that on CPUs)")
    p.add_argument("--plain-steps", action=argparse.BooleanOptionalAction, default=None,
                   help="a step with no candidate to verify feeds only the last token, as greedy decoding does (fast "
                   "path, one rank, one sequence a forward; default: on CPUs, and where --guess is 0)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (> 0 turns sampling on; exact: "
                   "equal to a one-token-at-a-time sampler with the same --seed)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="sample within this probability mass (1 = off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the likeliest one's probability (0 = off)")
    p.add_argument("--greedy", action="store_true", default=None, help="decode greedily even if the model's "
                   "generation_config samples")
    p.add_argument("--kv-sync", choices=KV_SYNC, help="how ranks keep their KV caches equal")
    p.add_argument("--memory", choices=["job", "record"], help="job (default): what earlier records generated "
                   "becomes candidates for the later ones (fewer steps on jobs of one kind, the same tokens); "
                   "record: each record starts from its own prompt's n-grams alone")
    p.add_argument("--memory-tokens", type=int, metavar="N", help="tokens of the job's earlier texts that prompt "
                   "lookup also searches (fast path; default 8192 on CPUs, 262144 on GPUs; 0: none)")
    p.add_argument("--memory-file", metavar="PATH", help="start the job's memory from PATH if it exists and save it "
                   "there at the end (safetensors; refused if another tokenizer wrote it), so a job starts where an "
                   "earlier one of its kind ended")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the compiled fast path (static cache, fixed step shape, CUDA graphs on GPUs); default: on "
                   "CUDA, off on CPUs (self-tuning decides there); compiling takes seconds per cache-size bucket, "
                   "before the first step")
    p.add_argument("--auto-tune", action=argparse.BooleanOptionalAction, default=None,
                   help="lp picks W, N, G, the tree, plain steps and compile for this device, model and job (default "
                   "when no shape setting such as --window is given; one rank, one sequence a forward; --verbose "
                   "prints why)")
    p.add_argument("--tune", action="store_true", help="measure this device's step-cost curve for the model again, "
                   "print it, cache it for later runs, and exit")
    p.add_argument("--dtype", choices=run_config.DTYPES)
    p.add_argument("--device", help="auto, cpu, cuda (cuda:LOCAL_RANK per rank) or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", choices=run_config.BACKENDS, help="process group backend (auto: nccl with a GPU "
                   "per rank, else gloo)")
    p.add_argument("--fault-timeout", type=float, metavar="SECONDS", help="give up on a silent peer after this long")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks per replica (DeepSpeed AutoTP, pip install 'lp[deepspeed]'); "
                   "the world holds replicas x lp x tp ranks")
    p.add_argument("--lp", type=int, help="ranks per lookahead team, each a model copy splitting one step (default: "
                   "world size / (tp x replicas), one team); the world holds replicas x lp x tp ranks")
    p.add_argument("--replicas", type=int, help="independent lookahead teams draining one queue of prompts "
                   "(default: world size / (lp x tp))")
    p.add_argument("--batch-size", type=int, help="sequences each team decodes in one forward (batched lookahead "
                   "with continuous batching; default 1)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run a model's own Python code from the hub (off by default)")
    p.add_argument("--chat", action="store_true", default=None, help="wrap plain prompts in the chat template")
    p.add_argument("--compare-greedy", action="store_true",
                   help="also run transformers' greedy generate on rank 0, check equality, report the speedup")
    p.add_argument("--json", action="store_true", help="one JSON result per prompt on stdout, nothing else")
    p.add_argument("--verbose", action="store_true", help="keep library warnings")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed passes it; env wins
    return p


FLAG_KEYS = {"model": "model", "max_new_tokens": "max_new_tokens", "kv_sync": "kv_sync", "dtype": "dtype",
             "device": "device", "seed": "seed", "backend": "backend", "fault_timeout": "fault_timeout", "tp": "tp", "lp": "lp",
             "replicas": "replicas", "batch_size": "batch_size",
             "trust_remote_code": "trust_remote_code", "chat": "chat", "window": "lookahead.window",
             "ngram": "lookahead.ngram", "guess": "lookahead.guess", "compile": "lookahead.compile",
             "lookup": "lookahead.lookup", "lookup_len": "lookahead.lookup_len", "chain": "lookahead.chain",
             "budget": "lookahead.budget", "plain_steps": "lookahead.plain_steps",
             "temperature": "lookahead.temperature", "top_k": "lookahead.top_k", "top_p": "lookahead.top_p",
             "min_p": "lookahead.min_p", "memory": "lookahead.memory",
             "memory_tokens": "lookahead.memory_tokens", "memory_file": "memory_file",
             "auto_tune": "auto_tune"}


def resolve_config(args) -> RunConfig:
    """defaults < --config file < --set < dedicated flags."""
    values = run_config.load_yaml(args.config) if args.config else {}
    values = run_config.merge(values, run_config.parse_overrides(args.set))
    flags = {}
    if args.greedy or (args.temperature is not None and args.temperature > 0):  # sampling on or off by flag
        flags["lookahead"] = {"sample": not args.greedy}
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            *parent, leaf = key.split(".")
            (flags.setdefault(parent[0], {}) if parent else flags)[leaf] = value
    return run_config.build(run_config.merge(values, flags))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a record or peer failed, 2 a usage mistake)."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    rank0 = bootstrap.env_rank() == 0
    if argv is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop (scancel, kill) ends like Ctrl-C
    args.results = sys.stdout  # with --json, results go here and anything a library prints goes to stderr
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            code = _run(args, own_process=argv is None)
        if argv is None and torch.distributed.is_initialized():
            _leave(code)  # the group was left without tearing it down: skip the interpreter's teardown too
        return code
    except USER_ERRORS as exc:
        if isinstance(exc, batch.OutputError) and not rank0:  # this replica's own results file: say whose
            _error(f"rank {bootstrap.env_rank()}: {_one_line(exc)}")
        elif rank0 or isinstance(exc, BootstrapError):
            _error(exc)
        return EXIT_USAGE
    except PEER_FAILURES as exc:
        _error(exc)
        if argv is None:  # the command line's own process: leave without tearing down the broken group
            _leave(EXIT_FAILED, clean=False)
        return EXIT_FAILED
    except torch.distributed.DistError as exc:  # a store or group call after rank 0 (which hosts the store) left
        _error(f"rank {bootstrap.env_rank()}: lost contact with the other ranks ({_one_line(exc)[:120]}); "
               + ("the rendezvous store is gone" if rank0 else "rank 0 ended or failed: its message says why"))
        if argv is None:
            _leave(EXIT_FAILED, clean=False)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        if rank0:
            why = f" by the launcher after {exc.why}" if isinstance(exc, Terminated) and exc.why else ""
            _error("interrupted" + why + ("; rerun the same command to resume" if args.output else ""))
        return 130


def _interrupt(signum, frame) -> None:
    raise Terminated


def _leave(code: int, clean: bool = True) -> None:
    """Exit now, flushing our own streams: with several ranks, gloo's and the store's threads can abort the
    interpreter's teardown (SIGABRT after a successful job), so a team's process does not tear down at all."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if clean and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun counts a rank that skips MPI_Finalize as failed (not after a failure: it could wait)
    os._exit(code)


def _run(args, own_process: bool = False) -> int:
    cfg = resolve_config(args)  # same input on every rank, so every rank fails alike: no hang
    launch = bootstrap.detect()
    bootstrap.watch_launcher(launch, STARTED_BY)
    layout = split_world(launch.world_size, cfg.tp, cfg.lp, cfg.replicas)
    if layout.lp > cfg.lookahead.window:
        raise UsageError(f"{layout.lp} ranks per lookahead team but the window has {cfg.lookahead.window} columns to "
                         f"share; give each team at most {cfg.lookahead.window} (--lp), add --replicas, or raise "
                         "--window")
    if args.compare_greedy and layout.team_size > 1 and (layout.replicas > 1 or cfg.batch_size > 1):
        raise UsageError("--compare-greedy with --replicas or --batch-size needs teams of one rank: add --lp 1 "
                         "(and --tp 1)")
    backend = bootstrap.choose_backend(cfg.backend, launch)
    device = bootstrap.choose_device(cfg.device, backend, launch)
    if device.type == "cpu" and launch.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    torch.manual_seed(cfg.seed)
    bootstrap.init_process_group(launch, backend, cfg.fault_timeout)
    try:
        code = _serve(args, cfg, launch, device, layout)
    except (*PEER_FAILURES, torch.distributed.DistError):
        raise  # the group is broken: leave it alone
    except BaseException:
        bootstrap.shutdown()
        raise
    bootstrap.shutdown(clean=True, destroy=not own_process)  # every rank is past the barrier: nothing is in flight
    return code


def _serve(args, cfg: RunConfig, launch: Launch, device: torch.device, layout: Layout) -> int:
    rank0 = launch.rank == 0
    log = _logger(rank0)
    message, model, tokenizer, items, writer, skipped, memory = None, None, None, None, None, 0, None
    try:
        log(f"loading {cfg.model or 'the embedded default model'} ({launch.world_size} rank"
            f"{'s' if launch.world_size > 1 else ''}, {launch.launcher}, {device})")
        model, tokenizer = load_model(cfg, torch.device("cpu") if cfg.tp > 1 else device)  # sharded later
        memory = _MemoryFile(cfg, model, tokenizer)  # every rank reads it: the same n-grams, or the same error
        if rank0:
            if args.input and args.output and _same_file(args.input, args.output):
                raise batch.InputError(f"--input and --output are the same file ({args.output}); write the results "
                                       "to another file")
            records = _records(args)
            ignored = sorted({name for r in records for name in r.ignored})
            if ignored:
                log(f"ignoring field{'s' * (len(ignored) > 1)} {', '.join(map(repr, ignored))} of the input's records "
                    "(lp reads id, prompt or messages, max_new_tokens, seed)")
            writer = batch.JsonlWriter(args.output) if args.output else None  # locked before it is read
            if writer:
                batch.merge_shards(args.output)  # results a killed multi-replica run left in its shards
            done = batch.done_keys(args.output, args.retry_errors) if args.output else set()  # cuts a partial line
            done = done if args.input else set()  # --prompt ids (0, 1, ...) name nothing across runs: append
            todo = [r for r in records if r.key not in done]
            skipped = len(records) - len(todo)
            if skipped:
                log(f"resuming {args.output}: {skipped} records already done, {len(todo)} to go")
            items = [_prepare(r, tokenizer, cfg) for r in todo]
    except USER_ERRORS as exc:
        message = _one_line(exc)
    except Exception as exc:  # anything else too: the peers must hear of it, not wait for it (mpirun never times out)
        message = f"{type(exc).__name__}: {_one_line(exc)}"
    message = bootstrap.first_error(message, launch)
    if message:
        if writer:
            writer.close()
        raise UsageError(message)
    if args.tune:
        return _tune(model, cfg, launch, layout)
    args.stdout_taken = bool(writer and writer.to_stdout)  # records go to stdout: everything else to stderr
    # where the other replicas' results go: shard files beside a regular --output, else (a pipe, a device, this
    # process's stdout) to rank 0 at the end, which writes them itself
    shards = str(Path(os.path.realpath(args.output))) if writer and writer.regular and not writer.to_stdout else None
    items, args.shards = bootstrap.broadcast_json([items, shards], launch)
    decoder = _decoder(model, cfg, launch, layout, [item for item in items if item["error"] is None],
                       log if args.verbose else None)
    if hasattr(decoder, "notify"):
        decoder.notify = log
    if isinstance(decoder, AutoDecoder):
        if args.verbose:
            decoder.explain = log
    elif decoder.chosen_by != "auto":
        decoder.chosen_by = "user" if cfg.shape_given else "default"
    memory.start(decoder, log)
    try:
        if layout.replicas > 1 or cfg.batch_size > 1:
            code = _drain_queue(args, cfg, launch, layout, items, decoder, model, tokenizer, writer, skipped, memory)
        else:
            code = _decode_all(args, cfg, launch, items, decoder, model, tokenizer, writer, skipped)
        if rank0:
            memory.save(decoder, log)
        return code
    except Terminated as exc:  # torchrun stops a team when one of its ranks exits: rank 0 finds which and why
        if rank0 and not exc.why and layout.replicas == 1 and hasattr(decoder.team, "culprits"):
            exc.why = "; ".join(decoder.team.culprits())
        raise
    finally:
        if hasattr(decoder.team, "close"):
            decoder.team.close()


class _MemoryFile:
    """--memory-file: the job's memory read before the first record (every rank alike) and saved by rank 0 at the
    end; with replicas, what every replica learnt (each replica's first rank sends its memory with its results)."""

    def __init__(self, cfg: RunConfig, model, tokenizer):
        self.path = cfg.memory_file
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.stamp = memory_file.tokenizer_fingerprint(tokenizer, self.vocab) if self.path else ""
        self.grams = self.corpus = None
        if self.path and os.path.exists(self.path):
            ngram = None if _tunes(cfg) else cfg.lookahead.ngram  # self-tuning: each of its settings cuts its own
            self.grams, self.corpus = memory_file.load(self.path, self.stamp, self.vocab, ngram)

    def start(self, decoder, log) -> None:
        if self.grams is not None:
            decoder.remember_grams(self.grams)
            decoder.remember_corpus(self.corpus)
            log(f"starting from the memory in {self.path} ({len(self.grams)} n-grams, "
                f"{int((self.corpus >= 0).sum())} tokens of earlier texts)")

    def export(self, decoder) -> dict | None:
        """This replica's memory for rank 0 (None without --memory-file)."""
        if not self.path:
            return None
        return {"grams": memory_file.pack(decoder.memory_grams()), "corpus": memory_file.pack(decoder.memory_corpus())}

    def absorb(self, decoder, exported: dict | None) -> None:
        """Add another replica's memory to this decoder's, before `save` (its n-grams after this replica's own, and
        the texts of its corpus that this one lacks)."""
        if not self.path or not exported:
            return
        decoder.remember_grams(memory_file.unpack(exported["grams"]))
        decoder.remember_corpus(memory_file.new_texts(memory_file.unpack(exported["corpus"]), decoder.memory_corpus()))

    def save(self, decoder, log) -> None:
        if not self.path:
            return
        grams = decoder.memory_grams()
        if not len(grams) and self.grams is not None:
            grams = self.grams  # settings that keep no pool (G = 0) leave the file's n-grams as they were
        try:
            memory_file.save(self.path, grams, self.stamp, self.vocab, decoder.memory_corpus())
        except memory_file.MemoryFileError as exc:  # the results are written: say so, but the job did its work
            _error(exc)
            return
        log(f"saved the job's memory to {self.path} ({len(grams)} n-grams)")


def _decode_all(args, cfg: RunConfig, launch: Launch, items: list, decoder: Decoder, model, tokenizer, writer,
                skipped: int) -> int:
    rank0 = launch.rank == 0
    stream = rank0 and not args.json and args.output is None
    progress = _progress(len(items), enabled=rank0 and not stream)
    totals = batch.Totals(skipped=skipped)
    start = time.perf_counter()
    try:
        for n, item in enumerate(items, start=1):
            printer = _Printer(tokenizer, item["ids"]) if stream and item["ids"] else None
            if printer:
                print(f"--- prompt {n} of {len(items)} (id {_shown(item['id'])}) ---", flush=True)
                printer.start()
            result = _decode(item, decoder, tokenizer, printer, launch.world_size)
            if args.compare_greedy and "error" not in result:
                if launch.rank < cfg.tp:  # a sharded replica's generate is collective: all of replica 0 runs it
                    check = _greedy_check(model, item, result, cfg.lookahead)
                    if rank0:
                        result.update(check)
                bootstrap.release(launch)
            if not rank0:
                continue
            _record_result(result, totals, writer, args)
            if "error" in result:
                if printer:
                    print(flush=True)
                where = f"id {result['id']}: " if result["id"] is not None else ""
                progress.write(f"lp: error: {where}{result['error']}", file=sys.stderr)
            elif printer:
                printer.finish(_stats_line(result))
            progress.update(1)
            progress.set_postfix_str(f"{totals.tokens_per_second:.1f} tok/s", refresh=False)
    finally:
        progress.close()
        if writer:
            writer.close()
    if rank0:
        _report(dict(totals.summary(launch.world_size, time.perf_counter() - start), lookahead=decoder.settings()),
                args, cfg)
    return _exit_code(args, totals, launch)


def _report(summary: dict, args, cfg: RunConfig) -> None:
    """Rank 0's end of a run: the JSON summary on stderr (with --json or --input) and the summary line."""
    if args.json or args.input:
        print(json.dumps({"summary": summary}), file=sys.stderr, flush=True)
    if not args.json:
        print(_summary_line(summary, cfg), flush=True, file=sys.stderr if getattr(args, "stdout_taken", False)
              else sys.stdout)


def _exit_code(args, totals: batch.Totals, launch: Launch) -> int:
    """Rank 0 counts the records (every rank exits alike): a --prompt that failed is 1; a batch job is 3 when it ran
    to its end and every record of this run ended in an error (wrong input, a model that takes none of it: nothing
    useful came out), else 0, its failed records being error records in the output and counted in the summary."""
    failed, ran = bootstrap.broadcast_json([totals.errors, totals.records] if launch.rank == 0 else None, launch)
    if not args.input:
        return EXIT_FAILED if failed else 0
    return EXIT_RECORDS if ran and failed == ran else 0


def _records(args) -> list[Record]:
    if args.input:
        return batch.read_records(args.input)
    if args.prompt:
        if not all(args.prompt):
            raise UsageError("--prompt must be non-empty text, as must a record's \"prompt\"")
        return batch.prompt_records(args.prompt)
    from ..default_model import DEFAULT_PROMPTS

    return batch.prompt_records(list(DEFAULT_PROMPTS))


def _prepare(record: Record, tokenizer, cfg: RunConfig) -> dict:
    """The JSON work item every rank decodes: prompt token ids and budget, or the record's error."""
    item = {"key": record.key, "id": record.id, "line": record.line, "ids": None,
            "max_new_tokens": record.max_new_tokens or cfg.max_new_tokens, "error": record.error,
            "seed": cfg.lookahead.seed if record.seed is None else record.seed}
    if record.error is None:
        try:
            item["ids"] = batch.prompt_ids(record, tokenizer, cfg.chat)
        except Exception as exc:  # a broken chat template or tokenizer: this record fails, the job goes on
            item["error"] = f"cannot build the prompt: {_one_line(exc)}"
        else:
            if not item["ids"]:
                item["error"] = "the prompt encodes to no tokens; give a non-empty prompt"
    return item


def _decode(item: dict, decoder: Decoder, tokenizer, printer, world_size: int) -> dict:
    """Decode one work item (every rank); returns its result record."""
    record = Record(item["key"], item["id"], item["line"])
    if item["error"]:
        return record.error_result(item["error"])
    try:
        res = decoder.generate(item["ids"], item["max_new_tokens"], on_tokens=printer, seed=item["seed"])
    except RECORD_ERRORS as exc:
        return record.error_result(_one_line(exc))
    except Exception as exc:
        if world_size > 1 or isinstance(exc, PEER_FAILURES):
            raise  # the ranks may now disagree: stop the job rather than guess
        return record.error_result(f"{type(exc).__name__}: {_one_line(exc)}")
    return _result(item, res, tokenizer, decoder)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _result(item: dict, res: GenerationResult, tokenizer, decoder: Decoder) -> dict:
    s = res.summary()
    return {"id": item["id"], "text": completion_text(tokenizer, item["ids"], res.token_ids),
            "token_ids": res.token_ids, "new_tokens": s["new_tokens"], "steps": s["steps"],
            "tokens_per_step": s["tokens_per_step"], "latency_s": s["latency_s"],
            "tokens_per_second": s["tokens_per_second"], "prompt_tokens": res.prompt_tokens,
            "stop_reason": s["stop_reason"], "ranks": s["ranks"], "compiled": s["compiled"],
            "compile_time_s": s["compile_time_s"], "lookahead": decoder.settings()}


def completion_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add after the prompt (decoded together, so leading spaces survive)."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    after = tokenizer.decode(prompt + new, skip_special_tokens=True)
    return after[len(before):] if after.startswith(before) else tokenizer.decode(new, skip_special_tokens=True)


def _greedy_check(model, item: dict, result: dict, lookahead) -> dict:
    """transformers' generate(do_sample=False) on the same prompt and budget (when sampling: the plain sampler, one
    token per forward, same seed): equal tokens, and how much slower."""
    device = next(model.parameters()).device
    budget = item["max_new_tokens"] if result["stop_reason"] == "eos" else result["new_tokens"]
    sampling = sampling_settings(model.generation_config, lookahead)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if sampling is None:
        greedy = hf_greedy(model, item["ids"], budget)  # host ids: the device has finished when it returns
    else:
        rules = greedy_rules(model.generation_config, len(item["ids"]), budget)
        greedy = reference_sample(model, item["ids"], budget, sampling, item["seed"], rules)
    seconds = time.perf_counter() - start
    return {"greedy_match": greedy == result["token_ids"], "greedy_latency_s": round(seconds, 6),
            "speedup": round(seconds / result["latency_s"], 3) if result["latency_s"] > 0 else 0.0}


def load_model(cfg: RunConfig, device: torch.device):
    """(model, tokenizer) in eval mode on `device`; a one-line UsageError when the model cannot be found."""
    dtype = _dtype(cfg.dtype, device)
    if cfg.model is None:
        try:
            from ..default_model import DEFAULT_MODEL_PATH, load_default_model
        except ImportError:
            raise UsageError("the embedded default model is not installed; pass --model") from None
        if not (Path(DEFAULT_MODEL_PATH) / "config.json").exists():
            raise UsageError(f"the embedded default model is missing from {DEFAULT_MODEL_PATH}; "
                             "reinstall lp or pass --model")
        return _adjust(load_default_model(dtype, device), cfg)
    if cfg.model in named_models.NAMED:  # a real model shipped by an optional package (the name wins over a path)
        try:
            return _adjust(named_models.load(cfg.model, dtype, device), cfg)
        except named_models.NamedModelMissing as exc:
            raise UsageError(str(exc)) from None
    source = Path(cfg.model).expanduser()
    if not source.exists():
        if _looks_like_path(cfg.model):
            raise UsageError(f"model path {cfg.model!r} does not exist; pass --model a local Hugging Face model "
                             "folder or a hub id such as Qwen/Qwen2.5-Coder-7B-Instruct")
        source = cfg.model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = cfg.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust)
        if cfg.tp > 1:  # parameters on the meta device: shard_model reads only this rank's slices
            model = _empty_model(source, dtype, trust)
            if model is not None:
                return _adjust((model, tokenizer), cfg)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise UsageError(f"model {cfg.model!r} ships its own Python code, which lp does not run unless asked; "
                             "pass --trust-remote-code if you trust it") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
        hint = "" if isinstance(source, Path) else (
            f" (not in the local Hugging Face cache, and lp runs offline: fetch it first with `huggingface-cli "
            f"download {cfg.model}`, or set HF_HUB_OFFLINE=0)" if offline else " (is the hub reachable?)")
        raise UsageError(f"cannot load model {cfg.model!r}{hint}: {_one_line(exc)}") from None
    return _adjust((model.to(device).eval(), tokenizer), cfg)


def _empty_model(source, dtype: torch.dtype, trust: bool):
    """The model of a safetensors checkpoint (a folder, or a hub id's snapshot) with its parameters on the meta
    device, so a tensor-parallel rank never holds the whole model; None for other checkpoints (loaded whole)."""
    folder = source
    if not isinstance(source, Path):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.py"]))
        except Exception:  # noqa: BLE001 - whatever the hub says, from_pretrained gives the clearer error
            return None
    return empty_model(folder, dtype, trust_remote_code=trust)


def _adjust(loaded, cfg: RunConfig):
    """Apply the config's generation overrides, then refuse settings greedy lookahead cannot reproduce, up front."""
    model, tokenizer = loaded
    for key, value in cfg.generation.items():
        setattr(model.generation_config, key, value)
    try:
        greedy_rules(model.generation_config, 1, cfg.max_new_tokens)
    except UnsupportedGenerationSetting as exc:
        raise UsageError(f"{_one_line(exc)}; from the command line: --set generation.<setting>=<value>") from None
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def _tune(model, cfg: RunConfig, launch: Launch, layout: Layout) -> int:
    """--tune: measure the step-cost curve again (cached for later runs) and print it; with --tp, of the sharded
    forward, which each replica's ranks time together."""
    agree = None
    if cfg.tp > 1:
        plan = plan_groups(launch.world_size, cfg.tp, layout.lp, layout.replicas)
        model = shard_model(model, plan.tp_group, plan.tp)
        agree = GroupAgreement(replica_groups(layout)[layout.replica_of(launch.rank)])
    key, curve = step_cost.step_costs(model, refresh=True, agree=agree, shards=cfg.tp)
    if launch.rank == 0:
        print(f"step cost of one forward on {step_cost.device_name(next(model.parameters()).device)} (cache "
              f"{step_cost.CostStore().path}, key {key}):")
        for fed, seconds in sorted(curve.points.items()):
            print(f"  {fed:5d} tokens fed: {1e3 * seconds:9.3f} ms ({seconds / curve.points[min(curve.points)]:.2f}x "
                  "one token)")
        for arm, seen in sorted(curve.observed.items()):
            print(f"  observed {arm}: {seen}")
    return 0


def engine_settings(cfg: RunConfig) -> LookaheadConfig:
    """The lookahead settings as the decoder gets them: a sharded replica (--tp) stays eager unless compile is asked
    for (the compiled step has not run with DeepSpeed's collectives inside the forward), whatever the device's
    default."""
    if cfg.tp > 1 and cfg.lookahead.compile is None:
        return dataclasses.replace(cfg.lookahead, compile=False)
    return cfg.lookahead


def _tunes(cfg: RunConfig) -> bool:
    """Whether this run's settings tune themselves (no shape setting given). One sequence a forward tunes per record,
    a batch once for its job; a sharded replica's ranks time their collective forward together and follow the
    replica's first rank."""
    return cfg.chosen_by == "auto"


def _decoder(model, cfg: RunConfig, launch: Launch, layout: Layout, items: list, explain=None) -> Decoder:
    """This rank's decoder in its replica's team (every rank makes every process group, in the same order). A batch
    has no more lanes than there are records to decode (an idle lane would still compute every step). With
    auto_tune and an unsharded model: one sequence a forward gets a self-tuning decoder (rank 0 of a team chooses
    for it) for this replica's share of the job's tokens; a batch, the setting that share is cheapest with at its
    lanes (`explain`, with --verbose, hears the figures)."""
    records = len(items)
    team = agree = None
    replica = layout.replica_of(launch.rank)
    if cfg.tp > 1:  # DeepSpeed AutoTP inside each model copy, lookahead exchange between a team's copies
        plan = plan_groups(launch.world_size, cfg.tp, layout.lp, layout.replicas)
        model = shard_model(model, plan.tp_group, plan.tp)
        team = make_team(cfg.kv_sync, plan, cfg.fault_timeout)
        if _tunes(cfg):  # every rank makes every replica's group, in the same order
            agree = GroupAgreement(replica_groups(layout)[replica])
    elif layout.replicas == 1 and launch.world_size > 1:
        team = ProcessGroupTeam(kv_sync=cfg.kv_sync, fault_timeout_s=cfg.fault_timeout, mpi_comm=launch.mpi_comm)
    elif layout.lp > 1:  # one group per replica; heartbeats under each replica's own store prefix
        groups = [torch.distributed.new_group(layout.ranks_of(r)) for r in range(layout.replicas)]
        store = default_store()
        store = torch.distributed.PrefixStore(f"lp-team{replica}", store) if store is not None else None
        team = ProcessGroupTeam(kv_sync=cfg.kv_sync, group=groups[replica], fault_timeout_s=cfg.fault_timeout,
                                store=store)
    lookahead = engine_settings(cfg)
    try:
        share = _job_tokens(items, model) // layout.replicas
        if cfg.batch_size > 1:
            lanes = max(1, min(cfg.batch_size, -(-records // layout.replicas)))
            if not _tunes(cfg):
                compiled = lookahead.compiled_on(next(model.parameters()).device.type)
                return BatchedDecoder(model, lookahead, lanes, team, compile=compiled)
            arm, chooser = choose_for_batch(model, lookahead, lanes, share, team, agree=agree, shards=cfg.tp)
            if explain is not None:
                explain(f"self-tuning a batch of {lanes}, {share} tokens to go: {chooser.why(share)}")
            decoder = BatchedDecoder(model, arm.config(lookahead), lanes, team, compile=arm.compiled)
            decoder.chosen_by, decoder.arm = "auto", arm.name
            return decoder
        if _tunes(cfg):
            return AutoDecoder(model, lookahead, job_tokens=share, team=team, agree=agree, shards=cfg.tp)
        return Decoder(model, lookahead, team=team)
    except ValueError as exc:  # encoder-decoder or sliding-window models: the same answer on every rank
        raise UsageError(_one_line(exc)) from None


def _job_tokens(items: list, model) -> int:
    """The new tokens the items may make: each budget within the room its prompt leaves in the model's context (a
    budget of 10**30 is decoded to the context, and must not have the tuner expect, and compile for, that many)."""
    context = context_length(model.config)
    return sum(within_context(item["max_new_tokens"], len(item["ids"]), context) for item in items)


def _drain_queue(args, cfg: RunConfig, launch: Launch, layout: Layout, items: list, decoder, model, tokenizer,
                 writer, skipped: int, memory: "_MemoryFile") -> int:
    """Replicas and batches: each replica claims items from one queue; its first rank writes its results (rank 0
    to --output, the others to shard files merged into it at the end) and sends its memory to rank 0 with its
    totals (--memory-file); rank 0 shows progress and the summary for all replicas."""
    replica = layout.replica_of(launch.rank)
    leader = launch.rank == layout.ranks_of(replica)[0]
    rank0 = launch.rank == 0
    store = default_store() if launch.world_size > 1 else None
    queue = WorkQueue(len(items), layout, launch.rank, replica_groups(layout)[replica], store,
                      key=bootstrap.next_tag("queue"))
    if leader and not rank0 and args.output:
        writer = batch.JsonlWriter(batch.shard_path(args.shards, replica), lock=False) if args.shards else _Lines()
    progress = _progress(len(items), enabled=rank0 and bool(args.json or args.output))
    totals = batch.Totals(skipped=skipped if rank0 else 0)
    done_key = bootstrap.next_tag("done")
    alive = job_heartbeat(launch.rank, launch.world_size, cfg.fault_timeout)  # rank 0 waits for them at the end
    start = time.perf_counter()
    for item in items:  # a prompt the decoder cannot take (too long, ...) is that record's error, as one at a time
        item["error"] = item["error"] or _prompt_error(decoder, item)

    def handle(item: dict, result: dict) -> None:
        if args.compare_greedy and "error" not in result:
            result.update(_greedy_check(model, item, result, cfg.lookahead))
        if not leader:
            return
        _record_result(result, totals, writer, args)
        if not args.json and not args.output:
            _print_block(item, result, tokenizer, replica if layout.replicas > 1 else None)
        if "error" in result:
            where = f"id {result['id']}: " if result["id"] is not None else ""
            progress.write(f"lp: error: {where}{result['error']}", file=sys.stderr)
        finished = store.add(done_key, 1) if store is not None else totals.records
        if rank0:
            progress.update(finished - progress.n)
            progress.set_postfix_str(f"{totals.tokens_per_second:.1f} tok/s (this replica)", refresh=False)

    def next_item() -> int | None:
        """The next claimed item that has a prompt the decoder takes; the others are reported on the way."""
        while (index := queue.claim()) is not None:
            item = items[index]
            if item["error"] is None:
                return index
            handle(item, Record(item["key"], item["id"], item["line"]).error_result(item["error"]))
        return None

    try:
        if isinstance(decoder, BatchedDecoder):
            def source():
                index = next_item()
                return None if index is None else Work(index, items[index]["ids"], items[index]["max_new_tokens"],
                                                       items[index]["seed"])

            longest = max((len(i["ids"]) + decoder.limit(i["ids"], i["max_new_tokens"]) for i in items
                           if i["error"] is None), default=1)
            decoder.decode(source, lambda index, res: handle(items[index], _result(items[index], res, tokenizer, decoder)),
                           longest)
        else:
            while (index := next_item()) is not None:
                handle(items[index], _decode(items[index], decoder, tokenizer, None, layout.team_size))
    except BaseException as exc:
        progress.close()
        if writer:
            writer.close()
        if alive:
            _explain_stop(exc, alive, rank0)
            alive.stop()
        raise
    if writer and not rank0:
        writer.close()
    lines = writer.lines if isinstance(writer, _Lines) else []
    try:  # rank 0 holds --output (and its lock) until every replica's results are in it
        mine = memory.export(decoder) if leader and not rank0 else None
        reports = bootstrap.gather_json(dict(totals=totals.as_dict(), lines=lines, memory=mine) if leader else None,
                                        launch, alive=alive)
        if rank0:
            if args.shards:
                batch.merge_shards(args.shards)
            for report in reports[1:]:
                if report is not None:
                    totals.merge(report["totals"])
                    for line in report["lines"]:
                        writer.write(line)
                    memory.absorb(decoder, report["memory"])
            progress.update(totals.records - progress.n)
    except BaseException as exc:  # rank 0 waiting for the others may be stopped by torchrun too
        if alive:
            _explain_stop(exc, alive, rank0)
        raise
    finally:
        progress.close()
        if writer and rank0:
            writer.close()
        if alive:
            alive.stop()
    if rank0:
        summary = totals.summary(launch.world_size, time.perf_counter() - start)
        wall = summary["wall_s"]
        summary.update(replicas=layout.replicas, batch_size=cfg.batch_size, lookahead=decoder.settings(),
                       throughput_tokens_per_second=round(summary["new_tokens"] / wall, 3) if wall > 0 else 0.0,
                       prompts_per_second=round(summary["ok"] / wall, 3) if wall > 0 else 0.0)
        _report(summary, args, cfg)
    return _exit_code(args, totals, launch)


def _explain_stop(exc: BaseException, alive, rank0: bool) -> None:
    """A replica job's rank stops on `exc`: rank 0 stopped by torchrun (which ends the job when a rank exits) finds
    which rank failed and why; a rank failing itself tells rank 0, which the launcher is about to stop."""
    if isinstance(exc, Terminated) and rank0:
        exc.why = "; ".join(alive.culprits(wait=True))
    elif not isinstance(exc, KeyboardInterrupt):
        cause = _one_line(exc).split("; ")[0]  # what went wrong, not what to do about it
        alive.report(cause if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {cause}")


class _Lines:
    """A replica's results when --output is not a regular file (a pipe, a device, stdout): kept for rank 0, which
    writes them there at the end (no shard file beside a pipe; across nodes no file is shared)."""

    def __init__(self):
        self.lines: list[dict] = []

    def write(self, record: dict) -> None:
        self.lines.append(record)

    def close(self) -> None:
        return None


def _prompt_error(decoder, item: dict) -> str | None:
    """Why the decoder cannot take this item's prompt (too long for the context, ...), or None."""
    try:
        decoder.check_prompt(item["ids"])
    except RECORD_ERRORS as exc:
        return _one_line(exc)
    return None


def _record_result(result: dict, totals: batch.Totals, writer, args) -> None:
    """Count a result, append it to --output, and with --json print it on stdout."""
    totals.add(result)
    if writer:
        writer.write(result)
    if args.json and not getattr(args, "stdout_taken", False):  # with --output /dev/stdout the writer prints it
        args.results.write(batch.json_line(result).decode("utf-8", "surrogateescape"))
        args.results.flush()


def _print_block(item: dict, result: dict, tokenizer, replica: int | None) -> None:
    """A whole completion at once (replicas and batches finish out of order, so nothing streams token by token)."""
    where = f", replica {replica}" if replica is not None else ""
    text = tokenizer.decode(item["ids"], skip_special_tokens=True) + result.get("text", "") if item["ids"] else ""
    body = f"lp: error: {result['error']}" if "error" in result else f"{text}\n({_stats_line(result)})"
    print(f"--- id {_shown(item['id'])}{where} ---\n{body}", flush=True)


def _shown(value) -> str:
    """An id as text for the terminal: as is, or JSON-escaped when it holds what UTF-8 cannot encode."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


class _Printer:
    """Streams a completion to stdout: decode the growing sequence, print what is new."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer, self.ids = tokenizer, list(prompt)
        self.shown = tokenizer.decode(self.ids, skip_special_tokens=True)

    def start(self) -> None:
        sys.stdout.write(self.shown)
        sys.stdout.flush()

    def __call__(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # half a character, or the tokenizer rewrote the past: wait for more
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def finish(self, stats: str) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
        sys.stdout.write(f"\n({stats})\n")
        sys.stdout.flush()


def _stats_line(r: dict) -> str:
    line = (f"{r['new_tokens']} new tokens, {r['steps']} steps, {r['tokens_per_step']:.2f} tokens/step, "
            f"{r['tokens_per_second']:.1f} tokens/s, {r['ranks']} rank{'s' if r['ranks'] > 1 else ''}")
    if "greedy_match" in r:
        line += f"; greedy match: {'yes' if r['greedy_match'] else 'NO'}, speedup {r['speedup']:.2f}x"
    return line


def _summary_line(s: dict, cfg: RunConfig) -> str:
    la = s.get("lookahead") or dict(window=cfg.lookahead.window, ngram=cfg.lookahead.ngram, guess=cfg.lookahead.guess)
    line = (f"lp: {s['ok']} of {s['records']} prompts, {s['new_tokens']} new tokens, {s['steps']} steps, "
            f"{s['tokens_per_step']:.2f} tokens/step, {s['tokens_per_second']:.1f} tokens/s, {s['ranks']} rank"
            f"{'s' if s['ranks'] > 1 else ''} (W={la['window']} N={la['ngram']} G={la['guess']}"
            f"{', compiled' if s.get('compiled') else ''}{', self-tuned' if la.get('chosen_by') == 'auto' else ''})")
    if "throughput_tokens_per_second" in s:  # sequences overlap: the job's rate is its tokens over its wall time
        line += (f"; {s['replicas']} replica{'s' * (s['replicas'] > 1)} x batch {s['batch_size']}: "
                 f"{s['throughput_tokens_per_second']:.1f} tokens/s and {s['prompts_per_second']:.2f} prompts/s "
                 f"over {s['wall_s']:.1f} s")
    if s.get("compile_time_s"):
        job_rate = ", but in the job rate" if "throughput_tokens_per_second" in s else ""
        line += f"; compiling took {s['compile_time_s']:.1f} s (not in tokens/s{job_rate})"
    if "greedy_match" in s:
        line += f"; greedy match: {'yes' if s['greedy_match'] else 'NO'}, speedup {s['speedup']:.2f}x"
    return line


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="rec", disable=not enabled or total == 0, dynamic_ncols=True)


def _logger(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(f"lp: {message}", file=sys.stderr, flush=True)
    return log


def _error(exc) -> None:
    print(f"lp: error: {_one_line(exc)}", file=sys.stderr, flush=True)


def _one_line(exc) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = text.strip("'")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"file {exc.filename!r} does not exist; check the path"
    return text.splitlines()[0] if text else type(exc).__name__




def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging as std_logging

    # DeepSpeed logs to stdout (its accelerator detection warns once transformers imports it through accelerate)
    std_logging.getLogger("DeepSpeed").setLevel(std_logging.ERROR)
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
