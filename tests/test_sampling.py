"""Logits processors and sampling: ctcspec decodes as transformers' generate does, with every drafter.

The oracle is always transformers: `model.generate` and its own processor classes, never ctcspec.

Greedy decoding with processors is checked token for token. Sampling is checked in distribution by
chi-square tests, designed as follows.

* Setting (`SETTING`): tiny llama (seed 1), prompt [7, 7, 7, 7], do_sample with repetition_penalty=1.5,
  temperature=1.5, top_k=3, 3 new tokens. Every prefix keeps exactly 3 tokens, so there are 27 outcomes; the
  repetition penalty makes each token's distribution depend on the tokens drawn before it (a sampler that
  applied the processors to the wrong prefix is off by 0.6 in total variation). The exact probability of each
  outcome comes from the model's forward and transformers' processor classes, applied to every prefix
  (`exact_distribution`); transformers' own samples are checked against it too.
* Goodness of fit (`gof_p`): Pearson's chi-square over the outcomes, cells pooled (least likely first) until
  each expects >= 5 draws; dof = cells - 1 (26 here: the least likely outcome has p = 0.012, 7 expected
  draws in N = 600, so no pooling). A draw outside the support gives p = 0. Homogeneity with transformers'
  own samples (`homogeneity_p`): the 2 x cells contingency table, dof = cells - 1. p-values are
  gammaincc(dof / 2, x / 2) (the chi-square survival function), no scipy.
* Threshold: a sampler passes when p > 1e-3 and a broken one must give p < 1e-3 (for 26 dof, x = 54.1).
  N = 600 draws per correct sampler: a sampler whose distribution q has sum (q - p)^2 / p >= 0.1 (the
  noncentrality per draw) is rejected with probability about 0.97. N_CONTROL = 300 per broken one: fewer
  draws only make rejecting harder.
* Negative controls, the same tests on broken samplers, patched into the engine: the argmax instead of a
  draw at drafted nodes, blind acceptance of the first drafted child, and the processors applied to the
  root's prefix instead of the node's own. Each must be rejected, so the tests can fail.
* Deterministic: ctcspec draws from a seeded torch.Generator, transformers from torch.manual_seed, so every
  p-value is a fixed number (a failure is not bad luck to retry). Observed (torch 2.13 CPU): correct samplers
  0.07-0.85 (goodness of fit) and 0.41-0.64 (against transformers), transformers' own samples 0.35; broken
  ones 2e-195, 3e-62 and 0 (goodness of fit; 1e-8 for the prefix-blind one even counting only draws inside
  the support), 3e-98, 8e-46, 7e-18 (against transformers). `pytest -s` prints them.
* Analytic case: a zeroed lm_head gives equal logits; suppress_tokens leaves k = 4 tokens, so each of the
  4^3 = 64 three-token outcomes has probability exactly 1/64 (dof 63, N = 600: 9.4 expected per cell;
  observed p = 0.39, argmax-below-root control 8e-13), and a drafted child is accepted with probability
  exactly 1/k (about 470 drafts; a binomial z-bound of 4 standard deviations, +-0.08 around 1/4; observed
  rate 0.258, z = 0.4; the accept-first-child control accepts all of them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from collections import Counter

import pytest
import torch
from test_equivalence import OracleDrafter, RandomTreeDrafter, drafters_for, prompts
from test_smollm2 import PROMPTS as SMOLLM2_PROMPTS
from test_smollm2 import shipped, smollm2  # noqa: F401 (smollm2: the fixture, loading the model or skipping)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
)

import ctcspec.engine
from conftest import VOCAB, hf_greedy, tiny_model
from ctcspec import CtcspecError, SpeculativeEngine, speculative_generate
from ctcspec.accept import Acceptance
from ctcspec.decoding import NodeChooser, decoding_for
from ctcspec.drafters import LookupDrafter, VanillaDrafter
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.prompts import encode_chat
from ctcspec.tree import TokenTree

THRESHOLD = 1e-3
N = 600
N_CONTROL = 300
NEW = 3
PROMPT = [7, 7, 7, 7]
SETTING = dict(do_sample=True, repetition_penalty=1.5, temperature=1.5, top_k=3)


# ---- statistics -------------------------------------------------------------------------------------------------

def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def pooled_columns(expected: list[list[float]], observed: list[list[int]], least: float = 5.0):
    """Merge columns (cells), least likely first, until every row expects >= `least` draws in each."""
    order = sorted(range(len(expected[0])), key=lambda j: sum(row[j] for row in expected))
    cols_e, cols_o, acc_e, acc_o = [], [], [0.0] * len(expected), [0] * len(expected)
    for j in order:
        acc_e = [a + row[j] for a, row in zip(acc_e, expected, strict=True)]
        acc_o = [a + row[j] for a, row in zip(acc_o, observed, strict=True)]
        if min(acc_e) >= least:
            cols_e.append(acc_e)
            cols_o.append(acc_o)
            acc_e, acc_o = [0.0] * len(expected), [0] * len(expected)
    if any(acc_e) and cols_e:  # leftover small cells join the last column
        cols_e[-1] = [a + b for a, b in zip(cols_e[-1], acc_e, strict=True)]
        cols_o[-1] = [a + b for a, b in zip(cols_o[-1], acc_o, strict=True)]
    return cols_e, cols_o


def chi2_p(expected: list[list[float]], observed: list[list[int]], dof_lost: int) -> float:
    cols_e, cols_o = pooled_columns(expected, observed)
    x = sum((o - e) ** 2 / e for col_e, col_o in zip(cols_e, cols_o, strict=True)
            for e, o in zip(col_e, col_o, strict=True))
    return chi2_sf(x, len(cols_e) - dof_lost)


def gof_p(draws: Counter, probs: dict[tuple, float]) -> float:
    """Goodness of fit of `draws` to the exact `probs`; 0 when anything outside the support was drawn."""
    if any(outcome not in probs for outcome in draws):
        return 0.0
    total = sum(draws.values())
    cells = sorted(probs)
    return chi2_p([[total * probs[c] for c in cells]], [[draws[c] for c in cells]], dof_lost=1)


def homogeneity_p(a: Counter, b: Counter) -> float:
    """Two samples, one distribution? Chi-square test of the 2 x outcomes contingency table."""
    cells = sorted(set(a) | set(b))
    rows = [sum(a.values()), sum(b.values())]
    cols = [a[c] + b[c] for c in cells]
    expected = [[r * c / sum(rows) for c in cols] for r in rows]
    return chi2_p(expected, [[a[c] for c in cells], [b[c] for c in cells]], dof_lost=1)


def test_chi_square_helpers_match_known_values():
    assert chi2_sf(54.05, 26) == pytest.approx(1e-3, rel=0.01)  # the 0.1% critical value for 26 dof
    assert chi2_sf(3.0, 2) == pytest.approx(math.exp(-1.5))
    fair = Counter({(t,): 250 for t in range(4)})
    assert gof_p(fair, {(t,): 0.25 for t in range(4)}) == pytest.approx(1.0)
    assert gof_p(fair + Counter({(9,): 1}), {(t,): 0.25 for t in range(4)}) == 0.0
    assert homogeneity_p(fair, fair) == pytest.approx(1.0)
    assert homogeneity_p(fair, Counter({(0,): 400, (1,): 200, (2,): 200, (3,): 200})) < THRESHOLD


# ---- the exact distribution and samplers --------------------------------------------------------------------------

def setting_processors() -> LogitsProcessorList:
    """SETTING as transformers' processor classes, in the order generate builds them (processors, then warpers)."""
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(SETTING["repetition_penalty"]),
                                TemperatureLogitsWarper(SETTING["temperature"]), TopKLogitsWarper(SETTING["top_k"])])


@torch.inference_mode()
def exact_distribution(model, prompt: list[int], new: int, processors: LogitsProcessorList) -> dict[tuple, float]:
    """The probability of every `new`-token continuation with nonzero probability: one batched forward per depth
    over all prefixes of the support, the processors applied to each prefix."""
    frontier = {(): 1.0}
    for _ in range(new):
        prefixes = list(frontier)
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        logits = model(input_ids=ids).logits[:, -1].float()
        probs = torch.softmax(processors(ids, logits), dim=-1).double()
        frontier = {p + (t,): frontier[p] * float(probs[row, t])
                    for row, p in enumerate(prefixes) for t in probs[row].nonzero().flatten().tolist()}
    return frontier


class SupportDrafter(Drafter):
    """Knows the exact distribution: below every node it drafts the children of the given probability ranks
    (0 = the most likely), in that order, down to the last new token."""

    name = "support"

    def __init__(self, prompt: list[int], probs: dict[tuple, float], ranks: tuple[int, ...]):
        self.prompt_len, self.ranks = len(prompt), ranks
        weight: Counter = Counter()
        for outcome, p in probs.items():
            for depth in range(1, len(outcome) + 1):
                weight[outcome[:depth]] += p
        self.children: dict[tuple, list[int]] = {}
        for prefix in sorted(weight, key=weight.__getitem__, reverse=True):
            self.children.setdefault(prefix[:-1], []).append(prefix[-1])

    def propose(self, request: DraftRequest) -> TokenTree:
        done = tuple(request.tokens[self.prompt_len:].tolist())
        return TokenTree.from_sequences(self._paths(done))

    def _paths(self, prefix: tuple) -> list[list[int]]:
        ranked = self.children.get(prefix, [])
        return [[t, *rest] for t in (ranked[r] for r in self.ranks if r < len(ranked))
                for rest in (self._paths(prefix + (t,)) or [[]])]


class AllowedTreeDrafter(Drafter):
    """Drafts `width` distinct tokens of `allowed`, drawn at random (its own generator), below every node down to
    `depth`."""

    name = "allowed-tree"

    def __init__(self, allowed: list[int], width: int, depth: int, seed: int = 0):
        self.allowed, self.width, self.depth = allowed, width, depth
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, request: DraftRequest) -> TokenTree:
        return TokenTree.from_sequences(self._paths(self.depth))

    def _paths(self, depth: int) -> list[list[int]]:
        if depth == 0:
            return [[]]
        picks = torch.randperm(len(self.allowed), generator=self.gen)[: self.width].tolist()
        return [[self.allowed[i], *rest] for i in picks for rest in self._paths(depth - 1)]


def ctcspec_draws(model, drafter: Drafter, prompt: list[int], count: int, seed: int, **settings) -> Counter:
    """`count` continuations of NEW tokens from the engine, all from one seeded generator."""
    engine = SpeculativeEngine(model, drafter)
    decoding = decoding_for(model, prompt, seed=seed, max_new_tokens=NEW, **settings)
    return Counter(tuple(engine.generate(prompt, NEW, decoding=decoding).tokens) for _ in range(count))


def hf_draws(model, prompt: list[int], count: int, seed: int, **settings) -> Counter:
    """`count` continuations from transformers' own sampling: one batched generate call."""
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             num_return_sequences=count, **settings)
    return Counter(tuple(row) for row in out[:, len(prompt):].tolist())


# ---- broken samplers (negative controls) --------------------------------------------------------------------------

class ArgmaxBelowRoot(NodeChooser):
    """Broken: draws at the root, but takes the most likely token at drafted nodes."""

    def __call__(self, node: int, drafted: list[int]) -> int:
        if node == 0:
            return super().__call__(node, drafted)
        greedy = dataclasses.replace(self.decoding, do_sample=False)
        return NodeChooser(greedy, self.logits, self.sequence)(node, drafted)


class PrefixBlind(NodeChooser):
    """Broken: applies the processors to the root's prefix at every node, ignoring the drafted tokens above it."""

    def __call__(self, node: int, drafted: list[int]) -> int:
        return super().__call__(node, [])


def accept_first_child(node_tokens, parents, choose) -> Acceptance:
    """Broken: accepts the first drafted child at every node, whatever the base model draws there."""
    path, drafted = [0], []
    while kids := [n for n, p in enumerate(parents) if p == path[-1]]:
        choose(path[-1], drafted)
        path.append(kids[0])
        drafted.append(node_tokens[kids[0]])
    return Acceptance(path, [*drafted, choose(path[-1], drafted)])


BROKEN = {"argmax-below-root": ("NodeChooser", ArgmaxBelowRoot), "prefix-blind": ("NodeChooser", PrefixBlind),
          "accept-first-child": ("accept_path", accept_first_child)}


@contextlib.contextmanager
def broken_engine(name: str):
    with pytest.MonkeyPatch.context() as mp:
        attribute, replacement = BROKEN[name]
        mp.setattr(ctcspec.engine, attribute, replacement)
        yield


# ---- 1. greedy decoding with processors ---------------------------------------------------------------------------

def hf_generate(model, prompt: list[int], max_new_tokens: int, **settings) -> list[int]:
    """The oracle: transformers' generate, with the model's generation_config and `settings` on top."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **settings)
    return out[0, len(prompt):].tolist()


def ctcspec_via_generate(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """ctcspec inside transformers' generate (custom_generate)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=speculative_generate,
                             max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()


@contextlib.contextmanager
def generation_config(model, **settings):
    """Set `settings` on a copy of the model's generation_config; the original comes back afterwards."""
    original = model.generation_config
    model.generation_config = copy.deepcopy(original)
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    try:
        yield
    finally:
        model.generation_config = original


def processor_settings(model, prompt: list[int], new: int) -> tuple[dict, list[int]]:
    """generation_config settings for `prompt` that set every processor, each one chosen from the model's own output
    so that it changes that output (checked), and the greedy output under all of them: min_new_tokens forbids an
    EOS the model would emit at position 1 until half the tokens are out; the answer ends with it or, if the model
    does not come back to it, with a second EOS the model emits two thirds of the way in."""
    settings: dict = {}
    out = hf_generate(model, prompt, new)

    def add(**more):
        nonlocal out
        changed = hf_generate(model, prompt, new, **settings, **more)
        assert changed != out, f"{more} does not change the output: the test would not see it ignored"
        settings.update(more)
        out = changed

    add(repetition_penalty=1.3, no_repeat_ngram_size=3)
    add(suppress_tokens=[out[3]])
    add(bad_words_ids=[[out[5], out[6]]])
    add(min_new_tokens=new // 2, eos_token_id=[out[1]], pad_token_id=0)   # out[1] is forbidden at position 1 now
    if len(out) == new:  # the model does not come back to that EOS: a second one, two thirds of the way in
        stop = next(i for i in range(new * 2 // 3, new) if out[i] not in out[:i])
        settings["eos_token_id"] = [*settings["eos_token_id"], out[stop]]
        out = hf_generate(model, prompt, new, **settings)
        assert len(out) == stop + 1
    expected = out
    assert len(expected) < new and expected[-1] in settings["eos_token_id"]
    return settings, expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_greedy_with_processors_is_hf_generate_token_for_token(arch):
    model = tiny_model(arch)
    new = 24
    for prompt in prompts(3):  # short, long, repetitive
        settings, expected = processor_settings(model, prompt, new)
        with generation_config(model, **settings):
            assert hf_generate(model, prompt, new) == expected  # the oracle, from the generation_config alone
            for drafter in drafters_for(prompt, expected, model):
                got = SpeculativeEngine(model, drafter).generate(prompt, new)
                assert got.tokens == expected, f"{arch}/{drafter.name} prompt={prompt[:8]}"
                assert got.stats.stop_reason == "eos"
                via = ctcspec_via_generate(model, prompt, new, drafter=drafter, do_sample=False)
                assert via == expected, f"{arch}/{drafter.name} via generate, prompt={prompt[:8]}"
        assert hf_greedy(model, prompt, new) != expected  # the model's own generation_config is back, unprocessed


@pytest.mark.slow
def test_smollm2_greedy_with_repetition_penalty_and_no_repeat_ngram(smollm2):  # noqa: F811
    model = smollm2.model
    prompt = encode_chat(smollm2.tokenizer, [{"role": "user", "content": SMOLLM2_PROMPTS[0]}])  # code: drafts hit
    with generation_config(model, repetition_penalty=1.3, no_repeat_ngram_size=3):
        expected = hf_generate(model, prompt, 24)
        ctc_lookup = shipped("ctc+lookup", model)
        got = SpeculativeEngine(model, ctc_lookup).generate(prompt, 24)
        assert got.tokens == expected and got.stats.beta > 1.1  # drafts accepted: processors ran at drafted nodes
        assert ctcspec_via_generate(model, prompt, 24, drafter=ctc_lookup) == expected
        assert SpeculativeEngine(model, shipped("lookup", model)).generate(prompt, 24).tokens == expected
    assert model.generation_config.repetition_penalty in (None, 1.0)  # the model's own config is back
    with torch.inference_mode():  # without the processors, greedy decoding would have chosen other tokens
        raw = model(input_ids=torch.tensor([prompt + expected])).logits[0, len(prompt) - 1 : -1]
    assert raw.argmax(dim=-1).tolist() != expected


# ---- 2-5. sampling distributions ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampling_model():
    model = tiny_model("llama", seed=1)
    return model, exact_distribution(model, PROMPT, NEW, setting_processors())


def test_the_setting_has_27_outcomes_and_hf_samples_from_the_exact_distribution(sampling_model):
    model, probs = sampling_model
    assert len(probs) == 27 and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert min(probs.values()) * N > 5
    p = gof_p(hf_draws(model, PROMPT, N, seed=0, **SETTING), probs)
    print(f"transformers' samples vs exact: p = {p:.2g}")  # the margins docs/sampling.md quotes (pytest -s)
    assert p > THRESHOLD, p


DRAFTERS = {
    "support-all": lambda probs: SupportDrafter(PROMPT, probs, (0, 1, 2)),   # every draw is a drafted child
    "support-partial": lambda probs: SupportDrafter(PROMPT, probs, (2, 1)),  # the most likely child missing
    "random-tree": lambda probs: RandomTreeDrafter(5),                       # nearly always wrong
}


@pytest.fixture(scope="module")
def good_draws(sampling_model):
    model, probs = sampling_model
    return {name: ctcspec_draws(model, make(probs), PROMPT, N, seed=i, **SETTING)
            for i, (name, make) in enumerate(DRAFTERS.items())}


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
def test_sampling_matches_the_exact_distribution(sampling_model, good_draws, drafter):
    _, probs = sampling_model
    p = gof_p(good_draws[drafter], probs)
    print(f"{drafter} vs exact: p = {p:.2g}")
    assert p > THRESHOLD, p


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
def test_sampling_matches_hf_sampling(sampling_model, good_draws, drafter):
    model, _ = sampling_model
    p = homogeneity_p(good_draws[drafter], hf_draws(model, PROMPT, N, seed=1, **SETTING))
    print(f"{drafter} vs transformers: p = {p:.2g}")
    assert p > THRESHOLD, p


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_sampler_is_rejected_by_both_tests(sampling_model, broken):
    model, probs = sampling_model
    with broken_engine(broken):
        draws = ctcspec_draws(model, SupportDrafter(PROMPT, probs, (0, 1, 2)), PROMPT, N_CONTROL, seed=7,
                              **SETTING)
    exact, hf = gof_p(draws, probs), homogeneity_p(draws, hf_draws(model, PROMPT, N, seed=1, **SETTING))
    print(f"{broken}: p = {exact:.2g} vs exact, {hf:.2g} vs transformers")
    assert exact < THRESHOLD and hf < THRESHOLD


def test_sampling_is_hf_sampling_token_for_token_under_the_same_seed():
    """Stronger than equal distributions, and true today: ctcspec draws once per emitted token, with
    torch.multinomial on the processed probabilities after the same prefix, from the same generator, as generate
    does. A change in how draws are made (not in what is drawn) would break this test and not the ones above."""
    model = tiny_model("qwen2")
    settings = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    prompt = prompts()[2]
    torch.manual_seed(11)
    expected = hf_generate(model, prompt, 30, **settings)
    for drafter in drafters_for(prompt, expected, model):
        torch.manual_seed(11)
        assert ctcspec_via_generate(model, prompt, 30, drafter=drafter, **settings) == expected, drafter.name
        assert SpeculativeEngine(model, drafter).generate(prompt, 30, seed=11, **settings).tokens == expected


def test_seeds_reproduce_and_differ():
    model = tiny_model("llama")
    engine = SpeculativeEngine(model, LookupDrafter(min_ngram=1))
    prompt = prompts()[3]
    runs = {seed: [engine.generate(prompt, 20, seed=seed, do_sample=True, temperature=1.2).tokens for _ in range(2)]
            for seed in range(4)}
    assert all(first == again for first, again in runs.values())
    assert len({tuple(first) for first, _ in runs.values()}) == 4


# ---- the analytic case --------------------------------------------------------------------------------------------

ALLOWED = [10, 20, 30, 40]


SUPPRESSED = [t for t in range(VOCAB) if t not in ALLOWED]


@pytest.fixture(scope="module")
def flat_model():
    """Equal logits everywhere; generation_config leaves only ALLOWED: each next token is uniform over them."""
    model = tiny_model("llama", seed=2)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.generation_config.suppress_tokens = SUPPRESSED
    return model


def test_flat_distribution_is_what_the_analysis_says(flat_model):
    suppress = LogitsProcessorList([SuppressTokensLogitsProcessor(SUPPRESSED)])
    probs = exact_distribution(flat_model, [5, 6], NEW, suppress)
    assert sorted(probs) == sorted(itertools.product(ALLOWED, repeat=NEW))
    assert all(p == pytest.approx(len(ALLOWED) ** -NEW, rel=1e-6) for p in probs.values())


def uniform_p(model, count: int, seed: int) -> float:
    probs = {outcome: len(ALLOWED) ** -NEW for outcome in itertools.product(ALLOWED, repeat=NEW)}
    drafter = AllowedTreeDrafter(ALLOWED, width=2, depth=2, seed=seed)  # half the drafts right, at each depth
    draws = ctcspec_draws(model, drafter, [5, 6], count, seed=seed, do_sample=True)
    return gof_p(draws, probs)


def acceptance(model, runs: int) -> tuple[int, int]:
    """Drafted children examined and accepted, over `runs` generations of 200 tokens with a one-token draft."""
    examined = accepted = 0
    engine = SpeculativeEngine(model, AllowedTreeDrafter(ALLOWED, width=1, depth=1, seed=3))
    for seed in range(runs):
        steps: list[list[int]] = []
        engine.generate([5, 6], 200, on_tokens=steps.append, seed=seed, do_sample=True)
        decode_steps = steps[1:-1]  # not the prefill, nor the last step (cut at max_new_tokens)
        examined += len(decode_steps)
        accepted += sum(len(s) - 1 for s in decode_steps)
    return examined, accepted


def test_flat_distribution_every_sequence_is_equally_likely(flat_model):
    p = uniform_p(flat_model, N, seed=0)
    print(f"flat: p = {p:.2g}")
    assert p > THRESHOLD, p


def test_flat_distribution_drafts_are_accepted_with_probability_one_in_k(flat_model):
    examined, accepted = acceptance(flat_model, runs=3)
    rate = 1 / len(ALLOWED)
    z = (accepted - examined * rate) / math.sqrt(examined * rate * (1 - rate))
    print(f"flat: {accepted} of {examined} drafts accepted, z = {z:.2f}")
    assert examined > 400 and abs(z) < 4, (examined, accepted, z)  # 4 sd: about +-0.08 around 1/4


def test_flat_distribution_controls_are_rejected(flat_model):
    with broken_engine("argmax-below-root"):
        p = uniform_p(flat_model, N_CONTROL, seed=1)
    print(f"flat, argmax-below-root: p = {p:.2g}")
    assert p < THRESHOLD
    with broken_engine("accept-first-child"):
        examined, accepted = acceptance(flat_model, runs=1)
    assert accepted == examined  # every draft accepted: z far beyond 4


# ---- 7. custom_generate: transformers' features -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


class ChunkRecorder(TextStreamer):
    """A TextStreamer that also records how many tokens each put() brought."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.chunks: list[int] = []

    def put(self, value):
        self.chunks.append(value.numel())
        super().put(value)


def test_text_streamer_prints_what_hf_prints(tiny_with_tokenizer, capsys):
    model, tokenizer = tiny_with_tokenizer
    prompt = prompts()[3]
    expected = hf_generate(model, prompt, 30)
    capsys.readouterr()
    hf_generate(model, prompt, 30, streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    streamer = ChunkRecorder(tokenizer)
    assert ctcspec_via_generate(model, prompt, 30, drafter=OracleDrafter(prompt, expected), streamer=streamer) \
        == expected
    assert capsys.readouterr().out == printed
    assert tokenizer.decode(expected) in printed and max(streamer.chunks[1:]) > 1  # several tokens per step


def stop_string_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model directory's word-level vocabulary plus the word "abcdef": StopStringCriteria tokenizes
    "abcdef" to learn how tokens join into text, and fails (ValueError) on a vocabulary without it."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)] + ["abcdef"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_eos_lists_and_stopping_criteria_stop_where_hf_stops(tiny_with_tokenizer):
    model, _ = tiny_with_tokenizer
    tokenizer = stop_string_tokenizer()
    prompt = prompts()[1]
    free = hf_generate(model, prompt, 40)
    word = tokenizer.convert_ids_to_tokens(free[12])
    cases = {
        "eos list": dict(eos_token_id=[free[9], free[6]], pad_token_id=0),
        "user criterion": dict(stopping_criteria=StoppingCriteriaList([StopAfterToken(free[7])])),
        "stop string": dict(stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, [word])])),
    }
    for case, settings in cases.items():
        expected = hf_generate(model, prompt, 40, **settings)
        assert len(expected) < len(free), case  # it does stop generation early
        # the oracle drafts the free continuation, past the stop: the step must be cut inside
        drafters = (VanillaDrafter(), LookupDrafter(min_ngram=1), RandomTreeDrafter(1), OracleDrafter(prompt, free))
        for drafter in drafters:
            assert ctcspec_via_generate(model, prompt, 40, drafter=drafter, **settings) == expected, case


def test_return_dict_and_engine_reuse(tiny_with_tokenizer):
    model, _ = tiny_with_tokenizer
    engine = SpeculativeEngine(model, LookupDrafter(min_ngram=1))
    for prompt in prompts(3):
        ids = torch.tensor([prompt])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, return_dict_in_generate=True)
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, return_dict_in_generate=True,
                              custom_generate=speculative_generate, engine=engine)
        assert torch.equal(ours.sequences, hf.sequences)


def test_max_length_alone_bounds_the_sequence_as_in_hf(tiny_with_tokenizer):
    model, _ = tiny_with_tokenizer
    prompt = prompts()[0]
    expected = hf_generate(model, prompt, None, max_length=len(prompt) + 11)
    assert len(expected) == 11
    got = ctcspec_via_generate(model, prompt, None, max_length=len(prompt) + 11, drafter=LookupDrafter(min_ngram=1))
    assert got == expected


# ---- 8. refusals --------------------------------------------------------------------------------------------------

class MyProcessor(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


REFUSALS = {
    "batch": (dict(), "batch of 2"),
    "num_return_sequences": (dict(do_sample=True, num_return_sequences=2), "num_return_sequences"),
    "padding": (dict(), "padding"),
    "output_scores": (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    "num_beams": (dict(num_beams=2), "num_beams"),
    "custom processor": (dict(logits_processor=LogitsProcessorList([MyProcessor()])), "MyProcessor"),
    "guidance_scale": (dict(guidance_scale=1.5), "UnbatchedClassifierFreeGuidanceLogitsProcessor"),
    "contrastive search": (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
    "dola": (dict(dola_layers="high"), "dola generation"),
    "constraints": (dict(force_words_ids=[[5]], num_beams=2), "constrained beam search"),
    "past the context": (dict(max_new_tokens=400), "exceeds what speculative decoding can hold"),
    "drafter and engine": (dict(engine="both"), "either drafter= or engine="),
    "neither": (dict(drafter=None), "either drafter= or engine="),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_custom_generate_refuses_what_it_cannot_do_in_one_line(case):
    model = tiny_model("llama")
    settings, message = REFUSALS[case]
    settings = {"drafter": LookupDrafter(), **settings}
    if settings.get("engine") == "both":
        settings["engine"] = SpeculativeEngine(model, settings["drafter"])
    ids = torch.tensor([[5, 6, 7]] * (2 if case == "batch" else 1))
    mask = torch.ones_like(ids)
    if case == "padding":
        mask[0, 0] = 0
    with pytest.raises(CtcspecError, match=message) as error:
        model.generate(ids, attention_mask=mask, custom_generate=speculative_generate,
                       **{"max_new_tokens": 4, **settings})
    assert "\n" not in str(error.value)


def test_engine_refuses_a_custom_processor_by_name():
    engine = SpeculativeEngine(tiny_model("llama"), LookupDrafter())
    with pytest.raises(CtcspecError, match="MyProcessor"):
        engine.generate([5, 6, 7], 4, logits_processor=LogitsProcessorList([MyProcessor()]))


@pytest.mark.parametrize("settings", [dict(do_sample=True, num_return_sequences=2), dict(penalty_alpha=0.6, top_k=4)],
                         ids=["num_return_sequences", "contrastive"])
def test_engine_refuses_what_it_would_otherwise_ignore(settings):
    engine = SpeculativeEngine(tiny_model("llama"), LookupDrafter())
    with pytest.raises(CtcspecError, match="num_return_sequences|contrastive search"):
        engine.generate([5, 6, 7], 4, **settings)
