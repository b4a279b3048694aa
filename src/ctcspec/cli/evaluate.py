"""ctcspec eval: held-out acceptance of drafters side by side, with predicted speedups."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ctcspec.backends import Backend
from ctcspec.budget import drafting_cost_curve, machine_cost_curve
from ctcspec.cli.args import add_kernel_args, add_model_args, budget_list, positive_int, source_list, transform_list
from ctcspec.cli.common import load_backend
from ctcspec.drafters import make_drafter
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL
from ctcspec.modules import KINDS
from ctcspec.modules.files import drafter_kind, read_config, shipped_drafter_dir
from ctcspec.search import TRANSFORMS
from ctcspec.training.compare import (
    EVAL_BUDGETS,
    EvalRow,
    ablation_rows,
    evaluate_drafter,
    heldout_samples,
    read_ablations,
)
from ctcspec.training.data import check_data_base


def add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="held-out acceptance of drafters side by side, with predicted speedups",
                              description="Measure trained drafters' held-out acceptance (mean accepted draft "
                                          "tokens per step, per tree budget) on the held-out split training makes "
                                          "of --data, or read saved ablation curves (--ablations), and predict "
                                          "each one's speedup at its best budget from this machine's cost curve.")
    add_model_args(evaluate)
    add_kernel_args(evaluate)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, nargs="+", metavar="DIR",
                        help="directories written by ctcspec distill, in the order training was given them")
    source.add_argument("--ablations", type=Path, metavar="DIR",
                        help="a directory of saved ablation runs (round*.json, *_config.json; e.g. docs/ablations): "
                             "their saved curves, priced with one CTC drafter's drafting time")
    evaluate.add_argument("--drafter-path", type=Path, action="append", default=[], metavar="DIR",
                          help="a trained drafter directory; repeat to compare several, of any kinds (default: the "
                               "drafters shipped for the embedded default model)")
    evaluate.add_argument("--transforms", type=transform_list, default=list(TRANSFORMS), metavar="LIST",
                          help=f"CTC transforms to read CTC drafters with (default: {','.join(TRANSFORMS)})")
    evaluate.add_argument("--budgets", type=budget_list, default=EVAL_BUDGETS, metavar="LIST",
                          help=f"tree budgets (default: {','.join(map(str, EVAL_BUDGETS))})")
    evaluate.add_argument("--samples", type=positive_int, default=64, metavar="N",
                          help="held-out sequences (default: 64)")
    evaluate.add_argument("--sources", type=source_list, default=None, metavar="S1,S2",
                          help="only held-out sequences of these prompt sources (as `ctcspec store` lists them, e.g. "
                               "alpaca_eval/instructions.jsonl,styled); default: every source")
    evaluate.add_argument("--anchors", type=positive_int, default=16, metavar="N",
                          help="draft positions per held-out sequence (default: 16)")
    evaluate.add_argument("--json", type=Path, default=None, metavar="OUT",
                          help="also write the rows and the cost curve to this JSON file")


def format_cost_curve(cost: dict[int, float]) -> str:
    one = cost[min(cost)]
    return (f"verification cost curve (x a one-token forward of {1000 * one:.1f} ms): "
            + ", ".join(f"q{q} {s / one:.2f}" for q, s in sorted(cost.items())))


def format_eval_table(rows: list[EvalRow], budgets) -> str:
    """`ctcspec eval`'s table: accepted draft tokens per budget, then the best budget and predicted speedup."""
    notes = any(row.note for row in rows)
    lines = ["| drafter | params | steps | " + " | ".join(f"accepted @{b}" for b in budgets)
             + " | best budget | drafting ms | predicted speedup |" + (" change |" if notes else ""),
             "|---|---|---|" + "---|" * (len(budgets) + 3 + notes)]
    for row in rows:
        params = "-" if row.parameters is None else f"{row.parameters / 1e6:.2f} M"
        accepted = " | ".join(f"{row.acceptance[b]:.2f}" if b in row.acceptance else "-" for b in budgets)
        lines.append(f"| {row.label} | {params} | {'-' if row.steps is None else row.steps} | {accepted} | "
                     f"{row.tree_budget} | {1000 * row.draft_seconds:.1f} | {row.speedup:.2f}x |"
                     + (f" {row.note} |" if notes else ""))
    return "\n".join(lines)


def eval_drafter_dirs(args) -> dict[str, Path]:
    """eval's drafters by label (the directory name; the whole path where two names clash), their configs
    checked before any model loads: each --drafter-path, else those shipped for the embedded default model."""
    paths = list(args.drafter_path)
    if not paths and args.model == DEFAULT_MODEL:
        paths = [p for p in (shipped_drafter_dir(args.model, kind) for kind in KINDS) if p is not None]
    for path in paths:
        read_config(path)
    names = [p.name for p in paths]
    return {(p.name if names.count(p.name) == 1 else str(p)): p for p in paths}


def _finish_eval(args, backend: Backend, cost: dict[int, float], rows: list[EvalRow]) -> int:
    print(format_cost_curve(cost))
    print()
    print(format_eval_table(rows, args.budgets))
    if args.json:
        record = {"model": args.model, **backend.describe(), "threads": torch.get_num_threads(),
                  "budgets": list(args.budgets), "cost_curve": cost, "rows": [row.to_dict() for row in rows]}
        try:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            raise CtcspecError(f"cannot write --json {str(args.json)!r}: {exc.strerror}") from None
    return 0


def _eval_ablations(args, dirs: dict[str, Path]) -> int:
    """eval --ablations: saved curves, every run priced with the first CTC drafter's drafting time."""
    if args.sources:
        raise CtcspecError("--sources picks held-out samples of --data; --ablations reads saved curves instead")
    ctc = next((path for path in dirs.values() if drafter_kind(path) == "ctc"), None)
    if ctc is None:
        raise CtcspecError("--ablations prices every run with a CTC drafter's drafting time: pass --drafter-path "
                           "DIR of a CTC drafter for --model")
    shipped = shipped_drafter_dir(args.model, "ctc") if args.model == DEFAULT_MODEL else None
    runs = read_ablations(args.ablations, {"shipped": read_config(shipped)} if shipped else None)
    loaded, backend = load_backend(args)
    cost = machine_cost_curve(backend)
    draft_cost = drafting_cost_curve(make_drafter("ctc", loaded.model, ctc), loaded.model, list(args.budgets))
    return _finish_eval(args, backend, cost, ablation_rows(runs, args.transforms, args.budgets, cost, draft_cost))


def cmd_eval(args) -> int:
    dirs = eval_drafter_dirs(args)
    if args.ablations:
        return _eval_ablations(args, dirs)
    if not dirs:
        raise CtcspecError("give --drafter-path DIR (repeat it to compare several drafters)")
    heldout = heldout_samples(args.data, args.samples, args.sources)
    loaded, backend = load_backend(args)
    check_data_base(args.data, loaded.model)
    cost = machine_cost_curve(backend)
    rows = []
    for label, path in dirs.items():
        rows += evaluate_drafter(path, loaded.model, heldout, args.transforms, args.budgets, cost, label, args.anchors)
        print(f"{label}: measured on {len(heldout)} held-out sequences", file=sys.stderr)
    return _finish_eval(args, backend, cost, rows)
