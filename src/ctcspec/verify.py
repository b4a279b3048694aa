"""Verification: one base-model forward over the root and every draft node.

Each node sits at its true position (context length + depth) and attends to the whole context
plus its own ancestors, so its logits are exactly those the base model would give that token at
the end of the sequence root -> ... -> node. All per-step tensors are built fresh here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctcspec.tree import ROOT, TokenTree


@dataclass(frozen=True)
class VerifyResult:
    greedy: list[int]                 # base model's argmax after each node; index 0 is the root
    hidden: torch.Tensor | None       # last-layer hidden state per node, shape (nodes, hidden), if asked


def node_parents(tree: TokenTree) -> list[int]:
    """Parents over the verification nodes: node 0 is the root, draft node i becomes node i + 1."""
    return [-1] + [0 if p == ROOT else p + 1 for p in tree.parents]


def tree_attention_mask(parents: list[int], past_len: int, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive 4D mask (1, 1, q, past_len + q): 0 where a node may attend, the dtype's minimum elsewhere.

    Additive float rather than boolean: transformers' eager attention misreads boolean 4D masks.
    """
    q = len(parents)
    allowed = torch.zeros(q, past_len + q, dtype=torch.bool)
    allowed[:, :past_len] = True
    for node, parent in enumerate(parents):
        if parent >= 0:
            allowed[node, past_len:] = allowed[parent, past_len:]
        allowed[node, past_len + node] = True
    mask = torch.zeros(q, past_len + q, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.to(device)[None, None]


@torch.inference_mode()
def verify_tree(model: torch.nn.Module, cache, root_token: int, tree: TokenTree, past_len: int,
                want_hidden: bool = False) -> VerifyResult:
    """Run root + draft nodes through `model`, appending their keys/values to `cache`."""
    device = model.device
    input_ids = torch.tensor([[root_token, *tree.tokens]], device=device)
    depths = [0, *tree.depths()]
    position_ids = torch.tensor([[past_len + d for d in depths]], device=device)
    if tree.is_chain():
        mask = None  # a chain is plain causal decoding: let the model build its usual mask
    else:
        mask = tree_attention_mask(node_parents(tree), past_len, model.dtype, device)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                cache=cache, use_cache=True, output_hidden_states=want_hidden)
    greedy = out.logits[0].argmax(dim=-1).tolist()
    hidden = out.hidden_states[-1][0] if want_hidden else None
    return VerifyResult(greedy, hidden)


@torch.inference_mode()
def prefill(model: torch.nn.Module, cache, prompt_ids: list[int], want_hidden: bool = False) -> VerifyResult:
    """Run the prompt through `model`; greedy[-1] is the first generated token."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, output_hidden_states=want_hidden)
    greedy = out.logits[0, -1:].argmax(dim=-1).tolist()
    hidden = out.hidden_states[-1][0] if want_hidden else None
    return VerifyResult(greedy, hidden)
