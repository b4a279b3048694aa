"""Choose the lookup drafter's defaults by measurement (on Vicuna-bench, not on the reported MT-bench).

For each setting: beta, measured tokens/s, and the speedup the verification cost curve predicts
(tokens / sum of per-step forward costs, in units of a one-token forward), which is free of timing noise.

    python experiments/sweep_lookup.py --questions ../shared/data/vicuna_bench/question.jsonl --limit 8 \
        [--kernels auto|packed|plain] [--threads 1]

The defaults in docs/lookup.md were chosen with the stock (`plain`) linear layers, before packed kernels
made verification cheap; `--kernels auto` (the default, as in ctcspec bench) re-measures with today's.
"""

from __future__ import annotations

import argparse
import json

import torch

from ctcspec.backends import make_backend
from ctcspec.bench.questions import load_questions
from ctcspec.budget import verify_cost_curve
from ctcspec.cpu_kernels import KERNELS
from ctcspec.drafters import LookupDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.models import load_model
from ctcspec.prompts import encode_chat


class CountingLookup(LookupDrafter):
    """Records each step's tree size so the cost curve can price the run."""

    def reset(self) -> None:
        super().reset()
        self.sizes: list[int] = []

    def propose(self, request):
        tree = super().propose(request)
        self.sizes.append(len(tree) + 1)
        return tree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--kernels", default="auto", choices=KERNELS, help="base model linear kernels, as in ctcspec bench")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(kernels=args.kernels)
    print(f"kernels: {args.kernels}, threads: {args.threads}")
    curve = verify_cost_curve(make_backend(loaded.model), list(range(1, 33)), context=256, repeats=5)
    rel = {q: t / curve[1] for q, t in curve.items()}
    print("cost curve (relative to q=1):", {q: round(r, 2) for q, r in rel.items()})
    print("vanilla is 1.0 by construction; lookup's other settings at their defaults")
    prompts = [encode_chat(loaded.tokenizer, [{"role": "user", "content": q.turns[0]}])
               for q in load_questions(args.questions)[: args.limit]]
    grid = [(2, 0.0), (1, 0.7), (2, 0.7), (3, 0.7), (1, 1.0), (2, 1.0)]
    for min_ngram, threshold in grid:
        drafter = CountingLookup(min_ngram=min_ngram, min_expected_accept=threshold)
        engine = SpeculativeEngine(loaded.model, drafter)
        tokens = steps = 0
        cost = seconds = 0.0
        for prompt in prompts:
            result = engine.generate(prompt, args.max_new_tokens)
            tokens += result.stats.new_tokens
            steps += result.stats.steps
            seconds += result.stats.total_s
            cost += 1 + sum(rel[min(q, 32)] for q in drafter.sizes)  # prefill priced as one step
        print(json.dumps({"min_ngram": min_ngram, "min_expected_accept": threshold,
                          "beta": round(tokens / steps, 3), "predicted_speedup": round(tokens / cost, 3),
                          "tokens_per_s": round(tokens / seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
