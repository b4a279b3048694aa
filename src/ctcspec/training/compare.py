"""Drafters side by side (`ctcspec eval`): held-out acceptance curves, and the speedup each curve predicts
on this machine at its best tree budget.

Curves are measured on the held-out split training makes (every `TrainConfig().heldout_every`-th sample
of the same data directories, in the same order), so no drafter trained on those directories has seen
them; or read from saved ablation runs (docs/ablations/). A prediction is (1 + accepted(b)) /
(verify cost(b + 1) + draft cost(b)) relative to plain decoding's one token per one-token forward, at the
budget b that maximises it (pricing.BudgetPlan): it prices verification and drafting, nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctcspec.budget import drafting_cost_curve
from ctcspec.drafters import TRAINED_DRAFTERS
from ctcspec.errors import CtcspecError, read_text_file
from ctcspec.modules import parameter_count
from ctcspec.modules.files import load_drafter_module
from ctcspec.pricing import BudgetPlan
from ctcspec.training.data import read_data, split_heldout
from ctcspec.training.evaluate import acceptance_curve
from ctcspec.training.train import TrainConfig

EVAL_BUDGETS = (1, 2, 4, 8, 16, 32)
ABLATION_CHANGES = {  # the one-epoch variants scripts/train_smollm2_gpu.sh trains
    "n8k6": "reference: N=8 slots, K=6 targets, bidirectional, CTC, 8192-token draft vocab",
    "n6k4": "N=6, K=4", "n12k8": "N=12, K=8", "causal": "causal slot-to-slot attention",
    "ce": "cross-entropy per slot instead of CTC (K=8)", "fullvocab": "full 49152-token vocabulary"}


@dataclass(frozen=True)
class EvalRow:
    """One drafter read one way (a search mode): its held-out curve and what the curve predicts here."""
    label: str
    mode: str
    acceptance: dict[int, float]      # mean accepted draft tokens per step, per tree budget
    tree_budget: int                  # the budget maximising predicted speed on this machine
    speedup: float                    # predicted tokens/s at that budget over plain decoding's
    draft_seconds: float              # one drafting step at that budget, as measured here
    parameters: int | None = None     # trained parameters (None where unknown, e.g. an ablation summary)
    steps: int | None = None          # training steps
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _training(run) -> dict:
    """A saved run's (or config.json's) training summary; {} where it has none or it is malformed."""
    training = run.get("training") if isinstance(run, dict) else None
    return training if isinstance(training, dict) else {}


def heldout_samples(data_dirs: list[Path], count: int, sources: list[str] | None = None) -> list[dict]:
    """The first `count` held-out samples of `data_dirs` (of `sources` only, when given): the split training makes
    of the same directories."""
    _, heldout = split_heldout(read_data([Path(d) for d in data_dirs]), TrainConfig().heldout_every)
    if sources:
        heldout = [s for s in heldout if s["source"] in sources]
        if not heldout:
            raise CtcspecError(f"no held-out samples of the sources {', '.join(sources)} in the data")
    return heldout[:count]


def vocabulary_coverage(vocab_ids: list[int], data_dirs: list[Path]) -> dict:
    """The distilled data of `data_dirs` (distinct prompts, tokens, answer tokens) and the share of the answer
    tokens of its train and held-out splits (as training splits them) that the draft vocabulary holds."""
    samples = read_data([Path(d) for d in data_dirs])
    vocab = set(vocab_ids)
    splits = dict(zip(("train", "heldout"), split_heldout(samples, TrainConfig().heldout_every), strict=True))
    coverage = {}
    for name, group in splits.items():
        answers = [t for s in group for t in s["ids"][s["prompt_len"]:]]
        coverage[name] = {"answers": len(group), "covered": sum(t in vocab for t in answers) / max(len(answers), 1)}
    return {"prompts": len(samples), "tokens": sum(len(s["ids"]) for s in samples),
            "answer_tokens": sum(len(s["ids"]) - s["prompt_len"] for s in samples), **coverage}


def predict(acceptance: dict[int, float], cost: dict[int, float], draft_cost: dict[int, float]) -> tuple[int, float]:
    """The best tree budget of an acceptance curve on this machine and its predicted speedup over plain
    decoding (plain decoding makes one token per one-token forward, cost[1])."""
    plan = BudgetPlan(acceptance, cost, draft_cost)
    budget = plan.best()
    return budget, plan.rate(budget) * cost[1]


def evaluate_drafter(directory: Path, model: torch.nn.Module, heldout: list[dict], modes: list[str] | None,
                     budgets, cost: dict[int, float], label: str, max_anchors: int = 16) -> list[EvalRow]:
    """Rows of the drafter saved in `directory`, one per search mode: its held-out curve on `heldout`, measured
    now, and its best budget and predicted speedup on this machine. `modes` picks among the module's own
    search modes (the CTC transforms); a module none of whose modes is named is read its own way."""
    module, config = load_drafter_module(Path(directory), model)
    chosen = [m for m in modes or () if m in module.search_modes] or list(module.search_modes[:1])
    parameters = parameter_count(module)
    steps = _training(config).get("steps")
    rows = []
    for mode in chosen:
        curve = acceptance_curve(module, model, heldout, mode, budgets=tuple(budgets), max_anchors=max_anchors)
        drafter = TRAINED_DRAFTERS[config["kind"]].from_saved(module, config, mode)
        draft_cost = drafting_cost_curve(drafter, model, sorted(budgets))
        budget, speedup = predict(curve, cost, draft_cost)
        name = label if len(module.search_modes) == 1 else f"{label} ({mode})"
        rows.append(EvalRow(name, mode, curve, budget, speedup, draft_cost[budget], parameters, steps))
    return rows


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(read_text_file(path, what))
    except json.JSONDecodeError as exc:
        raise CtcspecError(f"{what} {str(path)!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise CtcspecError(f"{what} {str(path)!r} must hold a JSON object")
    return data


def read_ablations(directory: Path, full_runs: dict[str, dict] | None = None) -> list[tuple[str, str, dict]]:
    """(label, change, run) of saved ablation runs: the variants of every round*.json in `directory`
    (variant -> {draft, training, acceptance_curve}, as the GPU recipe collects them; known variants first,
    in ABLATION_CHANGES order), then each *_config.json there (a full run's drafter config) and `full_runs`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CtcspecError(f"ablation directory {str(directory)!r} does not exist")
    variants: dict[str, dict] = {}
    for path in sorted(p for p in directory.glob("round*.json") if not p.name.endswith("_config.json")):
        variants.update(_read_json(path, "ablation file"))
    order = [v for v in ABLATION_CHANGES if v in variants] + sorted(v for v in variants if v not in ABLATION_CHANGES)
    runs = [(v, ABLATION_CHANGES.get(v, ""), variants[v]) for v in order]
    full = {p.name.removesuffix("_config.json"): _read_json(p, "drafter config")
            for p in sorted(directory.glob("*_config.json"))}
    for label, run in {**full, **(full_runs or {})}.items():
        options = _training(run).get("config")
        epochs = options.get("epochs") if isinstance(options, dict) else None
        runs.append((label, f"full run, {epochs:g} epochs" if isinstance(epochs, int | float) else "full run", run))
    if not runs:
        raise CtcspecError(f"{str(directory)!r} holds no round*.json or *_config.json ablation runs")
    return runs


def ablation_rows(runs: list[tuple[str, str, dict]], modes: list[str] | None, budgets, cost: dict[int, float],
                  draft_cost: dict[int, float]) -> list[EvalRow]:
    """Rows of saved ablation runs, one per search mode saved (those in `modes`, when given), restricted to
    `budgets`, with the best budget and predicted speedup on this machine; every row is priced with one
    drafter's `draft_cost` (the variants' own weights are not kept)."""
    rows = []
    for label, change, run in runs:
        try:
            curves = {m: {int(b): float(a) for b, a in c.items()} for m, c in run["acceptance_curve"].items()}
            steps = _training(run).get("steps")
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CtcspecError(f"ablation run {label!r} has no readable acceptance_curve") from None
        for mode, curve in curves.items():
            if modes and mode not in modes:
                continue
            kept = {b: curve[b] for b in budgets if b in curve}
            if not kept:
                raise CtcspecError(f"ablation run {label!r} ({mode}) has none of the budgets {list(budgets)}")
            budget, speedup = predict(kept, cost, {b: draft_cost[b] for b in kept})
            rows.append(EvalRow(f"{label} ({mode})", mode, kept, budget, speedup, draft_cost[budget], None, steps,
                                change))
    return rows
