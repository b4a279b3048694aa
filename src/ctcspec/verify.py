"""Verification: one base-model forward over the root and every draft node.

Each node sits at its true position (context length + depth) and attends to the whole context
plus its own ancestors, so its logits are exactly those the base model would give that token at
the end of the sequence root -> ... -> node. The backend (ctcspec/backends/) runs the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctcspec.backends.base import Backend
from ctcspec.tree import ROOT, TokenTree


@dataclass(frozen=True)
class VerifyResult:
    logits: torch.Tensor              # (nodes, vocab): the base model's next-token logits per node; 0 is the root
    hidden: torch.Tensor | None       # last-layer hidden state per node, shape (nodes, hidden), if asked


def node_parents(tree: TokenTree) -> list[int]:
    """Parents over the verification nodes: node 0 is the root, draft node i becomes node i + 1."""
    return [-1] + [0 if p == ROOT else p + 1 for p in tree.parents]


def verify_tree(backend: Backend, cache, root_token: int, tree: TokenTree, want_hidden: bool = False) -> VerifyResult:
    """Run root + draft nodes after the cached sequence, appending their keys/values to `cache`."""
    out = backend.forward(cache, [root_token, *tree.tokens], node_parents(tree), want_hidden)
    return VerifyResult(out.logits, out.hidden)


def prefill(backend: Backend, cache, prompt_ids: list[int], want_hidden: bool = False) -> VerifyResult:
    """Run the prompt into an empty cache; the logits (1, vocab) are those after its last token."""
    out = backend.forward(cache, list(prompt_ids), list(range(-1, len(prompt_ids) - 1)), want_hidden)
    return VerifyResult(out.logits[-1:], out.hidden)
