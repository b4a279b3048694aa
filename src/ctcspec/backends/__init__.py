"""Base-model runtimes behind one interface (base.py): `hf` runs any supported HF model with its own
forward; `static` runs Llama-family models in a lean loop over a preallocated cache; `llama.cpp` runs a
GGUF of the model in llama.cpp (llamacpp.py; needs `make peers`).

`BACKENDS` is the one list of backend names; `auto` picks `static` where it applies, else `hf`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctcspec.backends.base import Backend, ForwardResult
from ctcspec.backends.hf import HFBackend
from ctcspec.backends.llamacpp import LlamaCppBackend
from ctcspec.backends.static import StaticBackend, static_support_problem
from ctcspec.errors import CtcspecError

TORCH_BACKENDS: dict[str, type[Backend]] = {"hf": HFBackend, "static": StaticBackend}
BACKENDS = ("auto", *TORCH_BACKENDS, LlamaCppBackend.name)


def make_backend(model: torch.nn.Module, name: str = "auto", gguf: Path | None = None, tokenizer=None) -> Backend:
    """The backend `name` for `model`; `auto` is `static` where that backend can run the model, else `hf`.
    llama.cpp runs `gguf` (a GGUF of `model`, checked against `tokenizer` when given) on torch's thread count."""
    if name == "auto":
        name = "hf" if static_support_problem(model) else "static"
    if name == LlamaCppBackend.name:
        if gguf is None:
            raise CtcspecError("the llama.cpp backend needs a GGUF of the model")
        return LlamaCppBackend(model, gguf, torch.get_num_threads(), tokenizer)
    if name not in TORCH_BACKENDS:
        raise CtcspecError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return TORCH_BACKENDS[name](model)


__all__ = ["BACKENDS", "Backend", "ForwardResult", "HFBackend", "LlamaCppBackend", "StaticBackend", "make_backend"]
