"""The options several commands share (model, kernels, drafter, engine, decoding) and the argparse value types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from ctcspec.backends import BACKENDS
from ctcspec.bench.peers import (
    peer_names,
)
from ctcspec.cpu_kernels import KERNELS
from ctcspec.decoding import MIN_TEMPERATURE
from ctcspec.drafters import DRAFTERS
from ctcspec.errors import CtcspecError
from ctcspec.gguf import PRECISIONS
from ctcspec.models import DEFAULT_MODEL, parse_dtype
from ctcspec.search import TRANSFORMS


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def bounded_float(accepts: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a finite number that `accepts`, else a usage error saying it must be `expected`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    return parse


def seed_int(text: str) -> int:
    """An argparse type: a seed torch accepts, 0 <= seed < 2**63."""
    value = whole_number(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


SAMPLING_ONLY = {"top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p"}


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """How the base model chooses tokens: `model.generate` settings, read by generation_settings."""
    group = p.add_argument_group(
        "decoding", "greedy by default, with the processors of the model's generation_config (as "
                    "model.generate(do_sample=False)); --temperature T > 0 or --sample samples, with the distribution "
                    "of model.generate(do_sample=True)")
    group.add_argument("--temperature", default=None, metavar="T",
                       type=bounded_float(lambda v: v == 0 or v >= MIN_TEMPERATURE, f"0 or at least {MIN_TEMPERATURE}"),
                       help="0: greedy; above 0: sample at this temperature (overrides the generation_config's)")
    group.add_argument("--sample", action="store_true",
                       help="sample with the model's own generation_config settings (e.g. Qwen2.5-Instruct's "
                            "temperature 0.7, top_p 0.8, top_k 20); the flags here override them")
    group.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                       help="sampling: keep the K most likely tokens")
    group.add_argument("--top-p", type=bounded_float(lambda v: 0 < v <= 1, "in (0, 1]"), default=None, metavar="P",
                       help="sampling: keep the most likely tokens whose probabilities add up to P (nucleus)")
    group.add_argument("--min-p", type=bounded_float(lambda v: 0 <= v <= 1, "in [0, 1]"), default=None, metavar="P",
                       help="sampling: drop tokens less likely than P times the most likely one")
    group.add_argument("--repetition-penalty", type=bounded_float(lambda v: v > 0, "above 0"), default=None,
                       metavar="R", help="penalise tokens already in the sequence: their positive scores divided by "
                                         "R, negative ones multiplied (greedy or sampling; 1 = none)")
    group.add_argument("--seed", type=seed_int, default=None,
                       help="seed of the sampling draws (bench: default 0, each question turn seeded from it, the "
                            "same for every system; generate: default a fresh one, reported with the output)")


def generation_settings(args) -> dict:
    """The `model.generate` keyword arguments the decoding flags ask for; always says do_sample, so a model whose
    generation_config samples still decodes greedily unless asked. Sampling-only flags without sampling, and
    --sample with --temperature 0, are a CtcspecError."""
    sample = args.sample or bool(args.temperature)
    if args.sample and args.temperature == 0:
        raise CtcspecError("--sample with --temperature 0: choose one (--temperature 0 is greedy)")
    given = {key: getattr(args, key) for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
             if getattr(args, key) is not None}
    if not sample:
        unused = [flag for key, flag in SAMPLING_ONLY.items() if key in given]
        unused += ["--seed"] if args.seed is not None else []
        if unused:
            raise CtcspecError(f"{', '.join(unused)} only shape sampling: add --temperature T (above 0) or --sample")
        given.pop("temperature", None)
    return {"do_sample": sample, **given}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local Hugging Face model directory, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default; fastest on CPU), bfloat16, float16")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives the steadiest timings)")


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="base-model runtime: static = a lean Llama-family forward on a preallocated cache; hf = the "
                        "model's own transformers forward (any supported model); llama.cpp = a GGUF of the model in "
                        "llama.cpp, converted once (--gguf; needs `make peers`, docs/llama_cpp.md); auto (default) = "
                        "static where it applies")
    p.add_argument("--gguf", default="f32", choices=PRECISIONS,
                   help="weights of the GGUF that llama.cpp runs, converted from --model once (default: f32, as the "
                        "model); the llama.cpp backend takes f32 (f16 and q8_0 are not lossless there), "
                        "bench's llama.cpp peers any")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="fp32 CPU kernels of the linear layers: native = ctcspec's AVX-512 kernel, compiled here "
                        "(every row rounds as a one-row product); native-packed = native up to 4 rows, oneDNN-packed "
                        "beyond; packed = oneDNN-packed weights; mixed = stock for one row, packed for several; "
                        "plain = the HF model as it is; auto (default) = the fastest here, measured once and cached "
                        "(`ctcspec kernels` shows the choice)")


def add_drafter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter-path", type=Path, action="append", default=[],
                   help="a trained drafter directory; its kind (ctc, medusa, hydra, eagle) is read from its "
                        "config.json. Repeat for several kinds (default: the drafters shipped for the embedded "
                        "default model)")
    p.add_argument("--tree-budget", type=positive_int, default=None,
                   help="draft tree nodes per step for the trained drafters (default: each drafter's choice from "
                        "its acceptance curve and this machine's verification cost curve)")
    p.add_argument("--transform", default="beam", choices=TRANSFORMS,
                   help="CTC transform: prefix beam search (default), the paper's per-slot top-k paths, or none "
                        "(ablation: slot i read as depth i, a plain per-slot top-k tree)")
    p.add_argument("--adaptive-budget", action="store_true",
                   help="re-choose the trained drafters' tree budget during each generation from the acceptance "
                        "observed, drafting nothing while plain decoding would be faster")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model, its runtime and one drafter: what generate, serve and chat decode with."""
    add_model_args(p)
    add_kernel_args(p)
    p.add_argument("--drafter", default=None,
                   help=f"{' | '.join(DRAFTERS)} (default: ctc+lookup when a CTC drafter is given or ships for the "
                        "model, the fastest on both benchmarks here; else the kind of --drafter-path; else lookup)")
    add_drafter_args(p)


def budget_list(text: str) -> tuple[int, ...]:
    """--budgets: comma-separated tree budgets, each at least 1; sorted, duplicates dropped."""
    try:
        values = {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected tree budgets of at least 1, got {text!r}")
    return tuple(sorted(values))


def source_list(text: str) -> list[str]:
    """--sources: comma-separated prompt source names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated source names, got {text!r}")
    return names


def transform_list(text: str) -> list[str]:
    """--transforms: comma-separated CTC transforms, each one of TRANSFORMS."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown transform {', '.join(unknown) or text!r}; "
                                         f"choose from: {', '.join(TRANSFORMS)}")
    return names


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def dtype_name(text: str) -> str:
    """--dtype as torch names it (float32, bfloat16, float16), the names vLLM takes."""
    return str(parse_dtype(text)).removeprefix("torch.")


def peer_list(text: str) -> list[str]:
    """--peers: comma-separated names from PEERS (bench/peers.py: peer_names)."""
    try:
        return peer_names([t.strip() for t in text.split(",") if t.strip()])
    except CtcspecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
