"""Whole base-model forwards per linear-layer kernel, interleaved in one process (docs/kernels.md).

    python experiments/kernel_forwards.py [--threads 1] [--rounds 7]

The cost curves (experiments/cost_curves.py) measure one kernel after another, each in its own state of the
machine, and kernel_choice.py times the linear layers alone; this times a verification forward over q tree nodes
after a 256-token context on the static backend, with the same model's layers switched between kernels round by
round, so the kernels share the machine's state. Medians in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ctcspec.backends import make_backend
from ctcspec.cpu_kernels import kernel_layer, kernels_problem
from ctcspec.models import DEFAULT_MODEL, load_model
from ctcspec.tree import TokenTree
from ctcspec.verify import prefill, verify_tree

SIZES = [1, 2, 3, 4, 6, 8, 16]
KERNELS = ("native", "packed", "plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, kernels="plain").model
    kernels = [k for k in KERNELS if k == "plain" or not kernels_problem(model, k)]
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    layers = {k: [child if k == "plain" else kernel_layer(child.weight, child.bias, k) for _, _, child in slots]
              for k in kernels}  # built once: switching kernels only swaps modules
    backend = make_backend(model, "static")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
    cache = backend.new_cache(args.context + max(SIZES))
    prefill(backend, cache, prompt[:-1])
    trees = {q: TokenTree.from_sequences([[int(t)] for t in torch.randperm(vocab, generator=gen)[:q - 1]])
             for q in SIZES}
    seconds = {(k, q): [] for k in kernels for q in SIZES}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for q in SIZES:
            for name in kernels:
                for (parent, attribute, _), layer in zip(slots, layers[name], strict=True):
                    setattr(parent, attribute, layer)
                start = time.perf_counter()
                verify_tree(backend, cache, prompt[-1], trees[q])
                seconds[name, q].append(time.perf_counter() - start)
                backend.keep(cache, args.context - 1, [])
    print(f"{args.model}, {args.threads} thread(s), context {args.context}, median of {args.rounds} rounds (ms)")
    print("| kernels | " + " | ".join(f"q={q}" for q in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for name in kernels:
        cells = " | ".join(f"{1000 * statistics.median(seconds[name, q][1:]):.1f}" for q in SIZES)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
