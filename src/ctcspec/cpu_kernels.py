"""Linear-layer kernels for the few-row products speculative decoding makes on a CPU (`--kernels`).

A one-token step multiplies every weight matrix by one row; a tree verification by q = 2..30 rows.
The choices, all fp32 with fp32 accumulation (only the summation order differs between them, as it
already does between batch sizes in stock torch; decoding is tested token-identical to stock HF
`generate` with each, tests/test_cpu_kernels.py):

- `plain`: the model's own `nn.Linear` (MKL on the weight as stored).
- `packed`: oneDNN on a copy of the weight reordered once into its blocked layout; a handful of rows
  cost about one row's time (docs/kernels.md).
- `mixed`: one-row products on the stock kernel, several-row products packed.
- `native`: ctcspec's own AVX-512 kernel, compiled on the machine (native_linear.py): every row
  rounds as the one-row product of the same input would, and a one-token step streams the weights
  close to the memory bandwidth.
- `native-packed`: native up to four rows (one pass over the weights), packed beyond, where oneDNN's
  blocking keeps up better with the arithmetic.
- `auto`: whichever of these is fastest on this machine, chosen by measurement (kernel_choice.py).

`install_kernels` swaps every `nn.Linear` of a loaded model for a layer running the chosen kernel, sharing
its parameters (state dicts, tied weights and `.weight` readers are unaffected) and keeping any packed copy
beside them. `plain_linear_layers` undoes it for a block, e.g. to time stock HF `generate`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ctcspec.native_linear import NATIVE_ROWS, NativeLinear, native_problem

KERNELS = ("auto", "native", "native-packed", "mixed", "packed", "plain")  # auto: measured (kernel_choice.py)
INSTALLED_KERNELS = ("native", "native-packed", "mixed", "packed")  # the choices that swap the linear layers
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
        return packed_linear(x, self.packed_weight, self.bias)


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    bias = None if bias is None else bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight, bias, "none", [], "")


class NativePackedLinear(NativeLinear):
    """`NativeLinear` up to NATIVE_ROWS rows; beyond, the oneDNN-packed product (kernels `native-packed`)."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> NativePackedLinear:
        layer = super().from_weight(weight, bias)
        with torch.no_grad():
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_HINT)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        if x.numel() > NATIVE_ROWS * self.in_features:
            return packed_linear(x, self.packed_weight, self.bias)
        return super().forward(x)


KERNEL_LAYERS = (PackedLinear, NativeLinear)


def kernels_problem(model: nn.Module, kernels: str) -> str | None:
    """Why `kernels` (one of INSTALLED_KERNELS) cannot run `model`, or None when they can."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return f"they need an fp32 model on the CPU (model: {parameter.dtype} on {parameter.device})"
    if kernels.startswith("native") and (problem := native_problem()):
        return f"ctcspec's native kernel cannot run here: {problem}"
    if kernels != "native" and not packing_supported(model):
        return "oneDNN packing needs a torch built with oneDNN"
    return None


def kernel_layer(weight: torch.Tensor, bias: torch.Tensor | None, kernels: str) -> nn.Linear:
    """A layer computing `F.linear(x, weight, bias)` on `kernels` (one of INSTALLED_KERNELS, or plain), sharing
    both."""
    if kernels == "native":
        return NativeLinear.from_weight(weight, bias)
    if kernels == "native-packed":
        return NativePackedLinear.from_weight(weight, bias)
    if kernels in ("mixed", "packed"):
        return PackedLinear.from_weight(weight, bias, one_row_stock=kernels == "mixed")
    if kernels == "plain":
        return plain_layer(weight, bias)
    raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(INSTALLED_KERNELS)} or plain")


def _slots(model: nn.Module, wanted) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every submodule `wanted` accepts."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if wanted(child)]


def plain_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A stock `nn.Linear` on `weight` and `bias`, shared."""
    plain = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(plain)
    plain.out_features, plain.in_features = weight.shape
    plain.weight, plain.bias = weight, bias
    return plain


def install_kernels(model: nn.Module, kernels: str) -> int:
    """Make every linear layer of `model` run `kernels` (one of INSTALLED_KERNELS, or plain), in place, whatever
    it ran before; returns how many layers."""
    if kernels in INSTALLED_KERNELS and (problem := kernels_problem(model, kernels)):
        raise ValueError(problem)  # an unknown name: kernel_layer refuses it
    slots = _slots(model, lambda m: isinstance(m, nn.Linear))
    for parent, name, linear in slots:
        setattr(parent, name, kernel_layer(linear.weight, linear.bias, kernels))
    return len(slots)


def install_draft_kernels(module: nn.Module, kernels: str) -> None:
    """Run a loaded drafter's linear layers and its frozen draft-vocabulary head (read through
    `modules.layers.draft_vocab_logits`) on `kernels`, like its base."""
    install_kernels(module, kernels)
    module.kernel_head = kernel_layer(module.head_weight, module.head_bias, kernels)


def linear_kernels_of(model: nn.Module) -> str:
    """What the model's linear layers run: one of INSTALLED_KERNELS, else 'plain'."""
    layer = next((m for m in model.modules() if isinstance(m, KERNEL_LAYERS)), None)
    if layer is None:
        return "plain"
    if isinstance(layer, NativeLinear):
        return "native-packed" if isinstance(layer, NativePackedLinear) else "native"
    return "mixed" if layer.one_row_stock else "packed"


@contextmanager
def plain_linear_layers(model: nn.Module):
    """Run a block with the model's original linear layers, restoring the kernel layers afterwards."""
    slots = _slots(model, lambda m: isinstance(m, KERNEL_LAYERS))
    for parent, name, layer in slots:
        setattr(parent, name, plain_layer(layer.weight, layer.bias))
    try:
        yield model
    finally:
        for parent, name, layer in slots:
            setattr(parent, name, layer)
