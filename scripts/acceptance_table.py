"""Held-out acceptance of trained drafters side by side: mean accepted draft tokens per step at
several tree budgets, on the same held-out distilled sequences (exact: they are the base model's own
greedy answers), for any mix of CTC drafters (each CTC transform) and baselines.

    python scripts/acceptance_table.py --data runs/gpu1/data/gsm8k runs/gpu2/data/templ2 runs/gpu1/data/self \
        --drafter ctc=src/ctcspec/data/drafters/smollm2-135m-instruct-ctc --drafter medusa=runs/cpu/medusa \
        [--transforms beam,topk,none] [--samples 64] [--json OUT]

The held-out split is the one training used (every 50th sample of the same data directories, in the
same order), so no drafter has seen these sequences.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctcspec.checkpoint import load_drafter_module
from ctcspec.draft_module import CTCDraftModule
from ctcspec.models import load_model
from ctcspec.train import acceptance_curve, read_data, split_heldout

BUDGETS = (1, 2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--drafter", action="append", required=True, help="LABEL=DIR (repeat)")
    parser.add_argument("--transforms", default="beam,topk,none", help="for CTC drafters")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--anchors", type=int, default=16, help="draft positions per held-out sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model().model
    _, heldout = split_heldout(read_data(args.data), 50)
    heldout = heldout[:args.samples]
    rows = {}
    for spec in args.drafter:
        label, path = spec.split("=", 1)
        module, config = load_drafter_module(Path(path), model)
        params = sum(p.numel() for p in module.parameters())
        transforms = args.transforms.split(",") if isinstance(module, CTCDraftModule) else ["search"]
        for transform in transforms:
            curve = acceptance_curve(module, model, heldout, transform=transform, budgets=BUDGETS,
                                     max_anchors=args.anchors)
            name = f"{label} ({transform})" if isinstance(module, CTCDraftModule) else label
            rows[name] = {"parameters": params, "train_seconds": config.get("training", {}).get("train_seconds"),
                          "curve": curve}
            print(name, {b: round(a, 3) for b, a in curve.items()}, flush=True)
    print()
    print("| drafter | params | " + " | ".join(f"accepted@{b}" for b in BUDGETS) + " |")
    print("|---|---|" + "---|" * len(BUDGETS))
    for name, row in rows.items():
        print(f"| {name} | {row['parameters'] / 1e6:.2f} M | "
              + " | ".join(f"{row['curve'][b]:.2f}" for b in BUDGETS) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
