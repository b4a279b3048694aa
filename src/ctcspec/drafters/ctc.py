"""The CTC drafter: the attention draft module's slots, CTC-transformed into a verification tree.

Per step: the base hidden states of newly accepted positions extend the module's context cache
(no recomputation of the context), the N slots are run once, the CTC transform turns their
distributions into collapsed candidates, and the best `tree_budget` trie nodes go to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ctcspec.checkpoint import default_drafter_dir, load_drafter_module
from ctcspec.costs import choose_tree_budget, drafting_cost_curve, expected_rate, machine_cost_curve
from ctcspec.ctc_transform import TRANSFORMS, build_tree, transform_nodes
from ctcspec.draft_module import ContextCache, CTCDraftModule
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree

DEFAULT_TREE_BUDGET = 16  # used only when neither --tree-budget nor a measured choice is available


@dataclass(frozen=True)
class AdaptiveBudget:
    """Re-chooses the tree budget during a generation from the acceptance actually observed.

    The held-out acceptance curve is scaled by (accepted so far) / (what the curve expected for the
    budgets used), with `prior_steps` steps' worth of the curve as a prior; the budget maximising
    expected tokens per unit time under the scaled curve is taken, or none (0) when plain decoding is
    faster. While not drafting, every `probe_every`-th step still drafts, to keep measuring.
    """
    acceptance: dict[int, float]   # held-out mean accepted draft tokens per budget
    cost: dict[int, float]         # verification seconds of a forward over q nodes
    draft_cost: float              # seconds of one drafting step
    prior_steps: float = 4.0
    probe_every: int = 8

    def choose(self, accepted: float, expected: float) -> int:
        reference = max(self.acceptance.values())
        scale = (self.prior_steps * reference + accepted) / (self.prior_steps * reference + expected)
        best = max(self.acceptance, key=lambda b: self._rate(b, scale))
        return best if self._rate(best, scale) > 1.0 / self.cost[min(self.cost)] else 0

    def _rate(self, budget: int, scale: float) -> float:
        return expected_rate(scale * self.acceptance[budget], budget, self.cost, self.draft_cost)


class CTCDrafter(Drafter):
    name = "ctc"
    needs_hidden_states = True

    def __init__(self, module: CTCDraftModule, tree_budget: int = DEFAULT_TREE_BUDGET, transform: str = "beam",
                 top_k: int = 6, beam_width: int = 16, adaptive: AdaptiveBudget | None = None):
        if transform not in TRANSFORMS:
            raise CtcspecError(f"unknown CTC transform {transform!r}; choose from: {', '.join(TRANSFORMS)}")
        if tree_budget < 1:
            raise CtcspecError("the tree budget must be at least 1 node")
        self.module = module
        self.tree_budget, self.transform = tree_budget, transform
        self.top_k, self.beam_width = top_k, beam_width
        self.adaptive = adaptive
        self._token_of_class = module.vocab_ids.tolist()
        self.reset()

    def reset(self) -> None:
        self._cache: ContextCache | None = None
        self._last_budget = 0          # budget of the previous proposal (0: it drafted nothing)
        self._accepted = 0.0           # adaptive budget bookkeeping, per generation
        self._expected = 0.0
        self._idle_steps = 0

    def _budget_for_step(self, accepted_last_step: int) -> int:
        """The node budget for this step: fixed, or re-chosen from the acceptance seen so far."""
        if self.adaptive is None:
            return self.tree_budget
        if self._last_budget:
            self._accepted += accepted_last_step
            self._expected += self.adaptive.acceptance.get(self._last_budget, 0.0)
        budget = self.adaptive.choose(self._accepted, self._expected)
        if budget:
            self._idle_steps = 0
            return budget
        self._idle_steps += 1
        return self.tree_budget if self._idle_steps % self.adaptive.probe_every == 0 else 0


    @torch.inference_mode()
    def propose(self, request: DraftRequest) -> TokenTree:
        if request.new_hidden is None:
            raise CtcspecError("the CTC drafter needs the base model's hidden states")
        device = self.module.embed_weight.device
        hidden = request.new_hidden.to(device)
        new = hidden.shape[0]
        start = len(request.tokens) - 1 - new  # position of the first newly accepted state
        next_tokens = request.tokens[-new:].to(device)
        units = self.module.context_units(hidden[None], next_tokens[None])
        self._cache = self.module.extend(self._cache, units, start)  # a new cache; the old one is not touched
        budget = self._budget_for_step(accepted_last_step=new - 1)
        self._last_budget = budget
        if budget == 0:
            return TokenTree()
        log_probs = self.module.draft_log_probs(self._cache, units[:, -1]).cpu()
        c = self.module.config
        nodes = transform_nodes(log_probs, self.transform, self.top_k, self.beam_width, c.blank_id, c.other_id,
                                budget, request.max_depth)
        return build_tree(nodes, budget, self._token_of_class)


def drafting_seconds(drafter: CTCDrafter) -> float:
    """Median time of one propose() step at the drafter's budget (one slot forward whatever the budget)."""
    return drafting_cost_curve(drafter, [drafter.tree_budget])[drafter.tree_budget]


def load_ctc_drafter(model: torch.nn.Module, path: str | Path | None = None, model_name: str | None = None,
                     tree_budget: int | None = None, transform: str = "beam", adaptive: bool = False) -> CTCDrafter:
    """A CTC drafter for `model`: from `path`, else the one shipped for the embedded default model.

    Without `tree_budget`, the budget maximising expected tokens per unit time is chosen from the
    drafter's measured acceptance curve and this machine's verification cost curve.
    """
    if path is None:
        path = default_drafter_dir(model_name) if model_name else None
        if path is None:
            raise CtcspecError("no CTC drafter given and none ships for this model: pass --drafter-path DIR "
                               "(train one with ctcspec distill + ctcspec train)")
    module, config = load_drafter_module(Path(path), model, kind="ctc")
    drafter = CTCDrafter(module, transform=transform)
    acceptance = {int(b): float(a) for b, a in config.get("acceptance_curve", {}).get(transform, {}).items()}
    if (tree_budget is None or adaptive) and acceptance:
        cost = machine_cost_curve(model)
        draft_cost = drafting_seconds(drafter)
        if tree_budget is None:
            tree_budget = choose_tree_budget(acceptance, cost, draft_cost=draft_cost)
        if adaptive:
            drafter.adaptive = AdaptiveBudget(acceptance, cost, draft_cost)
    elif adaptive:
        raise CtcspecError("--adaptive-budget needs a drafter whose config.json holds acceptance curves")
    drafter.tree_budget = tree_budget if tree_budget is not None else DEFAULT_TREE_BUDGET
    if drafter.tree_budget < 1:
        raise CtcspecError("--tree-budget must be at least 1")
    return drafter
