"""Specifications of the engine's parts: config, n-gram pool, window, step layout, KV cache, partition, first index."""
import pytest
import torch

import lp
from lp.config import ConfigError, LookaheadConfig
from lp.distributed.partition import rank_load, rank_shape, split_step
from lp.kv_cache import InPlaceCache, InPlaceLayer
from lp.ngram_pool import NGramPool
from lp.step_layout import StepShape, build_layout, step_mask, tokens_fed
from lp.window import LookaheadWindow


# --- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("window", 0), ("ngram", 1), ("guess", -1), ("window", 2.5),
                                         ("ngram", True), ("seed_pool_from_prompt", "yes")])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LookaheadConfig(**{field: value})


def test_config_from_dict_refuses_unknown_keys():
    assert LookaheadConfig.from_dict({"window": 3, "ngram": 4}).levels == 3
    with pytest.raises(ConfigError, match="windw"):
        LookaheadConfig.from_dict({"windw": 3})


# --- n-gram pool --------------------------------------------------------------------------------------

def test_pool_keeps_at_most_g_per_key_and_drops_least_recently_used():
    pool = NGramPool(capacity=2, length=2)
    pool.add(7, (1, 2))
    pool.add(7, (3, 4))
    pool.add(7, (1, 2))  # refreshed: now most recent
    pool.add(7, (5, 6))  # evicts (3, 4), the least recently used
    assert pool.candidates(7) == [(5, 6), (1, 2)]
    assert pool.candidates(8) == []
    assert len(pool) == 2


def test_pool_with_zero_capacity_stays_empty():
    pool = NGramPool(capacity=0, length=3)
    pool.add_sequence([1, 2, 3, 4, 5, 6])
    assert len(pool) == 0


def test_pool_reads_every_ngram_of_a_sequence_from_start():
    pool = NGramPool(capacity=10, length=2)
    pool.add_sequence([1, 2, 3, 1, 2, 4], start=1)
    assert pool.candidates(1) == [(2, 4)]  # the n-gram at index 0 is before `start`
    assert pool.candidates(2) == [(3, 1)]
    assert pool.candidates(3) == [(1, 2)]
    pool.add_sequence([2, 5, 5])
    assert pool.candidates(2) == [(5, 5), (3, 1)]  # most recent first


# --- window -------------------------------------------------------------------------------------------

def test_window_warms_up_in_n_minus_2_steps_then_harvests_w_ngrams_a_step():
    w = LookaheadWindow(levels=3, width=2, prompt=[9], seed=0)  # N = 4
    assert w.rows == [[9, 9]] and not w.warm
    assert w.advance([1, 2]) == []
    assert w.advance([3, 4]) == [] and w.warm
    assert w.advance([5, 6]) == [(9, 1, 3, 5), (9, 2, 4, 6)]  # read up each column
    assert w.rows == [[1, 2], [3, 4], [5, 6]]  # shifted down, new outputs on top
    assert w.advance([7, 8]) == [(1, 3, 5, 7), (2, 4, 6, 8)]


def test_window_with_bigrams_is_warm_at_once():
    w = LookaheadWindow(levels=1, width=3, prompt=[4, 5], seed=1)
    first = list(w.rows[0])
    assert w.advance([1, 2, 3]) == [(first[0], 1), (first[1], 2), (first[2], 3)]


def test_window_initial_guesses_are_seeded():
    a = LookaheadWindow(4, 8, list(range(100)), seed=3).rows
    assert a == LookaheadWindow(4, 8, list(range(100)), seed=3).rows
    assert a != LookaheadWindow(4, 8, list(range(100)), seed=4).rows


# --- step layout --------------------------------------------------------------------------------------

def reference_layout(pending, levels, col_start, col_end, candidates, cand_len):
    """Plain construction from the rules: each token's context and position, written out directly."""
    names = [("p", i) for i in range(pending)]
    if levels:
        names += [("w", 0, i) for i in range(col_end)]
        names += [("w", j, i) for j in range(1, levels) for i in range(col_start, col_end)]
    names += [("c", k, j) for k in range(candidates) for j in range(cand_len)]

    def context(n):
        if n[0] == "p":
            return {("p", i) for i in range(n[1] + 1)}
        if n[0] == "w":
            _, j, i = n
            return ({("p", q) for q in range(pending)} | {("w", 0, c) for c in range(i + 1)}
                    | {("w", l, i) for l in range(1, j + 1)})
        _, k, j = n
        return {("p", q) for q in range(pending)} | {("c", k, l) for l in range(j + 1)}

    def position(n):
        if n[0] == "p":
            return n[1]
        if n[0] == "w":
            return pending + n[2] + n[1]
        return pending + n[2]

    allowed = torch.tensor([[m in context(n) for m in names] for n in names])
    return names, allowed, torch.tensor([position(n) for n in names])


@pytest.mark.parametrize("shape", [StepShape(1, 0, 0, 0, 0, 0), StepShape(1, 1, 0, 3, 0, 0),
                                   StepShape(1, 4, 0, 5, 3, 4), StepShape(3, 2, 2, 5, 2, 1),
                                   StepShape(2, 3, 4, 4, 1, 3), StepShape(1, 4, 3, 7, 0, 4)])
def test_layout_matches_plain_construction(shape):
    names, allowed, positions = reference_layout(*shape.__dict__.values())
    layout = build_layout(shape)
    assert layout.size == len(names) == tokens_fed(shape)
    assert torch.equal(layout.allowed, allowed)
    assert torch.equal(layout.depth, positions)
    assert names[layout.last_pending] == ("p", shape.pending - 1)
    for j in range(shape.levels):
        for c in range(shape.col_end - shape.col_start):
            assert names[layout.window_rows[j, c]] == ("w", j, shape.col_start + c)
    for k in range(shape.candidates):
        for j in range(shape.candidate_len):
            assert names[layout.candidate_rows[k, j]] == ("c", k, j)


def test_step_mask_is_float_additive_and_shows_the_cache_to_every_row():
    layout = build_layout(StepShape(1, 2, 0, 2, 1, 2))
    mask = step_mask(~layout.allowed, cached=5, dtype=torch.float32)
    assert mask.shape == (1, 1, layout.size, 5 + layout.size) and mask.dtype == torch.float32
    assert (mask[0, 0, :, :5] == 0).all()
    block = mask[0, 0, :, 5:]
    assert torch.equal(block == 0, layout.allowed)
    assert (block[~layout.allowed] == torch.finfo(torch.float32).min).all()


# --- KV cache -----------------------------------------------------------------------------------------

def test_cache_moves_accepted_entries_in_place_and_crops_the_rest():
    layer = InPlaceLayer(capacity=16)
    keys = torch.arange(10.0).view(1, 1, 10, 1)
    layer.update(keys, -keys)
    buffer = layer._k.data_ptr()
    layer.keep(4, torch.tensor([6, 8]))
    assert layer.get_seq_length() == 6
    assert layer.keys.flatten().tolist() == [0, 1, 2, 3, 6, 8]
    assert layer.values.flatten().tolist() == [0, -1, -2, -3, -6, -8]
    layer.crop(-2)
    assert layer.keys.flatten().tolist() == [0, 1, 2, 3]
    assert layer._k.data_ptr() == buffer  # edited in place, never reallocated


def test_cache_grows_by_doubling_and_keeps_contents():
    layer = InPlaceLayer(capacity=4)
    for i in range(9):
        layer.update(torch.full((1, 2, 1, 3), float(i)), torch.full((1, 2, 1, 3), float(i)))
    assert layer.capacity == 16 and layer.get_seq_length() == 9
    assert layer.keys[0, 0, :, 0].tolist() == list(map(float, range(9)))


def test_cache_write_replaces_a_tail_with_received_entries():
    cache = InPlaceCache(capacity=8)
    cache.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    cache.layers[0].write(3, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    assert cache.length == 6 and cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1]


# --- partition ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8, 40])
@pytest.mark.parametrize("width,levels,cands,clen", [(15, 4, 15, 4), (7, 4, 7, 4), (5, 1, 0, 0), (3, 0, 5, 2)])
def test_partition_covers_everything_once_and_balances(ranks, width, levels, cands, clen):
    slices = split_step(width, levels, cands, clen, [1] * ranks)
    cols = [c for s in slices for c in range(s.col_start, s.col_end)]
    cand = [c for s in slices for c in range(s.cand_start, s.cand_end)]
    assert cols == list(range(width if levels else 0))
    assert cand == list(range(cands))
    loads = [rank_load(s, levels, clen, 1) for s in slices]
    one = rank_load(split_step(width, levels, cands, clen, [1])[0], levels, clen, 1)
    # the busiest rank feeds about 1/P of a single rank's tokens (within one column or candidate),
    # unless the last column alone, with its level-0 prefix, costs more than that
    last_column = 1 + (width - 1 + levels if levels else 0)
    assert max(loads) <= max(-(-(one - 1) // ranks) + 1 + levels + clen, last_column)


def test_partition_gives_later_columns_fewer_and_respects_pending_tokens():
    # 15 columns x 4 levels + 15 candidates of 4 on two ranks, the second with 5 pending tokens to recompute
    first, second = split_step(15, 4, 15, 4, [1, 5])
    assert (first.col_start, second.col_end) == (0, 15) and first.col_end == second.col_start
    assert first.columns > second.columns  # the second rank's columns carry the longer level-0 prefix
    loads = [rank_load(first, 4, 4, 1), rank_load(second, 4, 4, 5)]
    assert abs(loads[0] - loads[1]) <= 4 + 4  # within one column (4 levels) or one candidate (4 tokens)


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("width,levels,cands,clen", [(15, 4, 15, 4), (2, 4, 15, 4), (1, 1, 1, 1), (7, 4, 0, 0)])
def test_the_cost_model_counts_the_rows_a_rank_really_feeds(ranks, width, levels, cands, clen):
    for s in split_step(width, levels, cands, clen, [1] * ranks):
        shape = rank_shape(s, levels, clen, 1)
        assert build_layout(shape).size == rank_load(s, levels, clen, 1)  # the layout is what the decoders feed
        if s.columns == 0:
            assert build_layout(shape).size == 1 + (s.cand_end - s.cand_start) * clen  # no level-0 prefix


def test_a_rank_without_columns_feeds_no_window():
    loads = [rank_load(s, 4, 4, 1) for s in split_step(15, 4, 15, 4, [1] * 4)]
    assert loads == [37, 34, 37, 25]


def test_the_reference_cache_reserves_its_widest_step_up_front(monkeypatch):
    from models import tiny_model
    grown = []
    reserve = InPlaceLayer._reserve
    monkeypatch.setattr(InPlaceLayer, "_reserve", lambda self, n: (grown.append(n) if n > self.capacity else None,
                                                            reserve(self, n))[1])
    # a (15, 5, 15) step feeds up to 121 tokens; 32 + 32 tokens alone would round to a 128-entry cache
    result = lp.generate(tiny_model("llama"), [5, 6, 7, 8] * 8, lp.LookaheadConfig(15, 5, 15, compile=False),
                         max_new_tokens=32)
    assert max(result.tokens_fed_per_step) > 64 and grown == []  # more than the 64 entries once reserved


# --- failure diagnosis ----------------------------------------------------------------------------------------

def test_a_live_peer_with_a_skewed_clock_is_not_named_and_a_silent_one_is(monkeypatch):
    import threading
    import time as clock
    import torch.distributed as dist
    from lp.distributed import parallel
    store, real, silent = dist.HashStore(), clock.time, threading.Event()

    def other_host():  # stamps with its own clock, an hour behind this one, until it goes silent
        while not silent.wait(0.1):
            store.set("lp-heartbeat/alive/1", repr(real() - 3600))

    store.set("lp-heartbeat/alive/1", "0")
    peer = threading.Thread(target=other_host, daemon=True)
    peer.start()
    me = parallel._Heartbeat(store, 0, 2, timeout_s=1.2)
    try:
        assert "no peer was seen failing" in me.diagnose("all-gather", RuntimeError("timed out"))
        silent.set()
        peer.join()
        assert "rank 1 stopped responding" in me.diagnose("all-gather", RuntimeError("timed out"))
    finally:
        me.stop()


def test_the_end_of_job_wait_gives_a_silent_replica_the_whole_fault_timeout():
    # it gave up after 2.5 heartbeats (5 s whatever --fault-timeout from 12 s up): a replica stopped for a moment
    # failed the job of a user who had allowed it 120 s (issue 27, tools/fault_probe.py's lock race)
    import threading
    import time
    import torch.distributed as dist
    from lp.distributed import parallel
    store, silent = dist.HashStore(), threading.Event()

    def replica():  # beats until it goes silent
        beats = 0
        while not silent.wait(0.05):
            beats += 1
            store.set("lp-heartbeat/alive/1", str(beats))

    store.set("lp-heartbeat/alive/1", "0")
    peer = threading.Thread(target=replica, daemon=True)
    peer.start()
    me = parallel._Heartbeat(store, 0, 2, timeout_s=3.0)  # beats every 0.5 s
    try:
        while 1 not in me._seen:  # the watcher has seen the replica beat
            time.sleep(0.01)
        silent.set()
        peer.join()
        went_silent = time.monotonic()
        store.set("done/0", "{}")
        with pytest.raises(parallel.RankFailure, match="rank 1 stopped responding"):
            me.wait_for(store, ["done/0", "done/1"], "finishing its share of the job")
        assert 3.0 - 0.1 <= time.monotonic() - went_silent < 3.0 + 2.0
    finally:
        me.stop()


def stoppable_store():
    """A store whose host can be stopped (SIGSTOP): every call then blocks until it goes on (running.set())."""
    import threading
    import torch.distributed as dist

    class Host(dist.Store):  # a store whose host can be stopped: every call then blocks until it goes on
        def __init__(self):
            super().__init__()
            self.data, self.running = {}, threading.Event()
            self.running.set()

        def set(self, key, value):
            self.running.wait()
            self.data[key] = value.encode() if isinstance(value, str) else bytes(value)

        def get(self, key):
            self.running.wait()
            return self.data[key]

        def multi_get(self, keys):
            return [self.get(key) for key in keys]

        def check(self, keys):
            self.running.wait()
            return all(key in self.data for key in keys)

    return Host()


def test_a_rank_that_lost_the_store_host_says_so_without_waiting_on_it():
    # under mpirun rank 0 hosts the store; stopped, it answers no store call: rank 1's error came 20.7 s after the
    # stop with --fault-timeout 10 (2 s marking itself diagnosed, 2 s reporting, 6.7 s joining its heartbeat thread)
    import time
    from lp.distributed import parallel

    host = stoppable_store()
    host.set("lp-heartbeat/alive/0", "1")
    me = parallel._Heartbeat(host, 1, 2, timeout_s=1.2)  # beats every 0.2 s
    try:
        while 0 not in me._seen:  # the watcher has reached the store
            time.sleep(0.01)
        host.running.clear()  # SIGSTOP
        while time.monotonic() - me._contact <= 2.5 * me.period + 1:  # its own stamps no longer get through
            time.sleep(0.05)
        began = time.monotonic()
        message = me.diagnose("MPI all-gather", TimeoutError("no answer within --fault-timeout 1.2 s"))
        me.report("RankFailure: " + message)
        me.stop()
        assert parallel.STORE_UNREACHABLE in message
        assert time.monotonic() - began < 1.0
    finally:
        host.running.set()  # SIGCONT: the calls left waiting on it return


def test_a_diagnosis_right_after_the_store_host_stopped_waits_no_longer_than_a_short_fault_timeout_allows():
    # the store calls of a diagnosis were bounded at 10 s whatever --fault-timeout said: with --fault-timeout 0.5,
    # a store host stopped a moment before (its stamps not yet seen missing) held the error line back 10 s
    import time
    from lp.distributed import parallel
    host = stoppable_store()
    host.set("lp-heartbeat/alive/0", "1")
    me = parallel._Heartbeat(host, 1, 2, timeout_s=0.5)
    try:
        while 0 not in me._seen:
            time.sleep(0.01)
        host.running.clear()  # SIGSTOP, and at once a collective fails
        began = time.monotonic()
        message = me.diagnose("all-gather", TimeoutError("no answer within --fault-timeout 0.5 s"))
        assert parallel.STORE_UNREACHABLE in message
        assert time.monotonic() - began < 5.0
    finally:
        host.running.set()
        me.stop()


# -- first_index: ties always go to the lowest index ------------------------------------------------------

def test_first_max_breaks_ties_to_the_lowest_index_like_eager_argmax():
    from lp.first_index import first_max
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, float("nan"), 5.0, float("nan")]])
    assert first_max(x).tolist() == [1, 0, 1]
    assert first_max(x, 0).tolist() == [1, 2, 2, 2]  # NaN counts as the maximum, as in argmax
    assert torch.equal(first_max(x[:2]), x[:2].argmax(-1))


def test_first_true_gives_the_lowest_true_index_or_the_size_when_none():
    from lp.first_index import first_true
    mask = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true(mask).tolist() == [1, 3, 0]
    assert first_true(mask, 0).tolist() == [2, 0, 0]


@pytest.mark.slow
def test_compiled_first_max_keeps_the_first_of_many_ties():
    from lp.first_index import first_max
    x = torch.randint(0, 3, (64, 40)).double()  # every row has tied maxima
    compiled = torch.compile(first_max, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), x.argmax(-1))


def test_a_long_call_gets_a_progress_line_every_so_often_and_none_after_it_ends():
    import threading
    import time
    from lp.progress import ticking
    lines = []
    with ticking(lines.append, "still compiling", every=0.05):
        time.sleep(0.33)
    seen = len(lines)
    time.sleep(0.2)
    assert 2 <= seen <= 7 and len(lines) == seen  # about one each 0.05 s while it ran, none after
    assert lines[0] == "still compiling: 0 s so far"
    with ticking(None, "nobody listens", every=0.01):  # no notify: no thread at all
        assert "lp-progress" not in [t.name for t in threading.enumerate()]
