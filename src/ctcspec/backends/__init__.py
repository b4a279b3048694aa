"""Base-model runtimes behind one interface (base.py): `hf` runs any supported HF model with its own
forward; `static` runs Llama-family models in a lean loop over a preallocated cache.

`BACKENDS` is the one list of backend names; `auto` picks `static` where it applies, else `hf`.
"""

from __future__ import annotations

import torch

from ctcspec.backends.base import Backend, ForwardResult
from ctcspec.backends.hf import HFBackend
from ctcspec.backends.static import StaticBackend, static_support_problem
from ctcspec.errors import CtcspecError

BACKEND_CLASSES: dict[str, type[Backend]] = {"hf": HFBackend, "static": StaticBackend}
BACKENDS = ("auto", *BACKEND_CLASSES)


def make_backend(model: torch.nn.Module, name: str = "auto") -> Backend:
    """The backend `name` for `model`; `auto` is `static` where that backend can run the model, else `hf`."""
    if name == "auto":
        name = "hf" if static_support_problem(model) else "static"
    if name not in BACKEND_CLASSES:
        raise CtcspecError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKEND_CLASSES[name](model)


__all__ = ["BACKENDS", "Backend", "ForwardResult", "HFBackend", "StaticBackend", "make_backend"]
