"""Candidate statistics: each source's measured chance of being right ranks the tree's nodes when its budget binds."""
import torch

from lp.candidate_tree import LOOKUP_STRENGTH, POOL_STRENGTH, build_tree
from lp.source_stats import HALVE_AT, PRIOR_TRIES, SourceStats


def test_a_candidates_matching_lead_counts_as_hits_and_its_first_wrong_token_as_a_miss():
    stats = SourceStats(guess=2, device=torch.device("cpu"))
    candidates = torch.tensor([[5, 6, 7],    # lookup, match 1: right as far as the committed run reaches (2 tokens)
                               [5, 9, 0],    # the pool's newest entry: 1 right, then wrong
                               [8, 0, 0],    # its older entry: wrong at once
                               [4, 4, 4]])   # no candidate (not valid): counts for nothing
    valid = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [False] * 3])
    classes = torch.tensor([1, 5, 6, 5])
    truth = torch.tensor([5, 6, 99, 99])  # the step committed 2 tokens; what follows is not known
    stats.update(candidates, valid, classes, truth, torch.tensor(2))
    assert stats.hits.tolist() == [0, 2, 0, 0, 0, 1, 0]
    assert stats.tries.tolist() == [0, 2, 0, 0, 0, 2, 1]  # row 0's third token was never checked: no miss


def test_a_candidate_cut_short_is_not_counted_past_its_end():
    stats = SourceStats(guess=1, device=torch.device("cpu"))
    stats.update(torch.tensor([[5, 0, 0]]), torch.tensor([[True, False, False]]), torch.tensor([2]),
                 torch.tensor([5, 6, 7]), torch.tensor(3))
    assert (stats.hits[2].item(), stats.tries[2].item()) == (1, 1)


def test_chances_start_at_the_hand_set_prior_and_move_to_what_was_measured():
    stats = SourceStats(guess=3, device=torch.device("cpu"))
    prior = list(LOOKUP_STRENGTH) + [POOL_STRENGTH, POOL_STRENGTH * 0.97, POOL_STRENGTH * 0.97 ** 2]
    assert torch.allclose(stats.chances(), torch.tensor(prior, dtype=torch.float64))
    stats.hits[5], stats.tries[5] = 3 * PRIOR_TRIES, 3 * PRIOR_TRIES  # the pool's newest entry: always right lately
    assert abs(stats.chances()[5].item() - (3 + POOL_STRENGTH) / 4) < 1e-12  # 3 parts measured, 1 part prior
    stats.hits[1], stats.tries[1] = HALVE_AT // 4, HALVE_AT  # lookup at match 1: a quarter right, many tries
    stats.update(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]),
                 torch.tensor([1, 1]), torch.tensor(2))  # one more miss tips it past HALVE_AT: halved
    assert (stats.hits[1].item(), stats.tries[1].item()) == (HALVE_AT // 8, (HALVE_AT + 1) // 2)
    stats.reset()
    assert stats.tries.sum() == 0 and torch.allclose(stats.chances(), torch.tensor(prior, dtype=torch.float64))


def test_the_budget_goes_to_the_source_that_has_been_right():
    candidates = torch.tensor([[1, 2, 3],    # prompt lookup, match length 1
                               [4, 5, 6]])   # the pool's newest entry
    valid = torch.ones(2, 3, dtype=torch.bool)
    classes = torch.tensor([1, 5])

    def tree_tokens(pool_right: bool) -> list[int]:
        stats = SourceStats(guess=1, device=torch.device("cpu"))
        truth = torch.tensor([4, 5, 6]) if pool_right else torch.tensor([1, 2, 3])
        for _ in range(20):
            stats.update(candidates, valid, classes, truth, torch.tensor(3))
        tree = build_tree(candidates, valid, 3, stats.chances()[classes])
        return tree.tokens[tree.valid].tolist()

    assert tree_tokens(pool_right=False) == [1, 2, 3]  # by the hand-set prior lookup would win either way...
    assert tree_tokens(pool_right=True) == [4, 5, 6]   # ...but the pool has been right and lookup wrong
