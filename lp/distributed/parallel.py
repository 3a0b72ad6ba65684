"""Lookahead parallelism: the ranks of a process group decode one sequence together.

Every rank holds a full model replica and feeds its own slice of the window columns and candidates
(lp.distributed.partition). After each step one all-gather of a fixed-shape int64 vector per rank tells everyone
each rank's accepted run, its window outputs and a state fingerprint; the longest run wins, ties to
the lowest rank, so all ranks commit the same tokens and update identical n-gram pools. The winner's
KV entries then reach the others by recomputation (tokens only) or by a broadcast of a fixed-size
buffer (bit-identical caches).
"""
from __future__ import annotations

import datetime
import threading
import time
from typing import Sequence

import torch
import torch.distributed as dist

from .partition import Slice
from .team import Agreement, CommStats

KV_SYNC = ("recompute", "gather")
STORE_UNREACHABLE = "rank 0 (which hosts the rendezvous store) is unreachable: it died or hung"


class RankFailure(RuntimeError):
    """A peer rank failed or stopped answering; the message names it."""


class DivergenceError(RuntimeError):
    """Ranks no longer hold the same committed tokens, window or pool: continuing would give wrong output."""


class ProcessGroupTeam:
    """One rank of a lookahead-parallel team over an initialised torch.distributed process group."""

    def __init__(self, kv_sync: str = "recompute", group=None, fault_timeout_s: float = 60.0, mpi_comm=None,
                 store=None):
        if kv_sync not in KV_SYNC:
            raise ValueError(f"kv_sync must be one of {', '.join(KV_SYNC)}, got {kv_sync!r}")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun/mpirun/srun or call "
                               "torch.distributed.init_process_group first")
        self.kv_sync = kv_sync
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.mpi_comm = mpi_comm
        self.fault_timeout_s = fault_timeout_s
        self.comm = CommStats()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self._slots = (0, 0)
        self._table: torch.Tensor | None = None
        self._heartbeat = _Heartbeat(store if store is not None else default_store(), self.rank, self.size,
                                     fault_timeout_s)

    # -- per-generation setup ---------------------------------------------------------------------------

    def begin(self, ngram: int, width: int) -> None:
        """Fix the exchange's shape for one generation: [count, N accepted, W window outputs, fingerprint]."""
        self._slots = (ngram, width)
        self.comm = CommStats()

    # -- the per-step exchange --------------------------------------------------------------------------

    def agree(self, accepted: list[int], top: list[int], slices: Sequence[Slice], state_hash: int) -> Agreement:
        ngram, width = self._slots
        row = torch.zeros(2 + ngram + width, dtype=torch.int64)
        row[0] = len(accepted)
        row[1 : 1 + len(accepted)] = torch.tensor(accepted, dtype=torch.int64)
        if top:
            row[1 + ngram : 1 + ngram + len(top)] = torch.tensor(top, dtype=torch.int64)
        row[-1] = state_hash
        start = time.perf_counter()
        table = self._all_gather(row)
        self.comm.seconds.append(time.perf_counter() - start)
        self.comm.bytes.append(table.numel() * 8)

        hashes = table[:, -1]
        if not bool((hashes == hashes[0]).all()):
            bad = [r for r in range(self.size) if hashes[r] != hashes[0]]
            raise DivergenceError(f"ranks {bad} disagree with rank 0 on the committed tokens/window/pool; "
                                  "the replicas are not identical (same model, dtype and config on every rank?)")
        counts = table[:, 0]
        winner = int(torch.argmax(counts))  # first maximum: ties go to the lowest rank
        chosen = table[winner, 1 : 1 + int(counts[winner])].tolist()
        full_top: list[int] = []
        for r, s in enumerate(slices):
            full_top += table[r, 1 + ngram : 1 + ngram + s.columns].tolist()
        return Agreement(chosen, winner, full_top)

    def share_kv(self, cache, start: int, count: int, winner: int) -> None:
        """Broadcast the winner's cache entries [start, start+count) in one fixed-size buffer (N slots)."""
        ngram, _ = self._slots
        layers = cache.layers
        k0, v0 = layers[0]._k, layers[0]._v
        b, h, _, dk = k0.shape
        # keys and values side by side in the last dimension: their head sizes may differ
        buffer = torch.empty(len(layers), b, h, ngram, dk + v0.shape[-1], dtype=k0.dtype, device=k0.device)
        if self.rank == winner:
            for i, layer in enumerate(layers):
                keys, values = layer.entries(start, count)
                buffer[i, :, :, :count, :dk] = keys
                buffer[i, :, :, :count, dk:] = values
        began = time.perf_counter()
        self._collective(lambda: dist.broadcast(buffer, src=self._global(winner), group=self.group),
                         "broadcast of KV entries", sink=buffer)
        self.comm.seconds[-1] += time.perf_counter() - began
        self.comm.bytes[-1] += buffer.numel() * buffer.element_size()
        if self.rank != winner:
            for i, layer in enumerate(layers):
                layer.write(start, buffer[i, :, :, :count, :dk], buffer[i, :, :, :count, dk:])

    # -- the fast path's exchange: fixed-shape device tensors, no host round-trip -------------------------

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """All-gather one int64 row per rank into a preallocated [ranks, len(row)] table (one collective)."""
        if self._table is None or self._table.numel() != self.size * row.numel() or self._table.device != row.device:
            self._table = torch.empty(self.size * row.numel(), dtype=torch.int64, device=row.device)
        start = time.perf_counter()
        if self.mpi_comm is not None:  # MPI moves host buffers
            host = torch.empty(self.size * row.numel(), dtype=torch.int64)
            self._collective(lambda: self._mpi_allgather(row.cpu().numpy(), host.numpy()), "MPI all-gather")
            self._table.copy_(host)
        else:
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
            self._collective(lambda: gather(self._table, row, group=self.group), "all-gather of step results")
        self.comm.seconds.append(time.perf_counter() - start)
        self.comm.bytes.append(self._table.numel() * 8)
        return self._table.view(self.size, row.numel())

    def sum_kv(self, buffer: torch.Tensor) -> None:
        """Sum a fixed-shape KV buffer over the ranks in place: only the winner's entries are non-zero, so every
        rank ends with the winner's entries, bit for bit, without the host knowing who won."""
        start = time.perf_counter()
        self._collective(lambda: dist.all_reduce(buffer, group=self.group), "all-reduce of KV entries")
        self.comm.seconds[-1] += time.perf_counter() - start
        self.comm.bytes[-1] += buffer.numel() * buffer.element_size()

    def pick(self, value: int) -> int:
        """Rank 0's `value`, on every rank (one small all-gather): a choice the ranks must share, such as the
        setting a self-tuning team runs next (lp.auto_tune), made from rank 0's own measurements."""
        return int(self._all_gather(torch.tensor([value], dtype=torch.int64))[0, 0])

    def culprits(self) -> list[str]:
        """The peers that failed or stopped, giving one that just died a moment to be seen stale (ranks of this
        team's group)."""
        return self._heartbeat.culprits(wait=True)

    def report_failure(self, message: str) -> None:
        """Tell the peers (through the store) why this rank is about to stop."""
        self._heartbeat.report(message)

    def close(self) -> None:
        self._heartbeat.stop()

    # -- plumbing ---------------------------------------------------------------------------------------

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _all_gather(self, row: torch.Tensor) -> torch.Tensor:
        if self.mpi_comm is not None:
            table = torch.empty(self.size, row.numel(), dtype=torch.int64)
            self._collective(lambda: self._mpi_allgather(row.numpy(), table.numpy()), "MPI all-gather")
            return table
        send = row.to(self.device)
        parts = [torch.empty_like(send) for _ in range(self.size)]
        table = []
        # the copy to the host is where an asynchronous NCCL failure surfaces: keep it inside the guard
        self._collective(lambda: (dist.all_gather(parts, send, group=self.group),
                                  table.append(torch.stack(parts).cpu())), "all-gather of step results")
        return table[0]

    def _mpi_allgather(self, send, receive) -> None:
        """MPI's blocking collectives never time out: start a non-blocking one and give up after the fault timeout."""
        request = self.mpi_comm.Iallgather(send, receive)
        deadline, pause = time.monotonic() + self.fault_timeout_s, 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer within --fault-timeout {self.fault_timeout_s:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _collective(self, op, what: str, sink: torch.Tensor | None = None) -> None:
        try:
            op()
            if sink is not None and sink.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
        except Exception as error:  # a dead or stuck peer surfaces here as a gloo/NCCL/MPI error or timeout
            message = self._heartbeat.diagnose(what, error)
            if dist.get_rank() == 0:  # rank 0 may host the store: stay until the live peers have read it too
                self._heartbeat.linger()
            raise RankFailure(message) from error


def job_heartbeat(rank: int, size: int, timeout_s: float):
    """Every rank of the job stamps the store (replicas have no team to watch them), so a wait for all of them can
    name one that stopped (lp.distributed.bootstrap.gather_json); None for one rank or without a store."""
    store = default_store()
    if store is None or size <= 1:
        return None
    return _Heartbeat(dist.PrefixStore("lp-job", store), rank, size, timeout_s)


def default_store():
    """The default process group's rendezvous store, or None when it has none."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store (e.g. an MPI-initialised group): failures are reported without rank names
        return None


class _Heartbeat:
    """Each rank stamps the store every few seconds and watches the others' stamps, so when a collective fails the
    culprit is known at once: a peer that reported a failure, never started, or whose stamp stopped moving."""

    def __init__(self, store, rank: int, size: int, timeout_s: float):
        self.store, self.rank, self.size, self.timeout_s = store, rank, size, timeout_s
        self.period = max(0.2, min(2.0, timeout_s / 6))
        self._beats = 0  # a counter, not a wall-clock time: the hosts' clocks need not agree
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (its last counter, when it last changed, here)
        self._gone: set[int] = set()  # peers a diagnosis blamed: nobody waits for them any more
        self._lock = threading.Lock()  # _seen is written by the watching thread and by a diagnosis
        self._contact = time.monotonic()  # when this rank last reached the store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store is None:
            return
        self.store = dist.PrefixStore("lp-heartbeat", store)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="lp-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"alive/{self.rank}", str(self._beats))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._beat()
                self._watch()
                self._contact = time.monotonic()
            except Exception:
                return  # the store host is gone; the next collective will fail and be diagnosed

    def _watch(self) -> None:
        """Note every started peer's counter (one round trip), so staleness is known before anyone asks."""
        peers = [r for r in range(self.size) if r != self.rank]
        keys = [f"alive/{r}" for r in peers]
        if not peers or not self.store.check(keys):  # a peer not started yet: a diagnosis says so
            return
        multi_get = getattr(self.store, "multi_get", None)
        values = multi_get(keys) if multi_get else [self.store.get(key) for key in keys]
        now = time.monotonic()
        for r, beats in zip(peers, values):
            self._stale(r, beats.decode(), now)

    def _stale(self, peer: int, beats: str, now: float, silent_s: float | None = None) -> bool:
        """Note `peer`'s counter as read now; whether it has not moved for `silent_s` seconds (default 2.5 beats)
        of this host's own clock."""
        with self._lock:
            last = self._seen.get(peer)
            if last is None or last[0] != beats:
                self._seen[peer] = (beats, now)
                return False
            return now - last[1] > (2.5 * self.period if silent_s is None else silent_s)

    def _store_lost(self) -> bool:
        """Whether this rank's own stamps stopped reaching the store: its host (rank 0 under mpirun or srun) died or
        hung, and any store call would wait on it."""
        return self._thread is not None and time.monotonic() - self._contact > 2.5 * self.period + 1

    def stop(self) -> None:
        """Stop stamping and wait for the thread, so no store call is in flight when the group is torn down; a
        thread stuck on a store host that no longer answers is left behind (a daemon: the job is failing)."""
        self._stop.set()
        if self._thread is not None:
            if not self._store_lost():
                self._thread.join(timeout=self.period + 5)
            self._thread = None

    def report(self, message: str) -> None:
        """Tell the peers why this rank stops (bounded: the store's host may be the rank that hung; not tried when
        this rank already lost the store)."""
        if self.store is not None and not self._store_lost():
            _bounded(lambda: self.store.set(f"failed/{self.rank}", message[:500]), 2, None)

    def diagnose(self, what: str, error: Exception) -> str:
        """One line naming the failed rank(s), from failure reports and stale heartbeats."""
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        if self.store is None:
            return f"rank {self.rank}: {what} failed ({detail}); a peer rank failed or stopped answering"
        culprits = self.culprits(wait=True)
        if STORE_UNREACHABLE not in culprits:
            _bounded(lambda: self.store.set(f"diagnosed/{self.rank}", "1"), 2, None)  # rank 0 may now leave
        if not culprits:
            return f"rank {self.rank}: {what} failed ({detail}); no peer was seen failing"
        return f"rank {self.rank}: {what} failed because " + "; ".join(culprits)

    def culprits(self, wait: bool = False) -> list[str]:
        """Peers that failed or stopped; with `wait`, give a peer that just died a moment to be seen as stale (a
        hung one was seen long before a collective timed out on it)."""
        deadline = time.monotonic() + min(self.timeout_s, 4 * self.period + 1)
        while True:
            found = self._culprits()
            if found or not wait or time.monotonic() >= deadline:
                return found
            time.sleep(self.period / 2)

    def linger(self) -> None:
        """Before rank 0 (which may host the store) leaves a failed job: wait until every peer still alive has read
        its diagnosis, at most a few beats."""
        deadline = time.monotonic() + 3 * self.period + 2
        while self.store is not None and time.monotonic() < deadline:
            waiting = [r for r in range(self.size) if r != self.rank and r not in self._gone]
            if _bounded(lambda: self.store.check([f"diagnosed/{r}" for r in waiting]) if waiting else True, 2, False):
                return
            time.sleep(self.period / 4)

    def wait_for(self, store, keys: list[str], what: str) -> None:
        """Wait until every rank r has set keys[r] in `store`; a rank that has not, and whose heartbeat has stopped
        for the fault timeout (or that reported a failure), ends the wait with RankFailure naming it."""
        while True:
            try:
                store.wait(keys, datetime.timedelta(seconds=self.period))
                return
            except Exception:  # not yet: who is missing, and are they still alive?
                pass
            missing = [r for r, key in enumerate(keys) if not _bounded(lambda k=key: store.check([k]), 5, True)]
            culprits = self._culprits(among=missing, silent_s=self.timeout_s)
            if culprits:
                raise RankFailure(f"rank {self.rank}: waiting for every rank {what}, but " + "; ".join(culprits))

    def _culprits(self, among: list[int] | None = None, silent_s: float | None = None) -> list[str]:
        """Peers that reported a failure, never started or stopped beating (for `silent_s`, default 2.5 beats); each
        store call bounded, so a store host that is itself stopped cannot hang the diagnosis."""
        if self._store_lost():
            return [STORE_UNREACHABLE]  # this rank's own stamps stopped reaching the store
        bound = min(10.0, max(3.0, self.timeout_s))  # a store host stopped a moment ago: within the fault timeout
        return _bounded(lambda: self._find_culprits(among, silent_s), bound, [STORE_UNREACHABLE])

    def _find_culprits(self, among: list[int] | None, silent_s: float | None = None) -> list[str]:
        found = []
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))
            for r in range(self.size) if among is None else among:
                if r == self.rank:
                    continue
                if self.store.check([f"failed/{r}"]):
                    found.append(f"rank {r} failed: {self.store.get(f'failed/{r}').decode()}")
                elif not self.store.check([f"alive/{r}"]):
                    found.append(f"rank {r} never started")
                elif self._stale(r, self.store.get(f"alive/{r}").decode(), time.monotonic(), silent_s):
                    found.append(f"rank {r} stopped responding (dead or hung)")
                else:
                    continue
                self._gone.add(r)
        except Exception:
            found.append(STORE_UNREACHABLE)
        return found


def _bounded(fn, seconds: float, otherwise):
    """fn() on a helper thread, or `otherwise` if it has not returned within `seconds` (a store call to a stopped
    host blocks whatever the store's timeout says)."""
    result = [otherwise]

    def call() -> None:
        try:
            result[0] = fn()
        except Exception:  # noqa: BLE001 - an unreachable store is what `otherwise` stands for
            pass

    helper = threading.Thread(target=call, name="lp-bounded", daemon=True)
    helper.start()
    helper.join(seconds)
    return result[0]
