"""Choosing the linear-layer kernels by measurement, on the machine that runs (`--kernels auto`).

Which kernel is fastest depends on the CPU: on the Intel Xeon kind of this project's machines the stock
one-row product ran close to the memory bandwidth, on the AMD EPYC kind at about half of it, and the order
of `mixed` and `packed` flipped from one process to the next (docs/kernels.md). So `auto` measures:

    choice = choose_kernels(model)   # measured once per machine and model shape, then read from the cache

times the model's own linear layers (all of them, in module order, with nothing around them: a forward's
products, the only part that differs between kernels) on every kernel that can run here, at q = 1, 4, 8
and 16 rows (a one-token step and the trees the default drafter verifies). Kernels are timed in interleaved
rounds, so drift of the machine spreads over all of them, and each figure is a median. `mixed` and
`native-packed` are not timed apart: each is one kernel up to a row count and another beyond. The kernel
with the smallest sum over the row counts is taken.

The choice and its timings are cached under $CTCSPEC_HOME/kernels, keyed by what decides them: the CPU model
and flags, the thread count, the torch version, the layers' shapes and dtype, and the native kernel's source.
`ctcspec kernels` prints it and can measure again; `--kernels NAME` forces one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ctcspec.cpu_kernels import KERNELS, install_kernels, kernel_layer, kernels_problem
from ctcspec.home import ctcspec_home, write_cache_json
from ctcspec.native_linear import NATIVE_ROWS, cpu_description, native_problem, source_digest

log = logging.getLogger(__name__)

CHOICE_ROWS = (1, 4, 8, 16)  # a one-token step and the trees the default drafter verifies
TIMED_KERNELS = ("native", "packed", "plain")  # the others combine them: see COMBINED_KERNELS
COMBINED_KERNELS = {"mixed": ("plain", 1, "packed"), "native-packed": ("native", NATIVE_ROWS, "packed")}
# name: (kernel up to n rows, n, kernel beyond)


@dataclass(frozen=True)
class KernelChoice:
    """The kernels `auto` takes on this machine and what the choice rests on: median ms of the model's linear
    layers per kernel and row count (those that could not run here: their reason instead)."""
    kernels: str
    milliseconds: dict[str, dict[int, float]]
    unavailable: dict[str, str]
    cpu: str
    threads: int

    def describe(self) -> str:
        """One line: the choice, and the timings it was made from."""
        if not self.milliseconds:
            return f"kernels {self.kernels}: no other kernel runs this model (they take fp32 models on the CPU)"
        rows = "/".join(str(q) for q in CHOICE_ROWS)
        timings = "; ".join(f"{name} " + "/".join(f"{self.milliseconds[name][q]:.1f}" for q in CHOICE_ROWS)
                            for name in sorted(self.milliseconds, key=lambda n: _score(self.milliseconds[n])))
        skipped = "".join(f"; {name} unavailable ({why})" for name, why in self.unavailable.items())
        return (f"kernels {self.kernels}, measured on {self.cpu} with {self.threads} thread(s): linear layers' ms at "
                f"{rows} rows: {timings}{skipped}")


def _score(milliseconds: dict[int, float]) -> float:
    return sum(milliseconds[q] for q in CHOICE_ROWS)


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def choice_cache_path(model: nn.Module) -> Path:
    shapes = [(m.out_features, m.in_features, m.bias is not None) for m in _linear_layers(model)]
    key = json.dumps({"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "dtype": str(next(model.parameters()).dtype), "shapes": shapes, "rows": CHOICE_ROWS,
                      "timed": TIMED_KERNELS, "combined": COMBINED_KERNELS, "native_source": source_digest(),
                      "native_problem": native_problem()}, sort_keys=True)
    return ctcspec_home() / "kernels" / f"choice-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@torch.inference_mode()
def time_kernels(model: nn.Module, kernels: list[str], rounds: int = 7, seed: int = 0) -> dict[str, dict[int, float]]:
    """Median ms of running every linear layer of `model` once on q rows, per kernel and q in CHOICE_ROWS,
    kernels interleaved round by round (the first round warms up and is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    layers = {name: [kernel_layer(m.weight, m.bias, name) for m in _linear_layers(model)] for name in kernels}
    inputs = {q: {width: torch.randn(q, width, generator=gen) for width in {m.in_features for m in layers[kernels[0]]}}
              for q in CHOICE_ROWS}
    seconds: dict[tuple[str, int], list[float]] = {(name, q): [] for name in kernels for q in CHOICE_ROWS}
    for _ in range(rounds + 1):
        for q in CHOICE_ROWS:
            for name in kernels:
                start = time.perf_counter()
                for layer in layers[name]:
                    layer(inputs[q][layer.in_features])
                seconds[name, q].append(time.perf_counter() - start)
    return {name: {q: 1e3 * statistics.median(seconds[name, q][1:]) for q in CHOICE_ROWS} for name in kernels}


def measure_kernel_choice(model: nn.Module) -> KernelChoice:
    """Time every kernel that can run `model` here and take the fastest (the module docstring)."""
    unavailable = {name: problem for name in TIMED_KERNELS if name != "plain"
                   if (problem := kernels_problem(model, name))}
    timed = [name for name in TIMED_KERNELS if name not in unavailable]
    milliseconds = time_kernels(model, timed)
    for name, (few, rows, many) in COMBINED_KERNELS.items():
        if few in milliseconds and many in milliseconds:
            milliseconds[name] = {q: milliseconds[few if q <= rows else many][q] for q in CHOICE_ROWS}
    best = min(milliseconds, key=lambda name: _score(milliseconds[name]))
    return KernelChoice(best, milliseconds, unavailable, cpu_description()["model"], torch.get_num_threads())


def choose_kernels(model: nn.Module, remeasure: bool = False) -> KernelChoice:
    """`measure_kernel_choice` once per machine and model shape, then the cached choice. Models that no kernel
    but the stock one can run (not fp32 on the CPU) get `plain` without measuring."""
    if kernels_problem(model, "packed") and kernels_problem(model, "native"):
        return KernelChoice("plain", {}, {}, cpu_description()["model"], torch.get_num_threads())
    path = choice_cache_path(model)
    if not remeasure:
        try:
            saved = json.loads(path.read_text())
            saved["milliseconds"] = {k: {int(q): v for q, v in ms.items()} for k, ms in saved["milliseconds"].items()}
            choice = KernelChoice(**saved)
            if choice.kernels == "plain" or not kernels_problem(model, choice.kernels):
                return choice  # else what it chose no longer runs here: measure again
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
    log.debug("measuring this machine's linear-layer kernels once (a few seconds)")
    choice = measure_kernel_choice(model)
    write_cache_json(path, asdict(choice))
    return choice


def apply_kernels(model: nn.Module, kernels: str) -> str:
    """Apply the `--kernels` choice to a freshly loaded model; returns what it runs with. `auto` takes this
    machine's measured choice (logged at debug level with its timings; `ctcspec kernels` prints it)."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        choice = choose_kernels(model)
        kernels = choice.kernels
        log.debug("%s", choice.describe())
    install_kernels(model, kernels)
    return kernels
