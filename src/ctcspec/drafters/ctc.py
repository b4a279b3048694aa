"""The CTC drafter: the attention draft module's slots, CTC-transformed into a verification tree.

Per step: the base hidden states of newly accepted positions extend the module's context cache
(no recomputation of the context), the N slots are run once, the CTC transform turns their
distributions into collapsed candidates, and the best trie nodes (as many as the step's budget) go to the engine.
"""

from __future__ import annotations

import torch

from ctcspec.drafters.base import BudgetedDrafter, DraftRequest
from ctcspec.errors import CtcspecError
from ctcspec.modules.ctc import CTCModule, LayerCaches
from ctcspec.modules.files import saved_curves
from ctcspec.pricing import BudgetPolicy
from ctcspec.search import TRANSFORMS, build_tree
from ctcspec.tree import TokenTree

DEFAULT_TREE_BUDGET = 16  # used only when no budget is given (assembly.py chooses one for this machine)


class CTCDrafter(BudgetedDrafter):
    name = "ctc"
    needs_hidden_states = True

    def __init__(self, module: CTCModule, budget: BudgetPolicy | int = DEFAULT_TREE_BUDGET, transform: str = "beam",
                 top_k: int = 6, beam_width: int = 16, acceptance_curve: dict[int, float] | None = None):
        if transform not in TRANSFORMS:
            raise CtcspecError(f"unknown CTC transform {transform!r}; choose from: {', '.join(TRANSFORMS)}")
        super().__init__(budget)
        self.module = module
        self.transform = transform
        self.top_k, self.beam_width = top_k, beam_width
        self.acceptance_curve = acceptance_curve
        self._token_of_class = module.vocab_ids.tolist()
        self.reset()

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.module.feature_layers

    @classmethod
    def from_saved(cls, module: CTCModule, config: dict, transform: str = "beam") -> CTCDrafter:
        """A drafter for a loaded module, with the held-out acceptance curve of its transform."""
        return cls(module, transform=transform, acceptance_curve=saved_curves(config).get(transform))

    def reset(self) -> None:
        super().reset()
        self._cache: LayerCaches | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (hidden, next tokens) not in the cache yet

    def settings(self) -> dict:
        return {**super().settings(), "transform": self.transform, "top_k": self.top_k,
                "beam_width": self.beam_width}

    @torch.inference_mode()
    def draft(self, request: DraftRequest, tree_budget: int) -> TokenTree:
        if request.new_hidden is None:
            raise CtcspecError("the CTC drafter needs the base model's hidden states")
        width = self.module.config.hidden_size * (1 + len(self.feature_layers))
        if request.new_hidden.shape[-1] != width:
            raise CtcspecError(f"the CTC drafter reads {width} hidden features per position (the last layer's and "
                               f"layers {list(self.feature_layers)}), got {request.new_hidden.shape[-1]}")
        device = self.module.embed_weight.device
        new = request.new_hidden.shape[0]
        self._pending.append((request.new_hidden.to(device), request.tokens[-new:].to(device)))
        if tree_budget < 1:  # nothing to draft: the context takes in these states with the next draft
            return TokenTree()
        hidden = torch.cat([h for h, _ in self._pending])
        next_tokens = torch.cat([t for _, t in self._pending])
        self._pending = []
        start = len(request.tokens) - 1 - hidden.shape[0]  # position of the first state not yet in the context
        units = self.module.context_units(hidden[None], next_tokens[None])
        self._cache = self.module.extend(self._cache, units, start)  # a new cache; the old one is not touched
        log_probs = self.module.draft_log_probs(self._cache, units[:, -1]).cpu()
        nodes = self.module.slot_nodes(log_probs, tree_budget, self.transform, request.max_depth,
                                       self.top_k, self.beam_width)
        return build_tree(nodes, tree_budget, self._token_of_class)
