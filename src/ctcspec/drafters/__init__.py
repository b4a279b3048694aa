"""Drafters (proposers), one file each, all behind `Drafter` (base.py); the draft networks the trained
ones run live in ctcspec/modules/.

`DRAFTERS` is the one list of drafter names. A trained drafter is named after the kind of module it
runs (ctc, medusa, hydra, eagle); `ctc+lookup` runs a CTC module beside prompt lookup.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.drafters.heads import HeadsDrafter
from ctcspec.drafters.hybrid import CTCLookupDrafter
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.drafters.vanilla import VanillaDrafter
from ctcspec.errors import CtcspecError
from ctcspec.modules import KINDS
from ctcspec.modules.files import load_drafter_module

TRAINED_DRAFTERS: dict[str, type] = {"ctc": CTCDrafter, "medusa": HeadsDrafter, "hydra": HeadsDrafter,
                                     "eagle": HeadsDrafter}
MODULE_KIND = {**{kind: kind for kind in KINDS}, "ctc+lookup": "ctc"}  # drafter name -> module kind it runs
DRAFTERS = ("vanilla", "lookup", *KINDS, "ctc+lookup")


def check_drafter_name(name: str) -> str:
    if name not in DRAFTERS:
        raise CtcspecError(f"unknown drafter {name!r}; choose from: {', '.join(DRAFTERS)}")
    return name


def make_drafter(name: str, model: torch.nn.Module | None = None, drafter_dir: str | Path | None = None,
                 transform: str = "beam", batch_cost: dict[int, dict[int, float]] | None = None) -> Drafter:
    """Build a drafter by name. Trained drafters load their module from `drafter_dir` (a saved drafter of
    the kind MODULE_KIND[name]) against the base `model`; their tree budget is left at the drafter's
    default: `assembly.build_drafter` settles it for this machine. Prompt lookup (alone or in ctc+lookup) prices
    its trees on `batch_cost` in batches, when given (drafters/lookup.py)."""
    check_drafter_name(name)
    if name == "vanilla":
        return VanillaDrafter()
    if name == "lookup":
        return LookupDrafter(batch_cost=batch_cost)
    kind = MODULE_KIND[name]
    if model is None or drafter_dir is None:
        raise CtcspecError(f"the {name} drafter needs the base model and a trained {kind} drafter directory "
                           f"(train one with ctcspec distill + ctcspec train --kind {kind})")
    module, config = load_drafter_module(Path(drafter_dir), model, kind=kind)
    drafter = TRAINED_DRAFTERS[kind].from_saved(module, config, transform)
    return CTCLookupDrafter(drafter, LookupDrafter(batch_cost=batch_cost)) if name == "ctc+lookup" else drafter


__all__ = ["DRAFTERS", "MODULE_KIND", "CTCDrafter", "CTCLookupDrafter", "DraftRequest", "Drafter", "HeadsDrafter",
           "LookupDrafter", "VanillaDrafter", "check_drafter_name", "make_drafter"]
