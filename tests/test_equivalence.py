"""The first promise: output token-identical to transformers' greedy generate, for every drafter."""

from __future__ import annotations

import pytest
import torch
from ctc_helpers import tiny_ctc_drafter, tiny_heads_drafter

from conftest import VOCAB, hf_greedy, tiny_model
from ctcspec.drafters import DRAFTERS, LookupDrafter, VanillaDrafter
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.hybrid import CTCLookupDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.pricing import BudgetPlan, PricedBudget
from ctcspec.tree import TokenTree


class RandomTreeDrafter(Drafter):
    """Adversarial drafter: random branching trees, nearly always wrong."""

    name = "random"

    def __init__(self, seed: int = 0, vocab: int = VOCAB):
        self.seed, self.vocab = seed, vocab

    def reset(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def propose(self, request: DraftRequest) -> TokenTree:
        seqs = [torch.randint(0, self.vocab, (4,), generator=self.gen).tolist() for _ in range(3)]
        return TokenTree.from_sequences(seqs + [seqs[0][:2] + [3]])


class OracleDrafter(Drafter):
    """Knows the right answer; drafts it, cut at a varying depth, beside wrong siblings."""

    name = "oracle"

    def __init__(self, prompt: list[int], answer: list[int], vocab: int = VOCAB):
        self.full, self.vocab = prompt + answer, vocab

    def propose(self, request: DraftRequest) -> TokenTree:
        n = len(request.tokens)
        truth = self.full[n: n + 1 + n % 5]
        wrong = [(t + 1) % self.vocab for t in truth]
        return TokenTree.from_sequences([wrong[:2], truth, truth[:1] + wrong[1:]])


def prompts(count: int = 32) -> list[list[int]]:
    """Short, long and repetitive prompts of random tokens."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(torch.randint(2, VOCAB, (1 + i % 3,), generator=gen).tolist())
        elif kind == 1:
            out.append(torch.randint(2, VOCAB, (60 + 5 * i,), generator=gen).tolist())
        else:
            motif = torch.randint(2, VOCAB, (3 + i % 5,), generator=gen).tolist()
            out.append((motif * 12)[: 20 + i])
    return out


# a cost plan under which ctc+lookup's CTC budget changes from step to step (0 included)
PRICES = BudgetPlan({2: 0.6, 6: 1.2}, {1: 1.0, 4: 1.3, 8: 1.6, 16: 2.4}, {2: 0.0, 6: 0.1})


def drafters_for(prompt, answer, model):
    ctc = tiny_ctc_drafter(model, seed=len(prompt), tree_budget=12)
    priced = CTCLookupDrafter(tiny_ctc_drafter(model, seed=2, tree_budget=PricedBudget(PRICES, 6)),
                              LookupDrafter(min_ngram=1))
    return [VanillaDrafter(), LookupDrafter(), LookupDrafter(min_ngram=1, tree_budget=40),
            ctc, CTCLookupDrafter(tiny_ctc_drafter(model, seed=1, tree_budget=6), LookupDrafter(min_ngram=1)),
            priced,
            *(tiny_heads_drafter(model, kind, seed=len(prompt), tree_budget=4 + len(prompt) % 9)
              for kind in ("medusa", "hydra", "eagle")),
            RandomTreeDrafter(len(prompt)), OracleDrafter(prompt, answer)]


def test_every_registered_drafter_is_exercised():
    model = tiny_model("llama")
    prompt = prompts()[0]
    exercised = {drafter.name for drafter in drafters_for(prompt, hf_greedy(model, prompt, 4), model)}
    assert set(DRAFTERS) <= exercised, f"add {set(DRAFTERS) - exercised} to drafters_for"


def test_identical_to_hf_generate_on_32_prompts(arch_model):
    arch, model = arch_model
    max_new = 48
    for prompt in prompts():
        expected = hf_greedy(model, prompt, max_new)
        assert len(expected) == max_new
        for drafter in drafters_for(prompt, expected, model):
            got = SpeculativeEngine(model, drafter).generate(prompt, max_new)
            assert got.tokens == expected, f"{arch}/{drafter.name} prompt={prompt[:8]}..."
            assert got.stats.stop_reason == "max_new_tokens"


def test_identical_when_eos_ends_the_answer(arch_model):
    arch, model = arch_model
    for prompt in prompts(12):
        free = hf_greedy(model, prompt, 40)
        eos = free[len(free) // 3]  # a token the model really emits, a third of the way in
        expected = hf_greedy(model, prompt, 40, eos=eos)
        assert expected == free[: free.index(eos) + 1]  # the oracle stops at the first EOS
        for drafter in drafters_for(prompt, expected, model):
            got = SpeculativeEngine(model, drafter).generate(prompt, 40, eos_token_id=eos)
            assert got.tokens == expected, f"{arch}/{drafter.name}"
            assert got.stats.stop_reason == "eos"


def test_oracle_drafts_are_accepted_so_beta_is_high():
    model = tiny_model("llama")
    prompt = prompts()[2]
    expected = hf_greedy(model, prompt, 60)
    got = SpeculativeEngine(model, OracleDrafter(prompt, expected)).generate(prompt, 60)
    assert got.tokens == expected
    assert got.stats.beta > 2.5


def test_random_drafts_cost_nothing_in_correctness_and_give_beta_one():
    model = tiny_model("qwen2")
    prompt = prompts()[1]
    got = SpeculativeEngine(model, RandomTreeDrafter()).generate(prompt, 30)
    assert got.tokens == hf_greedy(model, prompt, 30)
    assert got.stats.beta < 1.3


def test_eager_attention_gives_the_same_output():
    """transformers' eager path misreads boolean 4D masks; ours are additive floats."""
    model = tiny_model("llama", attn="eager")
    for prompt in prompts(8):
        expected = hf_greedy(model, prompt, 32)
        for drafter in drafters_for(prompt, expected, model):
            assert SpeculativeEngine(model, drafter).generate(prompt, 32).tokens == expected


def test_context_limit_stops_generation_exactly_at_capacity():
    model = tiny_model("llama")
    prompt = (prompts()[2] * 30)[:300]
    got = SpeculativeEngine(model, LookupDrafter(min_ngram=1)).generate(prompt, 100)
    assert len(prompt) + len(got.tokens) == 320
    assert got.stats.stop_reason == "context_limit"
    assert got.tokens == hf_greedy(model, prompt, 20)


@pytest.mark.parametrize("max_new", [0, 1, 2])
def test_tiny_budgets(max_new):
    model = tiny_model("llama")
    prompt = prompts()[0]
    got = SpeculativeEngine(model, LookupDrafter()).generate(prompt, max_new)
    assert got.tokens == (hf_greedy(model, prompt, max_new) if max_new else [])


def test_sliding_window_model_generates_inside_its_window():
    """Mistral-style sliding-window caches drop old keys; the engine stays inside the window."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from conftest import _COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**_COMMON, sliding_window=48)).eval()
    model.generation_config.eos_token_id = None
    prompt = (prompts()[2] * 4)[:30]
    got = SpeculativeEngine(model, LookupDrafter(min_ngram=1)).generate(prompt, 40)
    assert got.stats.stop_reason == "context_limit"
    assert len(prompt) + len(got.tokens) == 47
    assert got.tokens == hf_greedy(model, prompt, len(got.tokens))
