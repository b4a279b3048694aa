"""Drafters, one file each, all behind `Drafter` (base.py)."""

from __future__ import annotations

from ctcspec.draft_heads import HEAD_KINDS
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.drafters.vanilla import VanillaDrafter
from ctcspec.errors import CtcspecError

DRAFTERS = ("vanilla", "lookup", "ctc", "ctc+lookup", "medusa", "hydra", "eagle")
BASELINES = HEAD_KINDS  # trained baselines (drafters/heads.py runs them)


def check_drafter_name(name: str) -> str:
    if name not in DRAFTERS:
        raise CtcspecError(f"unknown drafter {name!r}; choose from: {', '.join(DRAFTERS)}")
    return name


def make_drafter(name: str, model=None, model_name: str | None = None, drafter_path=None,
                 tree_budget: int | None = None, transform: str = "beam", adaptive: bool = False,
                 baseline_paths: dict | None = None, **options) -> Drafter:
    """Build a drafter by name. Trained drafters need the base `model`, and a checkpoint directory
    (`drafter_path` for ctc, `baseline_paths[name]` for the baselines) unless one ships for `model_name`."""
    check_drafter_name(name)
    if name == "vanilla":
        return VanillaDrafter(**options)
    if name == "lookup":
        return LookupDrafter(**options)
    if model is None:
        raise CtcspecError(f"the {name} drafter needs the base model")
    if name in BASELINES:
        from ctcspec.drafters.heads import load_heads_drafter

        return load_heads_drafter(name, model, (baseline_paths or {}).get(name), model_name=model_name,
                                  tree_budget=tree_budget)
    from ctcspec.drafters.ctc import load_ctc_drafter
    from ctcspec.drafters.hybrid import CTCLookupDrafter

    ctc = load_ctc_drafter(model, drafter_path, model_name=model_name, tree_budget=tree_budget, transform=transform,
                           adaptive=adaptive)
    return ctc if name == "ctc" else CTCLookupDrafter(ctc)


__all__ = ["BASELINES", "DRAFTERS", "DraftRequest", "Drafter", "LookupDrafter", "VanillaDrafter", "check_drafter_name",
           "make_drafter"]
