"""One way to put an engine together: the CLI, the server, `custom_generate` and library code all call it.

    engine = build_engine(model, "ctc+lookup")          # the drafter shipped for this model, budget chosen here

A trained drafter's tree budget is settled here and nowhere else (pricing.py has the rule, budget.py the
measurements):
- `tree_budget=N`: N draft nodes every step;
- default: chosen for this machine from the drafter's held-out acceptance curve, the verification cost curve and its
  drafting time; ctc+lookup re-prices it every step beside lookup's copies (what `ctcspec generate` has always done);
- `adaptive=True`: every trained drafter re-prices it every step (probing at N when `tree_budget=N` is given).
A drafter saved without acceptance curves keeps its default budget (an adaptive budget needs the curves).

    engine = build_batch_engine(model, "ctc+lookup", max_batch=8)   # many sequences at once (batch.py)

In a batch every trained drafter's budget is priced every step on the batched forward's cost at the batch size of that
step (pricing.py), unless `tree_budget=N` fixes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ctcspec.backends import Backend, HFBackend, make_backend
from ctcspec.batch import BatchEngine
from ctcspec.budget import budget_plan, machine_batch_cost
from ctcspec.drafters import MODULE_KIND, check_drafter_name, make_drafter
from ctcspec.drafters.base import BudgetedDrafter, Drafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL
from ctcspec.modules import KINDS
from ctcspec.modules.files import drafter_base, drafter_kind, fingerprints, read_config, shipped_drafter_dir
from ctcspec.pricing import BudgetPolicy, FixedBudget, PricedBudget

log = logging.getLogger(__name__)

def drafter_dirs(paths: Sequence[str | Path] = (), model: torch.nn.Module | None = None) -> dict[str, Path]:
    """Trained drafter directories by kind: each of `paths` (its kind read from its config.json), then, for the kinds
    not given, the drafters shipped in the package whose base is `model`'s weights (in any precision; the LM head is
    hashed only when the shapes already match)."""
    dirs: dict[str, Path] = {}
    for path in map(Path, paths):
        kind = drafter_kind(path)
        if kind in dirs:
            raise CtcspecError(f"--drafter-path: two {kind} drafters given ({dirs[kind]} and {path})")
        dirs[kind] = path
    if model is None:
        return dirs
    shipped = {kind: shipped_drafter_dir(DEFAULT_MODEL, kind) for kind in KINDS if kind not in dirs}
    shipped = {kind: path for kind, path in shipped.items()
               if path is not None and _same_shapes(read_config(path)["base"], model)}
    ours = fingerprints(drafter_base(model)) if shipped else set()
    return {**dirs, **{kind: path for kind, path in shipped.items() if fingerprints(read_config(path)["base"]) & ours}}


def _same_shapes(base: dict, model: torch.nn.Module) -> bool:
    config = model.config
    return (base.get("hidden_size"), base.get("vocab_size")) == (config.hidden_size, config.vocab_size)


def default_drafter(dirs: dict[str, Path], paths: Sequence[str | Path] = ()) -> str:
    """The default drafter: ctc+lookup with a CTC drafter (the fastest of the drafters on both benchmarks in
    docs/results.md), else the kind of the first of `paths`, else lookup."""
    if "ctc" in dirs:
        return "ctc+lookup"
    return drafter_kind(Path(paths[0])) if paths else "lookup"


def budget_policy(drafter: BudgetedDrafter, backend: Backend, tree_budget: int | None = None,
                  adaptive: bool = False, batch_cost: dict[int, dict[int, float]] | None = None) -> BudgetPolicy | None:
    """The budget policy the module docstring describes (priced every step by default where the drafter's trees
    hold another drafter's nodes, or in batches, on `batch_cost`: budget.machine_batch_cost); None: keep the
    drafter's default (it has no acceptance curves)."""
    if tree_budget is not None and not adaptive:
        return FixedBudget(tree_budget)
    plan = budget_plan(drafter, backend, batch_cost)
    if plan is None:
        if adaptive:
            raise CtcspecError(f"an adaptive budget needs a {drafter.name} drafter whose config.json holds acceptance "
                               "curves")
        return None
    start = tree_budget or plan.best()
    log.info("%s: tree budget %d (expected %.2f accepted draft tokens per step)", drafter.name, start,
             plan.acceptance[start] if start in plan.acceptance else float("nan"))
    if batch_cost:
        sizes = sorted(batch_cost)
        choices = [plan.best_or_none(batch=size) for size in sizes]
        log.info("%s in batches of %s: tree budget %s at the held-out acceptance%s", drafter.name,
                 "/".join(map(str, sizes)), "/".join(map(str, choices)),
                 "; 0: plain decoding is expected faster there, so speculation is off but for a probe step in "
                 f"{PricedBudget.probe_every_default} × the batch size" if 0 in choices else "")
    if adaptive:
        return PricedBudget(plan, start, probe=start)
    return PricedBudget(plan, start) if drafter.shares_tree or batch_cost else FixedBudget(start)


def build_drafter(name: str, backend: Backend, dirs: dict[str, Path], tree_budget: int | None = None,
                  adaptive: bool = False, transform: str = "beam", max_batch: int = 0,
                  batch_backend: str = "auto") -> Drafter:
    """The drafter `name` for `backend`'s model (trained ones from `dirs`, by kind), its tree budget settled (for
    batches of up to `max_batch` sequences on `batch_backend`'s forward, when given)."""
    kind = MODULE_KIND.get(check_drafter_name(name))
    if kind is not None and kind not in dirs:
        raise CtcspecError(f"the {name} drafter needs a trained {kind} drafter: pass --drafter-path DIR "
                           f"(train one with ctcspec distill + ctcspec train --kind {kind})")
    priced_batches = max_batch and name != "vanilla"  # plain decoding has nothing to price
    batch_cost = machine_batch_cost(backend.model, max_batch, batch_backend) if priced_batches else None
    drafter = make_drafter(name, backend.model, dirs.get(kind), transform=transform, batch_cost=batch_cost)
    policy = budget_policy(drafter, backend, tree_budget, adaptive, batch_cost) if kind is not None else None
    if policy is not None:  # every trained drafter (MODULE_KIND) is a BudgetedDrafter
        drafter.budget = policy  # the one place a drafter's budget is set after it is made
    return drafter


def build_engine(model: torch.nn.Module, drafter: str | Drafter | None = None, *, backend: Backend | str = "auto",
                 drafter_paths: Sequence[str | Path] = (), shipped: bool = True, tree_budget: int | None = None,
                 adaptive: bool = False, transform: str = "beam") -> SpeculativeEngine:
    """A speculative engine on `model`: `drafter` by name (None: `default_drafter`; trained ones from
    `drafter_paths`, else, with `shipped`, those the package ships for this model's weights), its budget settled for
    this machine, or a `Drafter` you built, used as it is; `backend` by name (backends.make_backend) or built."""
    if isinstance(backend, str):
        backend = make_backend(model, backend)
    if not isinstance(drafter, Drafter):
        dirs = drafter_dirs(drafter_paths, model if shipped else None)
        drafter = build_drafter(drafter or default_drafter(dirs, drafter_paths), backend, dirs, tree_budget, adaptive,
                                transform)
    return SpeculativeEngine(model, drafter, backend=backend)


def build_batch_engine(model: torch.nn.Module, drafter: str | Drafter | None = None, *, max_batch: int = 8,
                       backend: str = "auto", drafter_paths: Sequence[str | Path] = (), shipped: bool = True,
                       tree_budget: int | None = None, adaptive: bool = False, transform: str = "beam") -> BatchEngine:
    """A batched engine (batch.py) on `model` for up to `max_batch` sequences at once, its forward on `backend`
    (auto, static or hf: batch_cache.BatchRunner); `drafter` and the rest as `build_engine` takes them, the budget
    priced for batches."""
    if not isinstance(drafter, Drafter):
        dirs = drafter_dirs(drafter_paths, model if shipped else None)
        drafter = build_drafter(drafter or default_drafter(dirs, drafter_paths), HFBackend(model), dirs, tree_budget,
                                adaptive, transform, max_batch, backend)
    return BatchEngine(model, drafter, max_batch=max_batch, backend=backend)
