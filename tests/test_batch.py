"""Batched speculative decoding: each sequence's output is what its prompt alone gives with HF generate, whatever
shares its batch, for every drafter, with sequences joining and leaving mid-run."""

from __future__ import annotations

import json

import pytest
import torch
from ctc_helpers import tiny_ctc_drafter, tiny_heads_drafter
from test_equivalence import PRICES, RandomTreeDrafter, prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import VOCAB, hf_greedy, run_cli, tiny_model
from ctcspec.backends.hf import HFBackend
from ctcspec.backends.static import attend, few_wide_rows
from ctcspec.batch import BatchEngine
from ctcspec.batch_cache import BatchCache, BatchRunner, batch_mask
from ctcspec.drafters import DRAFTERS, LookupDrafter, VanillaDrafter
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.hybrid import CTCLookupDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.pricing import BudgetPlan, PricedBudget, batch_share
from ctcspec.tree import TokenTree

# a batched cost under which a wider batch prices the CTC budget down to 0
BATCH_PRICES = BudgetPlan(PRICES.acceptance, PRICES.cost, PRICES.draft_cost,
                          {1: {1: 1.0, 4: 1.3, 8: 1.6}, 2: {1: 1.1, 4: 2.0, 8: 3.0}, 4: {1: 1.3, 4: 4.0, 8: 7.0}})


class BatchOracle(Drafter):
    """Knows every prompt's answer; drafts the right continuation, cut at a varying depth, beside wrong siblings."""

    name = "oracle"

    def __init__(self, answers: dict[tuple[int, ...], list[int]]):
        self.answers = answers

    def propose(self, request: DraftRequest) -> TokenTree:
        tokens = request.tokens.tolist()
        prompt = next(p for p in self.answers if tuple(tokens[:len(p)]) == p)
        full = list(prompt) + self.answers[prompt]
        n = len(tokens)
        truth = full[n: n + 1 + n % 5]
        wrong = [(t + 1) % VOCAB for t in truth]
        return TokenTree.from_sequences([wrong[:2], truth, truth[:1] + wrong[1:]])


def batch_drafters(model, answers):
    return [VanillaDrafter(), LookupDrafter(), LookupDrafter(min_ngram=1, tree_budget=40),
            tiny_ctc_drafter(model, seed=3, tree_budget=12),
            CTCLookupDrafter(tiny_ctc_drafter(model, seed=1, tree_budget=6), LookupDrafter(min_ngram=1)),
            CTCLookupDrafter(tiny_ctc_drafter(model, seed=2, tree_budget=PricedBudget(BATCH_PRICES, 6)),
                             LookupDrafter(min_ngram=1)),
            *(tiny_heads_drafter(model, kind, seed=4, tree_budget=7) for kind in ("medusa", "hydra", "eagle")),
            RandomTreeDrafter(5), BatchOracle(answers)]


def test_every_registered_drafter_is_batched():
    model = tiny_model("llama")
    assert set(DRAFTERS) <= {drafter.name for drafter in batch_drafters(model, {})}


def test_batched_identical_to_hf_generate(arch_model):
    """Twelve prompts (1 to 115 tokens) through a batch of at most 5: sequences join as others finish."""
    arch, model = arch_model
    batch = prompts(12)
    expected = [hf_greedy(model, prompt, 32) for prompt in batch]
    answers = {tuple(p): e for p, e in zip(batch, expected, strict=True)}
    for drafter in batch_drafters(model, answers):
        engine = BatchEngine(model, drafter, max_batch=5)
        results = engine.generate(batch, 32)
        for prompt, want, got in zip(batch, expected, results, strict=True):
            assert got.tokens == want, f"{arch}/{drafter.name} prompt={prompt[:8]}..."
            assert got.stats.stop_reason == "max_new_tokens"
        assert not engine.busy and engine.cache.rows == 0


def test_oracle_drafts_raise_beta_in_a_batch():
    model = tiny_model("llama")
    batch = prompts(6)
    answers = {tuple(p): hf_greedy(model, p, 40) for p in batch}
    results = BatchEngine(model, BatchOracle(answers), max_batch=6).generate(batch, 40)
    assert all(r.stats.beta > 2.0 for r in results)


def test_each_sequence_stops_at_its_own_eos(arch_model):
    """Per-sequence settings: a different EOS each, so sequences leave the batch at different steps."""
    arch, model = arch_model
    batch = prompts(8)
    engine = BatchEngine(model, CTCLookupDrafter(tiny_ctc_drafter(model, seed=1, tree_budget=6)), max_batch=4)
    wants, ids = [], []
    for i, prompt in enumerate(batch):
        free = hf_greedy(model, prompt, 40)
        eos = free[(i * 5) % 40]
        wants.append(hf_greedy(model, prompt, 40, eos=eos))
        ids.append(engine.submit(prompt, 40, eos_token_id=eos))
    results = {}
    while engine.busy:
        results.update(engine.step())
    for i, want in zip(ids, wants, strict=True):
        assert results[i].tokens == want, f"{arch} request {i}"
        assert results[i].stats.stop_reason == "eos"


def test_requests_joining_mid_run(arch_model):
    """Requests submitted while others are half-way through equal HF generate on their prompt alone."""
    arch, model = arch_model
    batch = prompts(9)
    engine = BatchEngine(model, LookupDrafter(min_ngram=1), max_batch=8)
    streamed: dict[int, list[int]] = {}
    results, ids = {}, []
    for n, prompt in enumerate(batch):
        ids.append(engine.submit(prompt, 24 + len(prompt) % 7, on_tokens=streamed.setdefault(n, []).extend))
        for _ in range(3):  # three steps before the next request arrives
            results.update(engine.step())
    while engine.busy:
        results.update(engine.step())
    for n, (request, prompt) in enumerate(zip(ids, batch, strict=True)):
        want = hf_greedy(model, prompt, 24 + len(prompt) % 7)
        assert results[request].tokens == want == streamed[n], f"{arch} request {n}"


@pytest.mark.parametrize("settings", [
    dict(do_sample=True, temperature=0.8, top_k=20),
    dict(do_sample=True, top_p=0.9, repetition_penalty=1.3),
    dict(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=3),
])
def test_sampling_and_processors_match_the_single_sequence_engine(settings):
    """Each sequence draws from its own seeded generator, so a batch reproduces, seed for seed, what the
    one-sequence engine gives alone (whose distribution tests/test_sampling.py checks against HF)."""
    model = tiny_model("qwen2")
    batch = prompts(6)
    seeds = [11 * i + 1 for i in range(len(batch))]
    for drafter in (LookupDrafter(min_ngram=1), tiny_ctc_drafter(model, seed=1, tree_budget=6)):
        single = [SpeculativeEngine(model, drafter, backend=HFBackend(model)).generate(p, 24, seed=s, **settings)
                  for p, s in zip(batch, seeds, strict=True)]
        batched = BatchEngine(model, drafter, max_batch=3).generate(batch, 24, seeds=seeds, **settings)
        assert [r.tokens for r in batched] == [r.tokens for r in single], drafter.name


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # the lean loop and the HF forward
def test_cache_rows_hold_what_a_sequence_alone_holds(arch):
    """After steps that keep paths of different lengths (holes), packing and growing, every row's live entries
    equal the keys and values of its sequence run alone."""
    model = tiny_model(arch)
    backend = HFBackend(model)
    runner = BatchRunner(model)
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    cache = BatchCache.empty(model, 3, 4)
    runner.forward(cache, [s[:-1] for s in sequences], [list(range(-1, len(s) - 2)) for s in sequences])
    cache.keep([list(range(len(s) - 1)) for s in sequences])
    for step in range(40):
        trees = [TokenTree.from_sequences([torch.randint(0, VOCAB, (3,), generator=gen).tolist(),
                                           torch.randint(0, VOCAB, (2,), generator=gen).tolist()])
                 for _ in sequences]
        nodes = [[s[-1], *t.tokens] for s, t in zip(sequences, trees, strict=True)]
        parents = [[-1] + [0 if p < 0 else p + 1 for p in t.parents] for t in trees]
        runner.forward(cache, nodes, parents)
        # row 0 keeps only its root, row 1 a depth-3 path, row 2 alternates
        paths = [[0], [0, 1, 2, 3], [0, 4] if step % 2 else [0]]
        cache.keep(paths)
        for s, path, row_nodes in zip(sequences, paths, nodes, strict=True):
            s.extend(row_nodes[i] for i in path[1:])
            s.append(int(torch.randint(0, VOCAB, (1,), generator=gen)))
    assert cache.lengths() == [len(s) - 1 for s in sequences]
    for row, sequence in enumerate(sequences):
        alone = backend.new_cache(0)
        backend.forward(alone, sequence[:-1], list(range(-1, len(sequence) - 2)))
        for (k, v), (k_alone, v_alone) in zip(cache.entries(row), backend.entries(alone), strict=True):
            torch.testing.assert_close(k, k_alone, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, v_alone, atol=1e-5, rtol=1e-4)


def test_batch_share_prices_speculation_down_as_the_batch_grows():
    curves = {1: {1: 1.0, 5: 1.2}, 2: {1: 1.1, 5: 1.8}, 4: {1: 1.3, 5: 3.6}}
    assert batch_share(curves, 2) == {1: 0.55, 5: 0.9}
    assert batch_share(curves, 3)[5] == pytest.approx((1.8 + 3.6) / 2 / 3)  # linear between measured sizes
    assert batch_share(curves, 8)[1] == pytest.approx((1.3 + 0.1 * 4) / 8)  # and beyond the largest (slope 0.1)
    plan = BudgetPlan({4: 1.0}, curves[1], {4: 0.0}, curves)
    assert plan.best_or_none(batch=1) == 4  # alone: (1 + 1) / 1.2 beats 1 / 1.0
    assert plan.best_or_none(batch=4) == 0  # four together: 2 / 0.9 loses to 1 / 0.325
    assert PricedBudget(plan, 4).next(0, batch=4) == 0


def test_priced_budget_follows_the_batch_size():
    """The drafter is told how many sequences share the step; a priced budget drafts less in a wider batch."""
    model = tiny_model("llama")
    drafter = tiny_ctc_drafter(model, seed=2, tree_budget=PricedBudget(BATCH_PRICES, 6))
    engine = BatchEngine(model, drafter, max_batch=4)
    batch = prompts(4)
    wide = engine.generate(batch, 16)
    alone = [BatchEngine(model, drafter, max_batch=1).generate([p], 16)[0] for p in batch]
    assert sum(r.stats.drafted_nodes for r in wide) < sum(r.stats.drafted_nodes for r in alone)
    assert [r.tokens for r in wide] == [r.tokens for r in alone]


def test_forks_share_the_network_not_the_state():
    model = tiny_model("llama")
    hybrid = CTCLookupDrafter(tiny_ctc_drafter(model, seed=2, tree_budget=PricedBudget(PRICES, 6)))
    fork = hybrid.fork()
    assert fork.ctc.module is hybrid.ctc.module
    assert fork.ctc is not hybrid.ctc and fork.lookup is not hybrid.lookup
    assert fork.budget is not hybrid.budget and fork.budget.plan is hybrid.budget.plan


def test_bad_requests_are_refused():
    model = tiny_model("llama")
    with pytest.raises(CtcspecError, match="at least 1"):
        BatchEngine(model, VanillaDrafter(), max_batch=0)
    engine = BatchEngine(model, VanillaDrafter(), max_batch=2)
    with pytest.raises(CtcspecError, match="empty"):
        engine.submit([], 4)
    with pytest.raises(CtcspecError, match="leaving no room"):
        engine.submit([1] * 400, 4)
    with pytest.raises(CtcspecError, match="bf16|bfloat16|float32"):
        BatchEngine(tiny_model("llama").to(torch.bfloat16), LookupDrafter())
    assert not engine.busy
    assert engine.generate([[5, 6]], 0)[0].tokens == []


BATCH_PROMPTS = ["w5 w6 w7 w5 w6 w7 w5 w6", "w10 w11 w12", "w40 w41 w40 w41 w40", "w3", "w9 w8 w7 w6 w5 w4 w3 w2 w1",
                 "w60 w61"]


def test_generate_prompts_file_batched_equals_hf_greedy(capsys, tiny_model_dir, tmp_path):
    """One JSON line per prompt, each HF greedy on that prompt alone, whatever the batch size."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = [hf_greedy(model, tokenizer(p)["input_ids"], 16) for p in BATCH_PROMPTS]
    plain, jsonl = tmp_path / "prompts.txt", tmp_path / "prompts.jsonl"
    plain.write_text("\n".join(BATCH_PROMPTS) + "\n\n")
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(BATCH_PROMPTS)))
    for path, batch in ((plain, "4"), (jsonl, "1"), (jsonl, "8")):
        code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompts-file", str(path),
                                 "--batch-size", batch, "--max-new-tokens", "16", "--json")
        assert code == 0, err
        records = {r["index"]: r for r in map(json.loads, out.splitlines())}
        assert sorted(records) == list(range(len(BATCH_PROMPTS)))
        for i, record in records.items():
            assert record["prompt"] == BATCH_PROMPTS[i]
            assert record["output_ids"] == expected[i], (path.name, batch, i)
            assert record["stats"]["new_tokens"] == 16
        assert "tok/s in all" in err


@pytest.mark.parametrize("content, name, message", [
    ("", "empty.txt", "has no prompts"),
    ('{"prompt": "w1"}\nnot json\n', "bad.jsonl", "line 2: not JSON"),
    ('{"text": "w1"}\n', "bad.jsonl", 'line 1: expected an object with a non-empty "prompt" string'),
])
def test_bad_prompts_files_exit_2(capsys, tiny_model_dir, tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompts-file", str(path))
    assert code == 2 and message in err and "Traceback" not in err


def test_batch_size_needs_a_prompts_file(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--batch-size", "4")
    assert code == 2 and "--batch-size needs --prompts-file" in err


def test_bench_batch_size_reports_every_system_side_by_side(capsys, tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "x", "turns": [p, "w1"]}) + "\n"
                                 for i, p in enumerate(BATCH_PROMPTS)))
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--questions", str(questions),
                             "--max-new-tokens", "12", "--batch-size", "4", "--out", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "batch_report.json").read_text())
    rows = {row["system"]: row for row in report["rows"]}
    assert set(rows) == {"vanilla", "lookup", "hf_generate"}
    assert rows["lookup"]["differ_from_vanilla"] == 0 and rows["vanilla"]["differ_from_vanilla"] == 0
    assert all(row["new_tokens"] == 12 * len(BATCH_PROMPTS) for row in rows.values())
    assert rows["vanilla"]["forwards"] < 12 * len(BATCH_PROMPTS)  # several sequences per forward
    assert report["meta"]["batch_size"] == 4 and "| lookup |" in out
    assert "| hf_generate |" in (out_dir / "batch_report.md").read_text()
    code, _, err = run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--questions", str(questions),
                           "--batch-size", "4", "--out", str(out_dir))
    assert code == 2 and "already holds a batch report" in err


def test_split_attention_equals_the_padded_call_on_real_queries():
    """A batch where few rows verify trees attends their extra queries apart; real outputs are unchanged."""
    gen = torch.Generator().manual_seed(0)
    rows, width, slots = 6, 5, 40
    real = torch.zeros(rows, width, dtype=torch.bool)
    real[:, 0] = True
    real[2, :4] = real[5, :] = True
    query = torch.randn(rows, 4, width, 16, generator=gen)
    keys, values = torch.randn(rows, 2, slots + width, 16, generator=gen), torch.randn(rows, 2, slots + width, 16,
                                                                                      generator=gen)
    live = torch.rand(rows, slots, generator=gen) < 0.8
    parents = [list(range(-1, int(n) - 1)) for n in real.sum(dim=1)]
    mask = batch_mask(live, parents, width, torch.float32)
    wide = few_wide_rows(real)
    assert wide.tolist() == [2, 5]
    split = attend(query, keys, values, mask, False, 0.25, wide).transpose(1, 2)[real]
    padded = attend(query, keys, values, mask, False, 0.25).transpose(1, 2)[real]
    torch.testing.assert_close(split, padded)
    assert few_wide_rows(torch.ones(rows, width, dtype=torch.bool)) is None  # all wide: one padded call
