"""Verification cost curves side by side: the median time of one base forward over q tree nodes (root included)
after a 256-token context, for the torch backend (static; every kernel choice) and the llama.cpp backend
(the GGUF precisions it takes: F32), as the tree budget reads them (budget.verify_cost_curve). docs/kernels.md
quotes its output.

    python experiments/cost_curves.py [--threads 1] [--repeats 7]

Needs `make peers` for the llama.cpp rows. Run it on an idle machine: every row shares the CPU with nothing else.
"""

from __future__ import annotations

import argparse

import torch

from ctcspec.backends import make_backend
from ctcspec.backends.llamacpp import LOSSLESS_PRECISIONS
from ctcspec.budget import verify_cost_curve
from ctcspec.gguf import gguf_for
from ctcspec.models import DEFAULT_MODEL, load_model

SIZES = [1, 2, 3, 4, 6, 8, 12, 16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for kernels in ("native", "native-packed", "mixed", "packed", "plain"):
        loaded = load_model(args.model, kernels=kernels)
        rows[f"torch static, {kernels} kernels"] = verify_cost_curve(make_backend(loaded.model, "static"), SIZES,
                                                                     repeats=args.repeats)
    for precision in LOSSLESS_PRECISIONS:
        backend = make_backend(loaded.model, "llama.cpp", gguf_for(loaded.path, precision), loaded.tokenizer)
        rows[f"llama.cpp {precision.upper()}"] = verify_cost_curve(backend, SIZES, repeats=args.repeats)
    print("| backend | " + " | ".join(f"q={q}" for q in SIZES) + " | q=4 / q=1 |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for name, curve in rows.items():
        cells = " | ".join(f"{1000 * curve[q]:.1f}" for q in SIZES)
        print(f"| {name} | {cells} | {curve[4] / curve[1]:.2f}x |")
    print(f"(ms per forward, median of {args.repeats}; {args.threads} thread(s))")


if __name__ == "__main__":
    main()
