"""The CTC drafter ablation table: held-out acceptance per variant, and the tree budget and speedup
this machine's verification cost curve predicts for it.

    python scripts/ablation_table.py [--threads 1]

Reads docs/ablations/round1.json and round2.json (one-epoch variants trained side by side on the
same distilled data by scripts/train_smollm2_gpu*.sh) and the configs of the two full runs. The
acceptance numbers are exact for the held-out positions (the distilled answers are the base model's
greedy output). Predicted speedup = (1 + accepted(b)) / (verify cost(b + 1) + draft cost), relative
to a one-token forward, at the budget b that maximises it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctcspec.costs import choose_tree_budget, expected_rate, machine_cost_curve
from ctcspec.cpu_kernels import KERNELS
from ctcspec.drafters import make_drafter
from ctcspec.drafters.ctc import drafting_seconds
from ctcspec.models import load_model

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ablations"
CHANGES = {"n8k6": "reference: N=8 slots, K=6 targets, bidirectional, CTC, 8192-token draft vocab",
           "n6k4": "N=6, K=4", "n12k8": "N=12, K=8", "causal": "causal slot-to-slot attention",
           "ce": "cross-entropy per slot instead of CTC (K=8)", "fullvocab": "full 49152-token vocabulary"}


def predicted(curve: dict[int, float], cost: dict[int, float], draft: float) -> tuple[int, float]:
    budget = choose_tree_budget(curve, cost, draft)
    return budget, expected_rate(curve[budget], budget, cost, draft) * cost[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", default="auto", choices=KERNELS,
                        help="base model linear kernels, as in ctcspec bench (default auto: packed on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(kernels=args.kernels)
    cost = machine_cost_curve(loaded.model)
    draft = drafting_seconds(make_drafter("ctc", model=loaded.model, model_name="smollm2-135m-instruct",
                                          tree_budget=8))
    rows = {}
    for name in ("round1", "round2"):
        for variant, run in json.loads((DOCS / f"{name}.json").read_text()).items():
            rows[variant] = (CHANGES.get(variant, variant), run)
    full = {"round-1 default (3 epochs)": json.loads((DOCS / "round1_default_config.json").read_text()),
            "shipped (round 2, 2 epochs, more chat data)": json.loads(
                (Path(__file__).resolve().parent.parent / "src/ctcspec/data/drafters/smollm2-135m-instruct-ctc"
                 / "config.json").read_text())}
    print(f"cost curve (x one-token forward of {1000 * cost[1]:.0f} ms): "
          + ", ".join(f"q{q} {s / cost[1]:.2f}" for q, s in sorted(cost.items()))
          + f"; drafting {1000 * draft:.1f} ms/step\n")
    print("| variant | change | steps | accepted @1 / @4 / @8 / @16 (beam) | @16 top-k paths | "
          "budget, predicted speedup (beam) | (top-k) |")
    print("|---|---|---|---|---|---|---|")
    order = ["n8k6", "n6k4", "n12k8", "causal", "ce", "fullvocab"]
    entries = [(v, *rows[v]) for v in order if v in rows] + [(k, "", v) for k, v in full.items()]
    for variant, change, run in entries:
        curves = {t: {int(b): a for b, a in c.items()} for t, c in run["acceptance_curve"].items()}
        beam, topk = curves["beam"], curves["topk"]
        b_beam, s_beam = predicted(beam, cost, draft)
        b_topk, s_topk = predicted(topk, cost, draft)
        print(f"| {variant} | {change} | {run['training']['steps']} | "
              f"{beam[1]:.2f} / {beam[4]:.2f} / {beam[8]:.2f} / {beam[16]:.2f} | {topk[16]:.2f} | "
              f"{b_beam}, {s_beam:.2f}x | {b_topk}, {s_topk:.2f}x |")


if __name__ == "__main__":
    main()
