"""The verification branch as a token tree of fixed size, built and verified with fixed-shape tensor ops.

Candidates come from two sources, merged in rank order: prompt lookup (continuations of the places where the
text's last tokens occurred before, in the record or in the job's corpus: longest match first, then a full-length
continuation, then the latest) and the n-gram pool. Candidates that share a prefix share its nodes (a trie), and
the first `budget` distinct nodes in rank order are fed, so the step shape never changes. Verification walks the
tree: a node is confirmed when its token is the model's greedy choice after its parent, and the deepest confirmed
node's path is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .first_index import first_max, first_true
from .job_corpus import MAX_MATCH, MIN_MATCH, JobCorpus  # the longest suffix matched; the shortest in the corpus

# Estimated chance that a candidate's next token is right, which orders the tree's nodes when the budget binds:
# prompt lookup's by match length (0..MAX_MATCH), the pool's newest entry and the factor per older one. Hand-set
# guesses, not fitted.
LOOKUP_STRENGTH = (0.5, 0.6, 0.75, 0.85, 0.9)
POOL_STRENGTH, POOL_DECAY = 0.45, 0.97


@dataclass
class Tree:
    """`budget` nodes: token, parent slot (-1: the last committed token), depth (1 = first new token), whether
    the slot holds a node, and ancestors [budget, budget] (each node is its own ancestor)."""

    tokens: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    ancestors: torch.Tensor


def prompt_lookup(history: torch.Tensor, length: torch.Tensor, count: int, size: int, corpus: JobCorpus | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continuations of `size` tokens after the `count` best earlier matches of the text's suffix, in the text
    itself and in `corpus` (a job's earlier texts: lp.job_corpus, whose index offers the newest matches of each
    length there, and the newest followed by a whole continuation).

    history [H] holds the committed text in its first `length` (0-d) entries. A match ends at i < length - 1
    where history[..i] ends like history[..length-1] for 1..MAX_MATCH tokens (MIN_MATCH.. in the corpus); longer
    matches rank first, then those followed by `size` tokens, then the text's own, then later ones. Returns tokens
    [count, size], valid [count, size] (continuations stop at the end of the text, or of a corpus text) and each
    one's match length [count] (0: no match)."""
    h = history.numel()
    suffix = _suffix(history, length)
    run = _runs(history, suffix)
    i = torch.arange(h, device=history.device)
    full = (length - 1 - i >= size).long()  # a match too close to the end has a cut-off continuation
    c = 0 if corpus is None else corpus.tokens.numel()
    score = torch.where((i < length - 1) & (run > 0), (run * 2 + full) * (h + c) + c + i, -1)
    at, room = i, length - 1 - i  # where each match ends (h + j: the corpus' position j), tokens that follow it
    if corpus is not None:
        where, corpus_run = _corpus_matches(corpus, suffix)
        after = corpus.room[where.clamp(min=0)]
        score = torch.cat([score, torch.where(corpus_run >= MIN_MATCH,
                                              (corpus_run * 2 + (after >= size).long()) * (h + c) + where, -1)])
        run, at, room = torch.cat([run, corpus_run]), torch.cat([at, h + where]), torch.cat([room, after])
    best, pick = score.topk(count)
    end = at[pick]
    step = torch.arange(size, device=history.device)[None, :]
    ahead = end[:, None] + 1 + step
    tokens = history[ahead.clamp(max=h - 1)]
    if corpus is not None:
        tokens = torch.where(end[:, None] < h, tokens, corpus.tokens[(ahead - h).clamp(0, c - 1)])
    # a continuation stops at the end of the text it is in: the record's, or an earlier one of the corpus
    valid = (best >= 0)[:, None] & (step < room[pick][:, None])
    return tokens, valid, torch.where(best >= 0, run[pick], 0)


def has_match(history: torch.Tensor, length: torch.Tensor, corpus: JobCorpus | None = None) -> torch.Tensor:
    """Whether `prompt_lookup` finds any match (0-d bool): a match of 1+ tokens exists exactly when the text's last
    token occurred before it; one in the corpus when its index holds the text's last MIN_MATCH tokens."""
    i = torch.arange(history.numel(), device=history.device)
    last = history.index_select(0, (length - 1).clamp(min=0).view(1))  # a gather: a 0-d index is read on the host
    found = ((history == last) & (i < length - 1)).any()
    if corpus is not None:
        found = found | (_corpus_matches(corpus, _suffix(history, length))[1] >= MIN_MATCH).any()
    return found


def _corpus_matches(corpus: JobCorpus, suffix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus positions its index offers for the text's suffix [M] (-1: none) and how many of the suffix's
    tokens each ends with (0 for a repeat of an earlier one, or for a hash collision that does not match)."""
    where = corpus.positions(suffix)
    back = where[:, None] - torch.arange(MAX_MATCH, device=where.device)[None, :]
    seen = torch.where(back >= 0, corpus.tokens[back.clamp(min=0)], -1)
    run = ((seen == suffix[None, :]) & (where[:, None] >= 0)).long().cumprod(1).sum(1)
    earlier = torch.ones(where.numel(), where.numel(), dtype=torch.bool, device=where.device).tril(-1)
    repeat = ((where[:, None] == where[None, :]) & earlier).any(1)
    return where, torch.where(repeat, 0, run)


def _suffix(history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """The text's last MAX_MATCH tokens, last first (-2 before its start: equal to no token and to no separator)."""
    there = length - 1 - torch.arange(MAX_MATCH, device=history.device)
    return torch.where(there >= 0, history.index_select(0, there.clamp(min=0)), -2)


def _runs(text: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """For each position i of `text`, how many of `suffix`'s tokens (last first) text[..i] ends with [len(text)]:
    shifted slices compared, no gather."""
    n = text.numel()
    alive = torch.ones(n, dtype=torch.bool, device=text.device)
    run = torch.zeros(n, dtype=torch.long, device=text.device)
    for j in range(min(suffix.numel(), n)):
        alive = alive & torch.nn.functional.pad(text[: n - j] == suffix[j], (j, 0))
        run = run + alive
    return run


def build_tree(candidates: torch.Tensor, valid: torch.Tensor, budget: int, strength: torch.Tensor | None = None
               ) -> Tree:
    """Merge candidates [R, L] (valid [R, L] is a prefix of each row) into a trie of `budget` slots.

    Without `strength` the slots take the first distinct nodes row by row. With it ([R], each row's estimated
    chance that one more of its tokens is right), they take the nodes most likely to be reached: a node's
    chance is that of the strongest row through it, to the power of its depth. Either way a node's parent is
    in the tree whenever the node is."""
    r, length = candidates.shape
    device = candidates.device
    n = r * length
    both = valid[:, None, :] & valid[None, :, :]
    same = ((candidates[:, None, :] == candidates[None, :, :]) & both).long().cumprod(-1).bool()  # [R, R, L]
    first = first_true(same, 1).clamp(max=r - 1)  # [R, L]: the first row sharing this prefix (itself if valid)
    rows = torch.arange(r, device=device)[:, None]
    distinct = (valid & (first == rows)).flatten()
    cols = torch.arange(length, device=device)[None, :].expand(r, length)
    if strength is None:
        slot = distinct.long().cumsum(0) - 1
    else:
        odds = strength.double().log()[None, :, None].expand(r, r, length)
        reach = torch.where(same, odds, -torch.inf).amax(1) * (cols + 1)  # [R, L] log chance of reaching the node
        order = torch.arange(n, device=device, dtype=torch.float64)
        key = torch.where(distinct, reach.flatten() - order * 1e-9, -torch.inf)  # ties: a parent precedes its child
        k = min(budget, n)
        best = key.topk(k)
        slot = torch.full((n,), budget, dtype=torch.long, device=device).index_put(
            (best.indices,), torch.where(best.values > -torch.inf, torch.arange(k, device=device), budget))
    kept = distinct & (slot < budget)
    target = torch.where(kept, slot, budget)  # slot `budget` takes the nodes left out

    parent_node = (first[:, :-1] * length + cols[:, :-1])  # node (first row, j - 1) for j >= 1
    parent_slot = torch.cat([torch.full((r, 1), -1, dtype=torch.long, device=device),
                             slot[parent_node]], 1).flatten()

    def place(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((budget + 1,), fill, dtype=values.dtype, device=device)
        return out.index_put((target,), values)[:budget]

    tokens = place(candidates.flatten(), 0)
    parent = place(parent_slot, -1)
    depth = place((cols + 1).flatten(), 1)
    filled = place(kept, False)
    eye = torch.eye(budget, dtype=torch.bool, device=device)
    ancestors = eye
    has_parent = (parent >= 0)[:, None]
    for _ in range(length - 1):
        ancestors = eye | (has_parent & ancestors[parent.clamp(min=0)])
    return Tree(tokens, parent, depth, filled, ancestors)


def verify(tree: Tree, root_pred: torch.Tensor, preds: torch.Tensor, length: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest confirmed path: its length (0-d) and its slots [length] by depth (entries past it are junk).

    root_pred is the greedy token after the last committed one, preds [budget] the greedy token after each node."""
    after_parent = torch.where(tree.parent < 0, root_pred, preds[tree.parent.clamp(min=0)])
    ok = tree.valid & (tree.tokens == after_parent)
    confirmed = ok
    for _ in range(length - 1):
        confirmed = ok & ((tree.parent < 0) | confirmed[tree.parent.clamp(min=0)])
    score = torch.where(confirmed, tree.depth, 0)
    best = first_max(score)  # the first deepest confirmed node: the highest ranked candidate wins ties
    run = score.index_select(0, best.view(1))[0]
    on_path = tree.ancestors.index_select(0, best.view(1))[0]  # [budget]
    levels = torch.arange(1, length + 1, device=preds.device)[:, None]
    path = first_true(on_path[None, :] & (tree.depth[None, :] == levels)).clamp(max=tree.depth.numel() - 1)
    return run, path
