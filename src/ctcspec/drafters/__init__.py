"""Drafters, one file each, all behind `Drafter` (base.py)."""

from __future__ import annotations

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.drafters.vanilla import VanillaDrafter
from ctcspec.errors import CtcspecError

DRAFTERS = {"vanilla": VanillaDrafter, "lookup": LookupDrafter}


def make_drafter(name: str, **options) -> Drafter:
    try:
        cls = DRAFTERS[name]
    except KeyError:
        raise CtcspecError(f"unknown drafter {name!r}; choose from: {', '.join(DRAFTERS)}") from None
    return cls(**options)


__all__ = ["DRAFTERS", "DraftRequest", "Drafter", "LookupDrafter", "VanillaDrafter", "make_drafter"]
