"""assembly.py: the one way an engine is put together, and the budget policy each drafter gets there."""

import pytest
import torch
from ctc_helpers import tiny_module

from conftest import hf_greedy
from ctcspec.assembly import build_engine, default_drafter, drafter_dirs
from ctcspec.backends import make_backend
from ctcspec.cli import build_parser, engine_from_args
from ctcspec.custom_generate import speculative_generate
from ctcspec.drafters import make_drafter
from ctcspec.errors import CtcspecError
from ctcspec.models import load_model
from ctcspec.modules.files import describe_base, save_drafter
from ctcspec.pricing import FixedBudget, PricedBudget

CURVE = {"1": 0.5, "4": 1.1, "8": 1.4}


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    """The tiny Llama the CLI tests load (a drafter saved for it is one for the CLI's model too)."""
    return load_model(str(tiny_model_dir)).model


@pytest.fixture
def ctc_dir(llama, tmp_path):
    save_drafter(tmp_path / "ctc", tiny_module(llama), describe_base(llama), {"acceptance_curve": {"beam": CURVE}},
                 dtype=torch.float32)
    return tmp_path / "ctc"


def test_the_shipped_drafters_are_not_offered_to_another_model(llama):
    assert drafter_dirs((), llama) == {}  # the package's SmolLM2 drafters: another base
    assert default_drafter({}) == "lookup"
    assert build_engine(llama).drafter.name == "lookup"


def test_budget_policies(llama, ctc_dir):
    paths = [ctc_dir]
    ctc = build_engine(llama, "ctc", drafter_paths=paths).drafter
    assert isinstance(ctc.budget, FixedBudget) and ctc.budget.tree_budget in (1, 4, 8)  # chosen on this machine
    hybrid = build_engine(llama, drafter_paths=paths).drafter  # the default with a CTC drafter
    assert hybrid.name == "ctc+lookup" and isinstance(hybrid.budget, PricedBudget) and hybrid.settings()["priced"]
    assert build_engine(llama, "ctc+lookup", drafter_paths=paths, tree_budget=5).drafter.budget == FixedBudget(5)
    adaptive = build_engine(llama, "ctc", drafter_paths=paths, tree_budget=4, adaptive=True).drafter
    assert isinstance(adaptive.budget, PricedBudget) and adaptive.settings()["adaptive_budget"]
    assert adaptive.settings()["tree_budget"] == 4  # the probe budget


def test_a_drafter_without_curves_keeps_its_default_and_refuses_an_adaptive_budget(llama, tmp_path):
    save_drafter(tmp_path / "ctc", tiny_module(llama), describe_base(llama), dtype=torch.float32)
    assert build_engine(llama, "ctc", drafter_paths=[tmp_path / "ctc"]).drafter.budget == FixedBudget(16)
    with pytest.raises(CtcspecError, match="adaptive budget needs"):
        build_engine(llama, "ctc", drafter_paths=[tmp_path / "ctc"], adaptive=True)


def test_every_entry_point_assembles_the_same_drafter(llama, ctc_dir, tiny_model_dir, tmp_path):
    """The CLI (generate, serve, chat), custom_generate and build_engine give one drafter, and its output is HF's."""
    prompt = [5, 9, 12, 40, 41]
    expected = hf_greedy(llama, prompt, 24)
    library = build_engine(llama, "ctc+lookup", drafter_paths=[ctc_dir])
    assert library.generate(prompt, 24).tokens == expected
    args = build_parser().parse_args(["generate", "--model", str(tiny_model_dir), "--drafter-path", str(ctc_dir),
                                      "--prompt", "x"])
    loaded, cli = engine_from_args(args)
    assert cli.drafter.name == library.drafter.name and type(cli.drafter.budget) is type(library.drafter.budget)
    assert cli.drafter.settings().keys() == library.drafter.settings().keys()
    out = llama.generate(torch.tensor([prompt]), custom_generate=speculative_generate, drafter="lookup",
                         max_new_tokens=24, do_sample=False)
    assert out[0, len(prompt):].tolist() == expected


def test_a_drafter_object_is_used_as_it_is(llama):
    drafter = make_drafter("lookup")
    engine = build_engine(llama, drafter, backend=make_backend(llama, "hf"))
    assert engine.drafter is drafter and engine.backend.name == "hf"
