import torch

from ctcspec.drafters import LookupDrafter
from ctcspec.drafters.base import DraftRequest
from ctcspec.tree import TokenTree, is_chain


def request(tokens, accepted=0):
    return DraftRequest(torch.tensor(tokens), max_depth=100, accepted=accepted)


def test_copies_what_followed_the_last_ngram():
    drafter = LookupDrafter(draft_len=3)
    tree = drafter.propose(request([1, 2, 3, 4, 5, 9, 1, 2, 3]))
    assert tree.paths()[-1] == (4, 5, 9)
    assert is_chain(tree.parents)


def test_prefers_the_longest_ngram_and_merges_distinct_matches():
    drafter = LookupDrafter(max_ngram=3, min_ngram=1, draft_len=2)
    #            [7 8] -> 1 ;  [6 7 8] -> 2 3  ; [6 7 8] -> 4 5 (most recent first)
    tree = drafter.propose(request([7, 8, 1, 6, 7, 8, 2, 3, 6, 7, 8, 4, 5, 6, 7, 8]))
    assert set(tree.paths()) == {(4,), (4, 5), (2,), (2, 3)}
    assert tree.tokens[0] == 4


def test_no_match_no_draft():
    assert LookupDrafter().propose(request([1, 2, 3, 4])) == TokenTree()


def test_respects_depth_and_node_budgets():
    drafter = LookupDrafter(min_ngram=1, draft_len=8, tree_budget=3)
    tree = drafter.propose(DraftRequest(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]), max_depth=2))
    assert len(tree) == 2 and max(tree.depths()) == 2


def test_stops_drafting_after_repeated_rejections_and_resets_per_generation():
    drafter = LookupDrafter(max_ngram=2, min_ngram=2, draft_len=2)
    tokens = [1, 2, 3, 1, 2]
    for step in range(6):
        tree = drafter.propose(request(tokens))
        if not len(tree):
            break
        tokens = tokens + [50 + step, 1, 2]  # the base model never takes the draft (3), then repeats 1 2
    else:
        raise AssertionError("lookup kept drafting although nothing was accepted")
    assert step >= 2  # the optimistic prior gives it a few chances first
    drafter.reset()
    assert len(drafter.propose(request([1, 2, 3, 1, 2]))) > 0


def test_keeps_drafting_while_drafts_are_accepted():
    drafter = LookupDrafter(max_ngram=2, min_ngram=2, draft_len=2)
    tokens = [1, 2, 3, 4, 1, 2]
    for step in range(10):
        tree = drafter.propose(request(tokens, accepted=2 if step else 0))
        assert tree.paths()[-1] == (3, 4)
        tokens = tokens + [3, 4, 1, 2]  # accepted both, then the bonus and one more step's worth
    assert drafter.expected_accept(2) > 1.5
