"""The drafter that runs any baseline module (medusa.py, hydra.py, eagle.py): per step, update the
module's context with the newly accepted positions, best-first search its token distributions, and
hand the best `tree_budget` nodes to the engine."""

from __future__ import annotations

from pathlib import Path

import torch

from ctcspec.checkpoint import default_drafter_dir, load_drafter_module
from ctcspec.costs import choose_tree_budget, drafting_cost_curve, machine_cost_curve
from ctcspec.ctc_transform import build_tree
from ctcspec.draft_heads import HeadsModule, best_first_nodes
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree

DEFAULT_TREE_BUDGET = 8  # used only when neither --tree-budget nor a measured choice is available


def search_nodes(module: HeadsModule, context, max_nodes: int, max_depth: int) -> list[tuple[int, ...]]:
    """The best `max_nodes` draft nodes after `context` (exactly the best: top_k = max_nodes children)."""
    depth = min(max_depth, module.config.depth)
    if depth < 1 or max_nodes < 1:
        return []
    return best_first_nodes(module.search_root(context), module.expand, max_nodes, depth, top_k=max_nodes,
                            other_id=module.config.other_id)


class HeadsDrafter(Drafter):
    needs_hidden_states = True

    def __init__(self, module: HeadsModule, tree_budget: int = DEFAULT_TREE_BUDGET):
        if tree_budget < 1:
            raise CtcspecError("the tree budget must be at least 1 node")
        self.module = module
        self.name = module.kind
        self.tree_budget = tree_budget
        self._token_of_class = module.vocab_ids.tolist()
        self.reset()

    def reset(self) -> None:
        self._context = None

    @torch.inference_mode()
    def propose(self, request: DraftRequest) -> TokenTree:
        if request.new_hidden is None:
            raise CtcspecError(f"the {self.name} drafter needs the base model's hidden states")
        device = self.module.embed_weight.device
        self._context = self.module.update_context(self._context, request.new_hidden.to(device),
                                                   request.tokens.to(device))  # a new context object
        nodes = search_nodes(self.module, self._context, self.tree_budget, request.max_depth)
        return build_tree(nodes, self.tree_budget, self._token_of_class)


def load_heads_drafter(kind: str, model: torch.nn.Module, path: str | Path | None = None,
                       model_name: str | None = None, tree_budget: int | None = None) -> HeadsDrafter:
    """A trained `kind` drafter for `model`: from `path`, else the one shipped for the embedded default.
    Without `tree_budget`, the budget is chosen like the CTC drafter's (acceptance curve x cost curve)."""
    if path is None:
        path = default_drafter_dir(model_name, kind) if model_name else None
        if path is None:
            raise CtcspecError(f"no {kind} drafter given and none ships for this model: pass --{kind}-path DIR "
                               f"(train one with ctcspec distill + ctcspec train --kind {kind})")
    module, config = load_drafter_module(Path(path), model, kind=kind)
    drafter = HeadsDrafter(module)
    acceptance = {int(b): float(a) for b, a in config.get("acceptance_curve", {}).get("search", {}).items()}
    if tree_budget is None and acceptance:
        tree_budget = choose_tree_budget(acceptance, machine_cost_curve(model),
                                         drafting_cost_curve(drafter, sorted(acceptance), repeats=3))
    drafter.tree_budget = tree_budget if tree_budget is not None else DEFAULT_TREE_BUDGET
    if drafter.tree_budget < 1:
        raise CtcspecError("--tree-budget must be at least 1")
    return drafter
