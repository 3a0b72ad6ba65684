"""The fast path's step: one fixed shape per (W, N, G, ranks) and every piece of bookkeeping on the device.

A step feeds [pending slots | all N-1 window levels | this rank's verification tree] whose shape never
changes: the window is filled before the first step, the tree (lp.candidate_tree: prompt lookup and pool
candidates merged into a trie) is padded to its budget with slots that can never win, and with `recompute`
the pending run is padded to its longest (the longest accepted run) at its front with rows no one attends to.
It runs in two halves so that a team can exchange between them: `local` (forward, verification, this rank's
exchange row) and `commit` (winner, window, pool, KV cache compaction); `local` is `prepare` (what to feed),
the forward and `finish` (verify), so the lanes of a batch (lp.batched_decoding) can share one forward. Alone,
both halves run as one compiled graph, and `plain` is the one-token step run instead when the last step found
the next tree empty (the flag ends the host-bound output). All state lives in tensors updated in place, so a
compiled graph (or a CUDA graph) replays it with no host work.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .candidate_tree import LOOKUP_STRENGTH, POOL_DECAY, POOL_STRENGTH, build_tree, has_match, prompt_lookup, verify
from .device_pool import DevicePool
from .device_rules import DeviceRules
from .ngram_pool import NGramPool
from .distributed.partition import Slice, deal_rows, rank_shape
from .first_index import first_max
from .job_corpus import JobCorpus
from .sampling import Sampling, sample
from .slot_cache import LaneCache, SlotCache
from .step_layout import StepShape, build_layout, tokens_fed


@dataclass
class Fed:
    """One step's forward inputs, and what verifying its output needs."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    mask: torch.Tensor  # [1, 1, T, capacity]
    tree: object  # the verification tree (lp.candidate_tree.Tree), or None
    cached: torch.Tensor  # committed cache entries before the step (0-d)
    shift: torch.Tensor  # padded pending slots at the front (0-d)
    pending_count: torch.Tensor  # real pending slots (0-d)


@dataclass(frozen=True)
class FastShape:
    """The static numbers of one rank's step."""

    window: int
    ngram: int
    guess: int
    lookup: int  # prompt-lookup candidates per step
    lookup_len: int
    depth: int  # the tree's depth: a step accepts at most depth + 1 tokens
    pending: int  # pending slots: 1, or depth + 1 when ranks recompute the winner's tokens
    slices: tuple[Slice, ...]  # every rank's window columns and tree slots [cand_start, cand_end)
    rank: int
    kv_sync: str  # "none" (one rank), "gather" or "recompute"
    chain: int = 0  # continuations chained onto each pool candidate (lp.device_pool.DevicePool.chained); 0: none
    chain_room: int = 0  # tokens each continuation adds (LookaheadConfig.chain_room)
    plain: bool = False  # a step whose tree would hold no candidate runs as a one-token step (FastStep.plain)

    @property
    def pool_rows(self) -> int:
        """Candidate rows the pool gives the tree: G, or G x chain when its candidates are chained."""
        return self.guess * (self.chain or 1)

    @property
    def mine(self) -> Slice:
        return self.slices[self.rank]

    def rows_of(self, rank: int) -> tuple[int, ...]:
        """The candidate rows rank `rank`'s tree merges (prompt lookup's, then the pool's, best first): dealt in
        proportion to the ranks' tree slots (`deal_rows`), so no row goes to a rank with no slot."""
        slots = tuple(s.cand_end - s.cand_start for s in self.slices)
        return deal_rows(slots, self.lookup + self.pool_rows)[rank]

    def budget_of(self, rank: int) -> int:
        """Rank `rank`'s tree slots: its slice of the budget, none when it has no candidate row (fewer rows than
        ranks), since a tree of no candidates has nothing to feed."""
        s = self.slices[rank]
        return s.cand_end - s.cand_start if self.rows_of(rank) else 0

    def shape_of(self, rank: int) -> StepShape:
        """What rank `rank` feeds, counted as the partition counts it (the tree as `budget` one-token candidates)."""
        s = self.slices[rank]
        return rank_shape(replace(s, cand_end=s.cand_start + self.budget_of(rank)), self.ngram - 1, 1, self.pending)

    @property
    def tree_rows(self) -> tuple[int, ...]:
        return self.rows_of(self.rank)

    @property
    def budget(self) -> int:
        return self.budget_of(self.rank)

    @property
    def step_shape(self) -> StepShape:
        return self.shape_of(self.rank)

    @property
    def widest_step(self) -> int:
        """The most tokens any rank of the team feeds a step. Caches are sized by it, so they are alike on every
        rank (a batch restarts an idle lane at the same step on every rank)."""
        return max(tokens_fed(self.shape_of(r)) for r in range(len(self.slices)))

    @property
    def accept(self) -> int:
        """The most tokens one step commits."""
        return self.depth + 1

    @property
    def out_size(self) -> int:
        """What the host reads a step: [count, accepted tokens, diverged, ready (the next tree has a candidate)]."""
        return self.accept + 3

    @property
    def max_columns(self) -> int:
        return max(s.columns for s in self.slices)

    @property
    def row_size(self) -> int:
        """The exchange row: [accepted count, accepted tokens, window outputs (max columns), fingerprint]."""
        return 2 + self.accept + self.max_columns


class FastStep:
    """Device state and the two halves of one rank's fixed-shape step, for one cache capacity."""

    def __init__(self, model, shape: FastShape, capacity: int, rules: DeviceRules, pool: DevicePool,
                 context: int | None, cache_arg: str, layers: int, seed_from_output: bool,
                 sampling: Sampling | None = None, cache: SlotCache | None = None, lane: int | None = None,
                 job_memory: bool = False, corpus: JobCorpus | None = None):
        """`cache` and `lane`: this step is row `lane` of a batch sharing `cache` (lp.batched_step); by default it
        owns a cache of one sequence. `job_memory`: `pool` outlives a generation (LookaheadConfig.memory);
        `corpus`: the job's earlier texts, which prompt lookup searches too (lp.job_corpus)."""
        self.model, self.shape, self.capacity, self.rules = model, shape, capacity, rules
        self.lane = lane
        self.job_memory = job_memory
        self.corpus = corpus
        self.sampling = sampling  # None: greedy
        self.cache_arg, self.seed_from_output = cache_arg, seed_from_output
        param = next(model.parameters())
        device, self.dtype = param.device, param.dtype
        self.device = device
        self.context = context if context is not None else 1 << 62
        n, w, a = shape.ngram, shape.window, shape.accept
        mine = shape.mine
        levels = shape.ngram - 1 if mine.columns else 0
        fixed = StepShape(shape.pending, levels, mine.col_start if levels else 0, mine.col_end if levels else 0, 0, 0)
        layout = build_layout(fixed)  # pending and window rows; the tree's rows follow them
        self.fixed = layout.size
        self.budget = shape.budget
        self.tokens = self.fixed + self.budget
        to = dict(device=device, dtype=torch.long)

        # -- static layout: where each fed token comes from, its depth, what it may see, which logits to keep
        sources = list(range(fixed.pending))  # into cat(pending, window.flatten())
        if levels:
            sources += [fixed.pending + c for c in range(fixed.col_end)]
            for j in range(1, levels):
                sources += [fixed.pending + j * w + c for c in range(fixed.col_start, fixed.col_end)]
        self.sources = torch.tensor(sources, **to)
        self.fixed_depth = layout.depth.to(device)
        self.fixed_hidden = (~layout.allowed).to(device)
        top_rows = layout.window_rows[-1].tolist() if levels else []
        keep = [fixed.pending - 1] + top_rows + list(range(self.fixed, self.tokens))
        self.keep_rows = torch.tensor(keep, **to)
        # the tree's candidate rows: prompt lookup's, then the pool's; this rank's share (FastShape.rows_of)
        self.tree_rows = torch.tensor(shape.tree_rows, **to)
        self.lookup_strength = torch.tensor(LOOKUP_STRENGTH, dtype=torch.float64, device=device)
        # the pool's candidates, newest first; a chained row ranks as its candidate does
        newest_first = POOL_DECAY ** torch.arange(shape.guess, dtype=torch.float64, device=device)
        self.pool_strength = (POOL_STRENGTH * newest_first).repeat_interleave(shape.chain or 1)
        row = shape.row_size  # where every rank's window outputs sit in the flattened exchange table
        self.top_index = torch.tensor([r * row + 1 + a + c for r, s in enumerate(shape.slices) for c in range(s.columns)],
                                      **to)
        self.tail_index = (torch.arange(a)[:, None] + torch.arange(n)[None, :]).to(device)  # n-grams of [tail | accepted]

        # -- state, updated in place
        self.cache = cache if cache is not None else SlotCache(layers, capacity, device)
        self.length = self.cache.length if lane is None else torch.zeros((), **to)  # committed cache entries
        self.pool = pool
        self.window = torch.zeros(n - 1, w, **to)  # a ring of levels: level j is row (head + j) % (N-1)
        self.head = torch.zeros((), **to)
        self.pending = torch.zeros(shape.pending, **to)
        self.pending_count = torch.ones((), **to)
        self.history = torch.full((capacity + a,), -1, **to)  # the committed text, for prompt lookup and n-grams
        self.history_len = torch.zeros((), **to)
        self.prompt_len = torch.zeros((), **to)
        self.seed = torch.zeros((), **to)  # keys the sampling draws
        self.fingerprint = torch.zeros((), **to)
        self.step_slots = torch.zeros(self.tokens, **to)
        self.plain_slots = torch.zeros(1, **to)  # the one cache slot a plain step writes
        self.plain_keep = torch.zeros(1, **to)  # the plain step's one row (its logits, its slot offset)
        self.out = torch.zeros(shape.out_size, **to)  # [count, accepted tokens, diverged, ready]: what the host reads
        self.kept = torch.zeros((), **to)  # cache entries the last step committed (the winner's sit just below length)
        self.remembering = torch.ones((), dtype=torch.bool, device=device)  # this generation's n-grams go to the pool
        self.generation = torch.zeros((), **to)  # this generation's number in the job
        self.kv_buffer: torch.Tensor | None = None  # [layers, b, h, accept, dk + dv] with kv_sync == "gather"
        for t in (self.window, self.head, self.pending, self.pending_count, self.history, self.history_len,
                  self.prompt_len, self.seed, self.fingerprint, self.step_slots, self.plain_slots, self.out,
                  self.kept, self.length, self.remembering, self.generation):
            torch._dynamo.mark_static_address(t)

    # -- per generation (eager) ---------------------------------------------------------------------------

    def start(self, prompt: list[int], host_pool: NGramPool, window_rows: list[list[int]], seed: int = 0,
              remember: bool = True, generation: int = 0) -> None:
        """Prefill the prompt, load the pool (into the job's memory, when the pool is one) and window, and point the
        cache at the step's slots. `remember=False`: this generation adds nothing to the pool (a batch's idle lane
        decoding junk must not fill a pool the other lanes share). `generation`: this generation's number in the
        job (what it stores in the pool is its own)."""
        a = self.shape.accept
        to = dict(device=self.device, dtype=torch.long)
        cache = self.cache if self.lane is None else LaneCache(self.cache, self.lane)
        self.length.zero_()
        body = prompt[:-1]
        # a one-token prompt still runs one forward (of that token, rewritten by the first step), so every layer
        # allocates its buffers here and never inside a compiled step, which would then be traced twice
        prefill = body or prompt
        k = len(prefill)
        cache.slots = torch.arange(k, device=self.device)
        mask = torch.full((k, self.capacity), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        mask[:, :k].triu_(1)
        self.model(input_ids=torch.tensor([prefill], **to), position_ids=cache.slots[None],
                   attention_mask=mask[None, None], use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
        self.length.fill_(len(body))
        if self.lane is None:
            cache.slots = self.step_slots
        if self.shape.kv_sync == "gather" and self.kv_buffer is None:
            self.kv_buffer = kv_exchange_buffer(cache, a)
        if self.kv_buffer is not None:
            self.kv_buffer.zero_()
        self.kept.zero_()
        self.generation.fill_(generation)
        self.pool.load(host_pool, prompt, keep=self.job_memory, generation=generation)
        self.remembering.fill_(remember)
        self.window.copy_(torch.tensor(window_rows, **to))
        self.head.zero_()
        self.pending.fill_(prompt[-1])
        self.pending_count.fill_(1)
        self.history.fill_(-1)
        self.history[: len(prompt)] = torch.tensor(prompt, **to)
        self.history_len.fill_(len(prompt))
        self.prompt_len.fill_(len(prompt))
        self.seed.fill_(seed)
        if len(self.shape.slices) > 1:
            self.fingerprint.copy_(self._memory_hash())
        else:  # one rank has no one to check against (and a long corpus would cost its sum every generation)
            self.fingerprint.zero_()

    def _memory_hash(self) -> torch.Tensor:
        """A number every rank of a team computes alike from the job's memory (the pool's counts and ring heads, the
        corpus): it starts a generation's fingerprint, so the first exchange catches memories that drifted apart."""
        parts = [self.pool.count, self.pool.next] + ([self.corpus.tokens] if self.corpus is not None else [])
        return sum((t * torch.arange(1, t.numel() + 1, device=self.device)).sum() for t in parts)

    # -- the step -----------------------------------------------------------------------------------------
    # `prepare`, `forward`, `finish` and `commit` (`plain_prepare`, `forward`, `plain_finish` for a plain step) are
    # one compiled graph each when the step is split (lp.fast_decoding); `local`, `solo` and `plain` chain them into
    # one graph when it is compiled whole. Each of them reads every state tensor before writing it, and writes it
    # from a value computed apart (lp.graph_check): no copy of one state's old value goes into another.

    def local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and verify this rank's slice: its exchange row and, if it wins, the cache slots to keep."""
        fed = self.prepare()
        return self.finish(self.forward(fed.tokens, fed.positions, fed.mask), fed)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """The model alone over one step's fed tokens [T]: the logits of rows `keep` [rows, V] (default: the
        step's kept rows). It writes the step's keys and values at `cache.slots`."""
        out = self.model(input_ids=tokens[None], position_ids=positions[None], attention_mask=mask, use_cache=True,
                         logits_to_keep=self.keep_rows if keep is None else keep, **{self.cache_arg: self.cache})
        return out.logits[0]

    def prepare(self) -> "Fed":
        """What this step feeds (tokens, positions, mask) and writes where (step_slots); the forward comes next."""
        shape = self.shape
        cached = self.length
        if self.kv_buffer is not None:  # entries received from last step's winner, at the slots it committed
            start = cached - self.kept
            dk = self.cache.layers[0].keys.shape[-1]
            for i, layer in enumerate(self.cache.layers):
                layer.write(start, self.kv_buffer[i, ..., :dk], self.kv_buffer[i, ..., dk:], self.lane)
        p = self.pending_count
        shift = shape.pending - p
        tree = self._tree() if self.budget else None
        fixed = torch.cat([self.pending, self._levels().flatten()])[self.sources]
        depth_of = self.fixed_depth if tree is None else torch.cat([self.fixed_depth, shape.pending - 1 + tree.depth])
        tokens = fixed if tree is None else torch.cat([fixed, tree.tokens])
        positions = (cached + depth_of - shift).clamp(0, self.context - 1)
        self.step_slots.copy_(cached + torch.arange(self.tokens, device=self.device))
        return Fed(tokens, positions, self._mask(cached, shift, tree), tree, cached, shift, p)

    def finish(self, logits: torch.Tensor, fed: "Fed") -> tuple[torch.Tensor, torch.Tensor]:
        """Verify the forward's kept logits [rows, V]: this rank's exchange row and, if it wins, the slots to keep."""
        shape, depth, tree = self.shape, self.shape.depth, fed.tree
        preds = self._choose(logits, fed.positions[self.keep_rows])
        cols = shape.mine.columns
        pred0, top = preds[0], preds[1 : 1 + cols]
        if tree is None:
            run = torch.zeros((), dtype=torch.long, device=self.device)
            path = torch.zeros(depth, dtype=torch.long, device=self.device)
            accepted = pred0.expand(1 + depth)
        else:
            tree_preds = preds[1 + cols :]
            run, path = verify(tree, pred0, tree_preds, depth)
            accepted = torch.cat([pred0[None], tree_preds[path]])
        pad = torch.zeros(shape.max_columns - cols, dtype=torch.long, device=self.device)
        row = torch.cat([(1 + run)[None], accepted, top, pad, self.fingerprint[None]])
        # slots to keep if this rank wins: its real pending rows, then the accepted path's rows
        p, shift = fed.pending_count, fed.shift
        idx = torch.arange(shape.pending + depth, device=self.device)
        rows = torch.where(idx < p, shift + idx, self.fixed + path[(idx - p).clamp(0, depth - 1)])
        return row, fed.cached + rows

    def commit(self, table: torch.Tensor, keep_slots: torch.Tensor) -> torch.Tensor:
        """Apply the team's exchange table [ranks, row]: commit the winner's tokens, advance the window and pool,
        compact the cache. Returns the host-bound [count, accepted tokens, diverged, ready]."""
        shape, a = self.shape, self.shape.accept
        cached = self.length  # written last
        root = self.pending[-1:]  # the key this step's pool candidates hang under (written below)
        counts = table[:, 0]
        winner = first_max(counts)  # ties go to the lowest rank
        count = _pick(counts, winner)
        accepted = _pick(table, winner)[1 : 1 + a]
        diverged = (table[:, -1] != table[0, -1]).any()
        won = winner == shape.rank
        if shape.kv_sync == "recompute":
            p = self.pending_count
            kept = torch.where(won, p + count - 1, p)
            next_count = torch.where(won, torch.ones_like(count), count)
        else:
            kept = count  # the single pending token plus the accepted tree tokens
            next_count = torch.ones_like(count)
        j = torch.arange(shape.pending, device=self.device)
        pending = accepted[(count - shape.pending + j).clamp(0, a - 1)]

        for layer in self.cache.layers:
            layer.keep(cached, keep_slots, self.lane)
        if self.kv_buffer is not None:  # the winner's entries [cached, cached + accept) go to every rank (summed)
            slots = cached + torch.arange(a, device=self.device)
            for i, layer in enumerate(self.cache.layers):
                keys, values = layer.row(self.lane)
                entries = torch.cat([keys.index_select(2, slots), values.index_select(2, slots)], -1)
                self.kv_buffer[i].copy_(torch.where(won, entries, 0))
        if shape.plain:  # the plain-or-full choice learns what full steps from this key commit
            self.pool.record_gain(root, count)
        self.pending.copy_(pending)
        self.pending_count.copy_(next_count)
        top = table.flatten()[self.top_index]
        out = self._record(accepted, count, top, diverged)
        self.kept.copy_(kept)
        self.length.copy_(cached + kept)
        return out

    def plain(self) -> torch.Tensor:
        """A one-token step, as greedy decoding runs it: the pending token alone, for a team of one rank when the
        tree would hold no candidate (the ready flag of the last step's output). It accepts that token's successor
        as a full step would (its bonus token); the window waits. The caller points the cache at `plain_slots`.
        Returns what `commit` returns."""
        token, position, mask = self.plain_prepare()
        return self.plain_finish(self.forward(token, position, mask, self.plain_keep), position)

    def plain_prepare(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plain step's token [1], position [1] and mask [1, 1, 1, capacity]; sets the slot it writes."""
        cached = self.length
        self.plain_slots.copy_(cached + self.plain_keep)
        position = cached.clamp(max=self.context - 1).view(1)
        visible = torch.arange(self.capacity, device=self.device) <= cached
        mask = torch.zeros(1, self.capacity, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible[None], torch.finfo(self.dtype).min)[None, None]
        return self.pending[-1:], position, mask

    def plain_finish(self, logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Commit the plain step's token from its logits [1, V]."""
        token = self._choose(logits[-1:], position)[0]
        count = torch.ones_like(self.length)
        self.pending.copy_(token.expand(self.shape.pending))
        diverged = torch.zeros((), dtype=torch.bool, device=self.device)
        out = self._record(token.expand(self.shape.accept), count, None, diverged)
        self.kept.copy_(count)
        self.length.copy_(self.length + count)
        return out

    def _record(self, accepted: torch.Tensor, count: torch.Tensor, top: torch.Tensor | None,
                diverged: torch.Tensor) -> torch.Tensor:
        """Move the text, window (`top`: its new level; None: it waits) and pool on by the step's first `count`
        accepted tokens; returns the host-bound [count, accepted tokens, diverged, ready]. The caller has written
        the new pending tokens (ready reads them)."""
        shape, a = self.shape, self.shape.accept
        steps = torch.arange(a, device=self.device)
        seq = torch.cat([self._tail(), accepted])
        out_grams = seq[self.tail_index]  # [accept, N]
        out_valid = (steps < count) & (out_grams >= 0).all(-1) & self.remembering
        if not self.seed_from_output:
            out_valid = torch.zeros_like(out_valid)
        written = self.history_len
        self.history.index_copy_(0, written + steps, accepted)  # entries past `count` are rewritten later
        self.history_len.copy_(written + count)
        live = torch.where(steps < count, accepted, 0)
        mixed = self.fingerprint * 1000003 + (live * (steps + 1)).sum() + count
        if top is None:
            added = self.pool.insert(out_grams, out_valid, self.generation)
        else:
            grams = torch.cat([self._levels(), top[None]]).T  # [W, N]: one n-gram up each column
            self.window.index_copy_(0, self.head.view(1), top[None])  # the new level replaces the oldest
            self.head.copy_((self.head + 1) % self.window.shape[0])
            added = self.pool.insert(torch.cat([grams, out_grams]),
                                     torch.cat([self.remembering.expand(shape.window), out_valid]), self.generation)
            mixed = mixed + (top * torch.arange(7, 7 + shape.window, device=self.device)).sum()
        self.fingerprint.copy_(mixed + added)
        self.out.copy_(torch.cat([count[None], accepted, diverged.long()[None], self._ready().long()[None]]))
        return self.out

    def solo(self) -> torch.Tensor:
        """Both halves for a team of one (one compiled graph)."""
        row, keep = self.local()
        return self.commit(row[None], keep)

    # -- helpers ------------------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The token each row of `logits` [rows, V] gives, the rows sitting at `positions` [rows]: greedy's (ties to
        the lowest id, as eager argmax) or the keyed draw for the position each row predicts."""
        if self.rules.active:
            logits = self.rules.apply(logits, positions + 1 - self.prompt_len)
        if self.sampling is None:
            return first_max(logits)
        return sample(logits, positions + 1, self.seed, self.sampling)

    def _levels(self) -> torch.Tensor:
        """The window's levels, oldest first [N-1, W]: a gather from the ring, never a shift in place."""
        rows = self.window.shape[0]
        return self.window.index_select(0, (self.head + torch.arange(rows, device=self.device)) % rows)

    def _tail(self) -> torch.Tensor:
        """The committed text's last N-1 tokens (-1 before its start): a gather from the history."""
        n = self.shape.ngram
        at = self.history_len - (n - 1) + torch.arange(n - 1, device=self.device)
        return torch.where(at >= 0, self.history.index_select(0, at.clamp(min=0)), -1)

    def _ready(self) -> torch.Tensor:
        """Whether the next step's tree would hold a candidate (0-d bool); always true without plain steps."""
        shape = self.shape
        ready = torch.full((), not shape.plain, dtype=torch.bool, device=self.device)  # a fill, not a host copy
        if not shape.plain or not self.budget:  # no plain steps: always ready; no tree: never a candidate
            return ready
        if shape.lookup:
            ready = ready | has_match(self.history, self.history_len, self.corpus)
        if shape.guess:  # entries this generation stored, or a job's memory that has paid under this key
            ready = ready | self.pool.worth_a_step(self.pending[-1:], self.generation)
        return ready

    def _tree(self):
        """This rank's verification tree: its share of the prompt-lookup and pool candidates, merged."""
        shape, depth = self.shape, self.shape.depth
        parts, valid, strength = [], [], []
        if shape.lookup:
            tokens, ok, match = prompt_lookup(self.history, self.history_len, shape.lookup, shape.lookup_len,
                                              self.corpus)
            parts.append(tokens)
            valid.append(ok)
            strength.append(self.lookup_strength[match])
        if shape.guess:
            tokens, ok = self.pool.lookup(self.pending[-1], 0, shape.guess)
            ok = ok[:, None].expand_as(tokens)
            if shape.chain:
                tokens, ok = self.pool.chained(tokens, ok, shape.chain, shape.chain_room)
            parts.append(tokens)
            valid.append(ok)
            strength.append(self.pool_strength)
        candidates = torch.cat([torch.nn.functional.pad(t, (0, depth - t.shape[1])) for t in parts])
        ok = torch.cat([torch.nn.functional.pad(v, (0, depth - v.shape[1])) for v in valid])
        rows = self.tree_rows
        return build_tree(candidates[rows], ok[rows], self.budget, torch.cat(strength)[rows])

    def _mask(self, cached: torch.Tensor, shift: torch.Tensor, tree) -> torch.Tensor:
        """Additive mask [1, 1, T, capacity]: the committed cache is visible, the step's tree applies within it,
        padded pending slots (the first `shift`) are seen by no other row, and slots past the step are hidden."""
        t = self.tokens
        hidden = self.fixed_hidden
        if tree is not None:  # tree rows see what the last pending row sees, and their own ancestors
            f, b = self.fixed, self.budget
            last = self.fixed_hidden[self.shape.pending - 1]
            hidden = torch.cat([torch.cat([hidden, torch.ones(f, b, dtype=torch.bool, device=self.device)], 1),
                                torch.cat([last.expand(b, f), ~tree.ancestors], 1)])
        rows = torch.arange(t, device=self.device)
        within = hidden | ((rows[None, :] < shift) & (rows[None, :] != rows[:, None]))
        rel = torch.arange(self.capacity, device=self.device) - cached
        inside = (rel >= 0) & (rel < t)
        hidden = (rel >= t)[None, :] | (inside[None, :] & within[:, rel.clamp(0, t - 1)])
        mask = torch.zeros(t, self.capacity, dtype=self.dtype, device=self.device)
        return mask.masked_fill(hidden, torch.finfo(self.dtype).min)[None, None]


def kv_exchange_buffer(cache: SlotCache, accept: int, lanes: int | None = None) -> torch.Tensor:
    """Zeros at a fixed address for the winner's KV entries that kv_sync=gather sums over the ranks:
    [layers, b, h, accept, dk + dv] (keys and values side by side: head sizes may differ), or one such buffer per
    batch row, [lanes, layers, 1, h, accept, dk + dv], for the lanes of a batch."""
    keys, values = cache.layers[0].keys, cache.layers[0].values
    rows = keys.shape[0] if lanes is None else 1
    lead = (len(cache.layers),) if lanes is None else (lanes, len(cache.layers))
    buffer = torch.zeros(*lead, rows, keys.shape[1], accept, keys.shape[-1] + values.shape[-1], dtype=keys.dtype,
                         device=keys.device)
    torch._dynamo.mark_static_address(buffer)
    return buffer


def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] for a 0-d device index, as a gather (plain indexing would read the index on the host)."""
    return t.index_select(0, index.view(1))[0]
