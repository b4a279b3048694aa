"""Engine steps with hand-built trees on every backend: acceptance, positions and the compacted KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import hf_greedy, tiny_model
from ctcspec.accept import accept_path
from ctcspec.backends import TORCH_BACKENDS
from ctcspec.drafters.base import Drafter
from ctcspec.engine import speculative_step
from ctcspec.tree import ROOT, TokenTree
from ctcspec.verify import prefill

PROMPT = [5, 17, 42, 8, 91, 33, 7, 60, 12]


def start(backend, prompt=PROMPT):
    """Cache over prompt[:-1]... as the engine keeps it: everything but the root."""
    cache = backend.new_cache(200)
    first = prefill(backend, cache, prompt)
    return cache, torch.tensor(prompt + first.logits.argmax(dim=-1).tolist())


def plain_cache(model, tokens: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
    return cache


def assert_cache_equals_plain_forward(backend, cache, tokens: list[int]):
    """The compacted cache holds exactly what one HF forward over `tokens` computes."""
    reference = plain_cache(backend.model, tokens)
    assert backend.length(cache) == len(tokens)
    for (keys, values), want in zip(backend.entries(cache), reference.layers, strict=True):
        torch.testing.assert_close(keys, want.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, want.values, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=[(arch, backend) for arch in ("llama", "qwen2") for backend in TORCH_BACKENDS],
                ids=lambda p: "-".join(p))
def model_and_truth(request):
    arch, backend = request.param
    model = tiny_model(arch, seed=3)
    return TORCH_BACKENDS[backend](model), hf_greedy(model, PROMPT, 40)


def wrong(token: int) -> int:
    return (token + 7) % 96


def test_accept_path_walks_greedy_children():
    #            root  a  b  c  d
    tokens = [0, 10, 11, 20, 12]
    parents = [-1, 0, 1, 0, 2]
    greedy = [10, 11, 12, 99, 13]   # root->10, 10->11, 11->12, 12->13 (bonus)
    acc = accept_path(tokens, parents, lambda node, _: greedy[node])
    assert acc.path == [0, 1, 2, 4]
    assert acc.tokens == [10, 11, 12, 13]


def test_no_draft_accepted_gives_one_token(model_and_truth):
    backend, truth = model_and_truth
    cache, tokens = start(backend)
    tree = TokenTree.from_sequences([[wrong(truth[1])], [wrong(truth[1]) + 1, truth[2]]])
    step = speculative_step(backend, cache, tokens, tree)
    assert step.tokens == [truth[1]] and step.path == [0]
    assert_cache_equals_plain_forward(backend, cache, PROMPT + truth[:1])


def test_whole_deep_chain_accepted(model_and_truth):
    backend, truth = model_and_truth
    cache, tokens = start(backend)
    step = speculative_step(backend, cache, tokens, TokenTree.chain(truth[1:13]))
    assert step.tokens == truth[1:14]
    assert_cache_equals_plain_forward(backend, cache, PROMPT + truth[:13])


def test_branching_tree_accepts_the_right_branch(model_and_truth):
    backend, truth = model_and_truth
    cache, tokens = start(backend)
    # The correct branch is inserted last, so its nodes are not a contiguous prefix of the tree.
    tree = TokenTree.from_sequences([
        [wrong(truth[1]), truth[2], truth[3]],
        [truth[1], wrong(truth[2])],
        [truth[1], truth[2], wrong(truth[3]), truth[4]],
        [truth[1], truth[2], truth[3], truth[4]],
    ])
    step = speculative_step(backend, cache, tokens, tree)
    assert step.tokens == truth[1:6]
    assert step.path != list(range(len(step.path)))
    assert_cache_equals_plain_forward(backend, cache, PROMPT + truth[:5])


def test_duplicate_prefixes_are_verified_once(model_and_truth):
    backend, truth = model_and_truth
    raw = TokenTree((truth[1], truth[1], truth[2], truth[2], truth[3]), (ROOT, ROOT, 0, 1, 3))
    tree = raw.truncated()
    assert len(tree) == 3
    cache, tokens = start(backend)
    step = speculative_step(backend, cache, tokens, tree)
    assert step.tokens == truth[1:5]


def test_cache_after_many_mixed_steps_equals_one_plain_forward(model_and_truth):
    backend, truth = model_and_truth
    cache, tokens = start(backend)
    produced = tokens.tolist()
    gen = torch.Generator().manual_seed(0)
    while len(produced) - len(PROMPT) < 30:
        done = len(produced) - len(PROMPT)
        right = truth[done: done + int(torch.randint(0, 5, (1,), generator=gen))]
        noise = torch.randint(0, 96, (3,), generator=gen).tolist()
        tree = TokenTree.from_sequences([noise, right + noise[:1], right[:1] + [wrong(t) for t in right[1:]]])
        step = speculative_step(backend, cache, torch.tensor(produced), tree)
        produced += step.tokens
    assert produced[len(PROMPT):] == truth[: len(produced) - len(PROMPT)]
    assert_cache_equals_plain_forward(backend, cache, produced[:-1])


class HiddenRecorder(Drafter):
    """A drafter that asks for hidden states and records what it is given (for future model drafters)."""

    name = "hidden-recorder"
    needs_hidden_states = True

    def __init__(self, truth):
        self.truth, self.seen = truth, []

    def reset(self):
        self.seen = []

    def propose(self, request):
        self.seen.append((len(request.tokens), request.new_hidden))
        n = len(request.tokens) - len(PROMPT)
        return TokenTree.from_sequences([self.truth[n: n + 2], [wrong(self.truth[n])]])


def test_drafters_get_the_hidden_states_of_exactly_the_accepted_positions(model_and_truth):
    from ctcspec.engine import SpeculativeEngine

    backend, truth = model_and_truth
    model = backend.model
    recorder = HiddenRecorder(truth)
    result = SpeculativeEngine(model, recorder, backend=backend).generate(PROMPT, 12)
    assert result.tokens == truth[:12]
    sequence = PROMPT + result.tokens
    with torch.inference_mode():
        reference = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states[-1][0]
    covered = 0
    for length, hidden in recorder.seen:
        # the positions accepted since the previous request: everything up to, not including, the root
        assert hidden.shape[0] == length - 1 - covered
        torch.testing.assert_close(hidden, reference[covered: length - 1], atol=1e-4, rtol=1e-4)
        covered = length - 1
    assert result.stats.beta > 2
