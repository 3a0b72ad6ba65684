"""The verification tree: prompt lookup finds the right continuations, shared prefixes share nodes, the budget
keeps the best ranked nodes, and verification accepts the longest path the model confirms."""
import torch

from lp.candidate_tree import build_tree, has_match, prompt_lookup, verify


def t(values):
    return torch.tensor(values, dtype=torch.long)


def history(tokens, capacity=16):
    return torch.cat([t(tokens), torch.full((capacity - len(tokens),), -7)]), torch.tensor(len(tokens))


def test_has_match_says_whether_the_last_token_occurred_before_it():
    texts = [[5], [5, 6], [5, 6, 5], [7, 8, 9, 10], [1, 2, 3, 2, 4, 2], [9, 9]]
    for text in texts:
        history = torch.tensor(text + [text[-1]] * 4)  # entries past the text never count
        found = bool(has_match(history, torch.tensor(len(text))))
        assert found == (text[-1] in text[:-1]), text
        assert found == bool(prompt_lookup(history, torch.tensor(len(text)), 2, 3)[1][:, 0].any()), text


def test_prompt_lookup_ranks_longer_matches_first():
    #        0  1  2  3  4  5  6  7  8  9
    text = [5, 1, 2, 8, 9, 3, 2, 6, 1, 2]  # ends with "1 2": matched in full at index 2, "2" alone at index 6
    tokens, valid, _ = prompt_lookup(*history(text), count=3, size=3)
    assert tokens[0].tolist() == [8, 9, 3]  # after the two-token match "1 2" (ending at index 2)
    assert tokens[1].tolist() == [6, 1, 2]  # after the one-token match "2" at index 6
    assert valid[:2].all() and not valid[2].any()  # no third match


def test_prompt_lookup_stops_continuations_at_the_end_of_the_text():
    text = [4, 7, 4, 7, 4]
    tokens, valid, _ = prompt_lookup(*history(text), count=1, size=4)
    # "7 4" ... the longest suffix match ending before the last token: "4 7 4" ends at index 2
    assert tokens[0, :2].tolist() == [7, 4] and valid[0].tolist() == [True, True, False, False]


def test_candidates_sharing_a_prefix_share_nodes_and_the_budget_keeps_the_best_ranked():
    cands = t([[1, 2, 3], [1, 2, 4], [1, 5, 6], [9, 9, 9]])
    valid = torch.ones(4, 3, dtype=torch.bool)
    tree = build_tree(cands, valid, budget=6)
    # nodes in rank order: 1, 2, 3 | 4 (under 2) | 5, 6 (under 1) -- the fourth candidate does not fit
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert tree.parent.tolist() == [-1, 0, 1, 1, 0, 4]
    assert tree.depth.tolist() == [1, 2, 3, 3, 2, 3]
    assert tree.valid.all()
    assert tree.ancestors[5].nonzero().flatten().tolist() == [0, 4, 5]


def test_a_tree_with_room_to_spare_marks_the_empty_slots():
    cands = t([[1, 2], [1, 2], [3, 0]])
    valid = t([[1, 1], [1, 1], [1, 0]]).bool()  # the third candidate is one token long
    tree = build_tree(cands, valid, budget=5)
    assert tree.valid.tolist() == [True, True, True, False, False]
    assert tree.tokens[:3].tolist() == [1, 2, 3] and tree.parent[:3].tolist() == [-1, 0, -1]


def test_verification_accepts_the_deepest_confirmed_path():
    cands = t([[1, 2, 3], [1, 2, 4], [1, 5, 6]])
    tree = build_tree(cands, torch.ones(3, 3, dtype=torch.bool), budget=6)  # slots: 1 2 3 4 5 6
    # the model says: after the root 1, after 1 -> 2, after 2 -> 4, after 4 -> 8 (the bonus token)
    preds = t([2, 4, 0, 8, 0, 0])
    run, path = verify(tree, torch.tensor(1), preds, 3)
    assert int(run) == 3 and path.tolist() == [0, 1, 3]
    assert preds[path].tolist() == [2, 4, 8]  # the tokens accepted after the root's own prediction


def test_verification_of_a_tree_nobody_confirms_accepts_nothing():
    tree = build_tree(t([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), budget=3)
    run, _ = verify(tree, torch.tensor(7), t([2, 3, 0]), 2)
    assert int(run) == 0


def test_prompt_lookup_prefers_a_match_followed_by_a_whole_continuation():
    #        0  1  2  3  4  5  6  7
    text = [3, 8, 8, 9, 4, 6, 3, 3]  # "3" matched at 0 (3 tokens follow it) and at 6 (one token, then the end)
    tokens, valid, _ = prompt_lookup(*history(text), count=2, size=3)
    assert tokens[0].tolist() == [8, 8, 9] and valid[0].all()
    assert tokens[1, :1].tolist() == [3] and valid[1].tolist() == [True, False, False]


def test_with_strengths_the_budget_goes_to_the_nodes_most_likely_to_be_reached():
    # a strong candidate (0.9 a token) and two weak ones (0.3): the strong one's third token (0.9^3 = 0.73) is
    # likelier to be reached than a weak one's first (0.3), so the strong one goes deep first
    cands = t([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    valid = torch.ones(3, 4, dtype=torch.bool)
    tree = build_tree(cands, valid, budget=5, strength=torch.tensor([0.3, 0.9, 0.3]))
    assert sorted(tree.tokens.tolist()) == [1, 5, 6, 7, 8]  # 0.9, 0.81, 0.73, 0.66 then 0.3 (first row first)
    assert all(tree.valid) and all(p < 0 or tree.tokens[p] in (5, 6, 7) for p in tree.parent.tolist())


def test_a_prefix_shared_with_a_strong_candidate_is_as_strong_as_it():
    cands = t([[1, 2, 3], [1, 2, 4]])  # the weak first candidate shares "1 2" with the strong second one
    tree = build_tree(cands, torch.ones(2, 3, dtype=torch.bool), budget=3, strength=torch.tensor([0.2, 0.9]))
    assert sorted(tree.tokens.tolist()) == [1, 2, 4]
