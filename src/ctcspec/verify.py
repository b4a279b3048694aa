"""Verification: one base-model forward over the root and every draft node.

Each node sits at its true position (context length + depth) and attends to the whole context
plus its own ancestors, so its logits are exactly those the base model would give that token at
the end of the sequence root -> ... -> node. The backend (ctcspec/backends/) runs the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctcspec.backends.base import Backend, HiddenLayers
from ctcspec.tree import ROOT, TokenTree


@dataclass(frozen=True)
class VerifyResult:
    logits: torch.Tensor              # (nodes, vocab): the base model's next-token logits per node; 0 is the root
    hidden: torch.Tensor | None       # hidden states per node, if asked: (nodes, hidden × (1 + earlier layers))


def tree_precision_problem(model: torch.nn.Module) -> str | None:
    """Why verifying trees would not give this model's own one-token decoding, or None. On the CPU, reduced
    precision rounds a several-row product differently from a one-row one, and bf16/fp16 round every layer's
    output, so a tree node's logits drift from the one-token step's and greedy choices change (SmolLM2 in bf16
    on the AMD EPYC kind: prompt lookup left plain bf16 decoding on 5 of 8 requests; docs/kernels.md). fp32
    keeps the difference at the summation order, and decoding is tested identical to HF `generate`."""
    parameter = next(model.parameters())
    if parameter.device.type == "cpu" and parameter.dtype in (torch.bfloat16, torch.float16):
        dtype = str(parameter.dtype).removeprefix("torch.")
        return (f"{dtype} on the CPU rounds a tree's rows differently from one-token steps, so the output would "
                f"drift from model.generate; use --dtype float32 (the fastest on CPU) or --drafter vanilla")
    return None


def node_parents(tree: TokenTree) -> list[int]:
    """Parents over the verification nodes: node 0 is the root, draft node i becomes node i + 1."""
    return [-1] + [0 if p == ROOT else p + 1 for p in tree.parents]


def verify_tree(backend: Backend, cache, root_token: int, tree: TokenTree,
                hidden_layers: HiddenLayers = None) -> VerifyResult:
    """Run root + draft nodes after the cached sequence, appending their keys/values to `cache`."""
    out = backend.forward(cache, [root_token, *tree.tokens], node_parents(tree), hidden_layers)
    return VerifyResult(out.logits, out.hidden)


def prefill(backend: Backend, cache, prompt_ids: list[int], hidden_layers: HiddenLayers = None) -> VerifyResult:
    """Run the prompt into an empty cache; the logits (1, vocab) are those after its last token."""
    out = backend.forward(cache, list(prompt_ids), list(range(-1, len(prompt_ids) - 1)), hidden_layers)
    return VerifyResult(out.logits[-1:], out.hidden)
