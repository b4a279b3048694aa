"""The drafter that runs any baseline module (modules/medusa.py, hydra.py, eagle.py): per step, update
the module's context with the newly accepted positions, best-first search its token distributions,
and hand the best nodes (as many as the step's budget) to the engine."""

from __future__ import annotations

import torch

from ctcspec.drafters.base import BudgetedDrafter, DraftRequest
from ctcspec.errors import CtcspecError
from ctcspec.modules.files import saved_curves
from ctcspec.modules.heads import HeadsModule
from ctcspec.pricing import BudgetPolicy
from ctcspec.search import build_tree, module_nodes
from ctcspec.tree import TokenTree

DEFAULT_TREE_BUDGET = 8  # used only when no budget is given (assembly.py chooses one for this machine)


class HeadsDrafter(BudgetedDrafter):
    needs_hidden_states = True

    def __init__(self, module: HeadsModule, budget: BudgetPolicy | int = DEFAULT_TREE_BUDGET,
                 acceptance_curve: dict[int, float] | None = None):
        super().__init__(budget)
        self.module = module
        self.name = module.kind
        self.acceptance_curve = acceptance_curve
        self._token_of_class = module.vocab_ids.tolist()
        self.reset()

    @classmethod
    def from_saved(cls, module: HeadsModule, config: dict, transform: str = "beam") -> HeadsDrafter:
        """A drafter for a loaded module, with its held-out acceptance curve (`transform` is the CTC
        drafter's option; best-first search is the only way these modules draft)."""
        return cls(module, acceptance_curve=saved_curves(config).get(module.search_modes[0]))

    def reset(self) -> None:
        super().reset()
        self._context = None

    @torch.inference_mode()
    def draft(self, request: DraftRequest, tree_budget: int) -> TokenTree:
        if request.new_hidden is None:
            raise CtcspecError(f"the {self.name} drafter needs the base model's hidden states")
        device = self.module.embed_weight.device
        self._context = self.module.update_context(self._context, request.new_hidden.to(device),
                                                   request.tokens.to(device))  # a new context object
        nodes = module_nodes(self.module, self._context, tree_budget, request.max_depth)
        return build_tree(nodes, tree_budget, self._token_of_class)
