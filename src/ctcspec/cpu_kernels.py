"""Faster fp32 linear layers on CPU for the few-row products speculative decoding makes.

Verification multiplies every weight matrix by q = 2..30 rows at once. torch's default CPU path
(MKL sgemm on an unpacked weight) is tuned for one row or for many, not for a handful: here a
5-row forward of SmolLM2 took 1.9x a 1-row one, which made trees nearly unaffordable. oneDNN with
the weight reordered once into its blocked layout does the same product in about the time of one
row (docs/kernels.md; `python experiments/linear_kernels.py` measures both). The arithmetic is still
fp32 with fp32 accumulation; only the summation order differs, as it already does between batch
sizes, and decoding stays token-identical to stock HF `generate` (tests/test_cpu_kernels.py).

A one-row product is another matter: it streams the weight once whatever the kernel, and MKL's
stock path does that closer to the memory bandwidth than oneDNN's blocked one (one-token forward of
SmolLM2 on this project's CPU: 54 ms stock, 62 ms packed; docs/kernels.md). So the default, `mixed`,
sends one-row products to the stock kernel and several-row products to the packed weight: a
one-token step is then exactly stock torch, and a tree verification gets the packed speed.

`pack_linear_layers` swaps every `nn.Linear` of a loaded model for a `PackedLinear` that shares its
parameters (state dicts, tied weights and `.weight` readers are unaffected) and keeps the packed
copy beside them. `plain_linear_layers` undoes it for a block, e.g. to time stock HF `generate`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

KERNELS = ("auto", "mixed", "packed", "plain")  # auto: mixed where packing applies, else plain
PACKED_KERNELS = ("mixed", "packed")  # the choices that pack; mixed keeps one-row products on the stock kernel
_PACK_HINT = 32  # oneDNN picks its blocking from an expected row count; 32 suits 1..64 rows here


def packing_supported(model: nn.Module) -> bool:
    """oneDNN packing applies to fp32 models (or drafters) on the CPU of a torch built with oneDNN."""
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward runs on a oneDNN-packed copy of its (frozen) weight; with
    `one_row_stock`, a one-row input runs the stock product instead (kernels `mixed`)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, one_row_stock: bool = False) -> PackedLinear:
        return cls.from_weight(linear.weight, linear.bias, one_row_stock)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, one_row_stock: bool = False) -> PackedLinear:
        """Parameters stay parameters and buffers stay plain tensors: both are shared, not copied."""
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.out_features, packed.in_features = weight.shape
        packed.weight, packed.bias = weight, bias
        packed.one_row_stock = one_row_stock
        with torch.no_grad():
            packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_HINT)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)  # the packed op has no backward
        if self.one_row_stock and x.numel() == self.in_features:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, bias, "none", [], "")

    def to_plain(self) -> nn.Linear:
        plain = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = self.in_features, self.out_features
        plain.weight, plain.bias = self.weight, self.bias
        return plain


def _slots(model: nn.Module, wanted) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every submodule `wanted` accepts."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if wanted(child)]


def pack_linear_layers(model: nn.Module, kernels: str = "packed") -> int:
    """Replace every `nn.Linear` of `model` with a `PackedLinear` (in place) for `kernels` (one of
    PACKED_KERNELS); returns how many."""
    if kernels not in PACKED_KERNELS:
        raise ValueError(f"kernels {kernels!r} do not pack; choose one of {', '.join(PACKED_KERNELS)}")
    if not packing_supported(model):
        p = next(model.parameters())
        raise ValueError(f"oneDNN packing needs an fp32 model on the CPU and a torch with oneDNN "
                         f"(model: {p.dtype} on {p.device})")
    slots = _slots(model, lambda m: type(m) is nn.Linear)
    for parent, name, linear in slots:
        setattr(parent, name, PackedLinear.from_linear(linear, one_row_stock=kernels == "mixed"))
    return len(slots)


def pack_draft_module(module: nn.Module, kernels: str = "packed") -> None:
    """Pack a loaded drafter for inference with `kernels` (one of PACKED_KERNELS): its linear layers and its
    frozen draft-vocabulary head (read through `modules.layers.draft_vocab_logits`)."""
    pack_linear_layers(module, kernels)
    module.packed_head = PackedLinear.from_weight(module.head_weight, module.head_bias, kernels == "mixed")


def linear_kernels_of(model: nn.Module) -> str:
    """What the model's linear layers run: 'mixed' or 'packed' (see PACKED_KERNELS), else 'plain'."""
    packed = next((m for m in model.modules() if isinstance(m, PackedLinear)), None)
    if packed is None:
        return "plain"
    return "mixed" if packed.one_row_stock else "packed"


@contextmanager
def plain_linear_layers(model: nn.Module):
    """Run a block with the model's original linear layers, restoring the packed ones afterwards."""
    slots = _slots(model, lambda m: isinstance(m, PackedLinear))
    for parent, name, packed in slots:
        setattr(parent, name, packed.to_plain())
    try:
        yield model
    finally:
        for parent, name, packed in slots:
            setattr(parent, name, packed)


def apply_kernels(model: nn.Module, kernels: str) -> str:
    """Apply the `--kernels` choice to a freshly loaded model; returns what it runs with."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "plain" or (kernels == "auto" and not packing_supported(model)):
        return "plain"
    kernels = "mixed" if kernels == "auto" else kernels
    pack_linear_layers(model, kernels)
    return kernels
