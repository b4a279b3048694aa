"""Verification cost curve with stock and with oneDNN-packed linear layers, side by side (docs/kernels.md).

    python experiments/linear_kernels.py [--model smollm2-135m-instruct] [--threads 1] [--rounds 7]

Prints, per tree size q (root included), the median milliseconds of one verification forward over
a 256-token context, with the HF model as loaded ("plain") and after `install_kernels(model, "packed")`
("packed"); the same model object, measured interleaved so machine drift hits both alike. Then one
of the model's MLP products (hidden -> intermediate) alone, per row count, plain and packed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from ctcspec.backends import HFBackend
from ctcspec.cpu_kernels import PackedLinear, install_kernels, plain_layer, plain_linear_layers
from ctcspec.models import DEFAULT_MODEL, load_model
from ctcspec.tree import TokenTree
from ctcspec.verify import prefill, verify_tree

SIZES = (1, 2, 3, 5, 9, 17, 33, 65)
PRODUCT_ROWS = (1, 2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, kernels="plain").model
    install_kernels(model, "packed")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
    backend = HFBackend(model)
    cache = backend.new_cache(args.context + max(SIZES))
    prefill(backend, cache, prompt[:-1])
    seconds = {(kernels, q): [] for kernels in ("plain", "packed") for q in SIZES}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for q in SIZES:
            tree = TokenTree.from_sequences([[int(t)] for t in torch.randperm(vocab, generator=gen)[:q - 1]])
            for kernels in ("plain", "packed"):
                with plain_linear_layers(model) if kernels == "plain" else nullcontext():
                    start = time.perf_counter()
                    verify_tree(backend, cache, prompt[-1], tree)
                    seconds[kernels, q].append(time.perf_counter() - start)
                backend.keep(cache, args.context - 1, [])
    median = {key: statistics.median(ts[1:]) * 1000 for key, ts in seconds.items()}
    print(f"{args.model}, {args.threads} thread(s), context {args.context}, median of {args.rounds} rounds")
    print("| q (nodes incl. root) | plain ms | plain x q=1 | packed ms | packed x plain q=1 | plain / packed |")
    print("|---|---|---|---|---|---|")
    for q in SIZES:
        p, k, one = median["plain", q], median["packed", q], median["plain", 1]
        print(f"| {q} | {p:.1f} | {p / one:.2f} | {k:.1f} | {k / one:.2f} | {p / k:.2f}x |")
    product_table(model, args.rounds)


def product_table(model: torch.nn.Module, rounds: int, calls: int = 200) -> None:
    """One linear layer alone (in cache, no model around it): microseconds per call by row count."""
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear) and m.out_features > m.in_features)
    plain = plain_layer(layer.weight, layer.bias)
    times = {(kind, rows): [] for kind in ("plain", "packed") for rows in PRODUCT_ROWS}
    for _ in range(rounds):
        for rows in PRODUCT_ROWS:
            x = torch.randn(1, rows, layer.in_features)
            for kind, fn in (("plain", plain), ("packed", layer)):
                with torch.inference_mode():
                    fn(x)
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn(x)
                times[kind, rows].append((time.perf_counter() - start) / calls * 1e6)
    print(f"\none {layer.out_features}x{layer.in_features} product, us per call (median of {rounds} x {calls})")
    print("| rows | plain us | packed us |")
    print("|---|---|---|")
    for rows in PRODUCT_ROWS:
        print(f"| {rows} | {statistics.median(times['plain', rows]):.0f} | "
              f"{statistics.median(times['packed', rows]):.0f} |")


if __name__ == "__main__":
    main()
