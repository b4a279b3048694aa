"""Where the time of one base-model forward goes, per backend (docs/kernels.md, "Where the time goes").

    python experiments/forward_profile.py [--model smollm2-135m-instruct] [--threads 1] [--rounds 15] [--dtype float32]

Prints this machine's memory bandwidth (a 1 GiB fp32 reduction: the floor for reading the weights
once per forward) and the time of the model's linear layers alone on one row each, then, for a
one-token step and a 5-node verification over a 256-token context, the median milliseconds per
backend and kernel choice, and a torch-profiler breakdown of one such forward by kind of operator;
"outside operators" is wall time no operator accounts for (Python, module dispatch, tensor
bookkeeping). The packed and native kernels apply to float32 only; other dtypes run plain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ctcspec.backends import TORCH_BACKENDS
from ctcspec.cpu_kernels import install_kernels, kernels_problem
from ctcspec.models import DEFAULT_MODEL, load_model
from ctcspec.tree import TokenTree
from ctcspec.verify import prefill, verify_tree

GROUPS = {  # operator name fragments -> group, first match wins
    "linear": ("linear", "addmm", "aten::mm", "matmul", "int8pack"),
    "attention": ("scaled_dot_product", "flash_attention", "softmax", "bmm", "baddbmm"),
    "norm": ("pow", "mean", "rsqrt"),
    "rotary / elementwise": ("mul", "add", "neg", "cat", "silu", "sin", "cos", "sub", "div"),
    "cache copy": ("copy_", "index_select", "slice_scatter", "index"),
    "embedding / argmax": ("embedding", "argmax", "max"),
}


def memory_bandwidth_gbs(gib: float = 1.0, rounds: int = 5) -> float:
    """GB/s of a single fp32 reduction over `gib` GiB (reads each byte once)."""
    data = torch.ones(int(gib * (1 << 30)) // 4)
    data.sum()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def one_row_products_ms(model: torch.nn.Module, rounds: int) -> float:
    """Median ms of running every linear layer of `model` once on one row, in module order and on the stock
    kernel: what a one-token forward's products cost with nothing around them (the weights stream from memory)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {m.in_features: torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears}
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            start = time.perf_counter()
            for linear in linears:
                torch.nn.functional.linear(rows[linear.in_features], linear.weight, linear.bias)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one forward must read: every parameter once (tied embeddings counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS.items():
        if any(f in lowered for f in fragments):
            return group
    return "other operators"


def breakdown(backend, cache, root: int, tree: TokenTree, past_len: int) -> dict[str, float]:
    """Milliseconds per operator group of one verification forward (self CPU time), plus the rest of the wall time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        verify_tree(backend, cache, root, tree)
        wall = time.perf_counter() - start
    backend.keep(cache, past_len, [])
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("mkldnn::"):
            groups[group_of(event.key)] += event.self_cpu_time_total / 1000
    groups["outside operators"] = max(0.0, wall * 1000 - sum(groups.values()))
    return dict(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, kernels="plain", dtype=args.dtype).model
    bandwidth = memory_bandwidth_gbs()
    size = weight_bytes(model)
    print(f"{args.model}, {args.dtype}, {args.threads} thread(s); memory bandwidth {bandwidth:.1f} GB/s; "
          f"weights {size / 1e6:.0f} MB "
          f"-> floor {size / bandwidth / 1e6:.1f} ms per forward")
    products = one_row_products_ms(model, args.rounds)
    print(f"every linear layer once on one row, nothing else: {products:.1f} ms ({size / products / 1e6:.1f} GB/s)")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
    trees = {q: TokenTree.from_sequences([[int(t)] for t in torch.randperm(vocab, generator=gen)[:q - 1]])
             for q in (1, 5)}
    rows = {}
    for kernels in ("plain", *(k for k in ("packed", "native") if not kernels_problem(model, k))):
        install_kernels(model, kernels)
        backends = {name: TORCH_BACKENDS[name](model) for name in ("hf", "static")}
        caches = {}
        for name, backend in backends.items():
            caches[name] = backend.new_cache(args.context + 8)
            prefill(backend, caches[name], prompt[:-1])
        seconds = defaultdict(list)
        for _ in range(args.rounds + 1):  # interleaved; the first round warms up and is dropped
            for q, tree in trees.items():
                for name, backend in backends.items():
                    start = time.perf_counter()
                    verify_tree(backend, caches[name], prompt[-1], tree)
                    seconds[name, q].append(time.perf_counter() - start)
                    backend.keep(caches[name], args.context - 1, [])
        for name, backend in backends.items():
            for q, tree in trees.items():
                ms = statistics.median(seconds[name, q][1:]) * 1000
                rows[name, kernels, q] = (ms, breakdown(backend, caches[name], prompt[-1], tree, args.context - 1))
    order = [*GROUPS, "other operators", "outside operators"]
    groups = sorted({g for _, b in rows.values() for g in b}, key=order.index)
    print(f"\nmedian of {args.rounds} rounds; breakdown of one profiled forward (ms, the profiler adds overhead)")
    print("| backend | kernels | q | median ms | " + " | ".join(groups) + " |")
    print("|---|---|---|---|" + "---|" * len(groups))
    for (name, kernels, q), (ms, parts) in rows.items():
        print(f"| {name} | {kernels} | {q} | {ms:.1f} | " + " | ".join(f"{parts.get(g, 0):.1f}" for g in groups) + " |")


if __name__ == "__main__":
    main()
