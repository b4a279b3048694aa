"""ctcspec info, export-vllm and kernels: what a saved drafter holds, the drafter for vLLM, the kernel choice."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict
from pathlib import Path

from ctcspec.cli.args import add_model_args
from ctcspec.cli.common import load_from_args
from ctcspec.kernel_choice import choose_kernels
from ctcspec.modules.files import describe_drafter, read_vocab_ids
from ctcspec.training.compare import (
    vocabulary_coverage,
)
from ctcspec.vllm_drafter import check_vllm_drafter, export_vllm_drafter


def add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="what a saved drafter holds",
                          description="Print a saved drafter's kind, module config, size, base model, training "
                                      "summary and held-out acceptance curves. Reads config.json and the weights' "
                                      "header only: no model is loaded.")
    info.add_argument("path", type=Path, help="a drafter directory (config.json + model.safetensors)")
    info.add_argument("--data", type=Path, nargs="+", default=[], metavar="DIR",
                      help="also summarise these distilled data directories and how much of their answer tokens "
                           "(train and held-out split, as training makes them) the draft vocabulary covers")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_export_vllm_parser(sub) -> None:
    export = sub.add_parser("export-vllm", help="a CTC drafter as a draft model that vLLM runs",
                            description="Write a CTC drafter (trained with --slot-attention causal) as a vLLM draft "
                                        "model directory and print the `vllm serve` command that runs it: vLLM's "
                                        "EAGLE proposer in parallel-drafting mode, through ctcspec's vLLM plugin "
                                        "(installed into vLLM's environment by `make vllm`; docs/vllm.md).")
    add_model_args(export)
    export.add_argument("drafter", type=Path, help="a CTC drafter directory, trained for --model")
    export.add_argument("--out", type=Path, required=True, help="the directory to write (config.json + weights)")


def add_kernels_parser(sub) -> None:
    kernels = sub.add_parser("kernels", help="which linear-layer kernels --kernels auto takes here, and why",
                             description="Print the kernels --kernels auto takes on this machine for --model and "
                                         "--threads, with the timings the choice rests on (measured once and cached "
                                         "under $CTCSPEC_HOME/kernels; --remeasure measures again).")
    add_model_args(kernels)
    kernels.add_argument("--remeasure", action="store_true", help="measure again and replace the cached choice")
    kernels.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _count(value) -> str:
    """A whole number with thousands separators; anything else as it is."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_training(training: dict) -> str:
    """A saved drafter's training summary on one line (the keys present)."""
    parts = [f"{_count(training[key])} {what}" for key, what in (("steps", "steps"), ("train_samples", "sequences"),
                                                                 ("train_tokens", "tokens")) if key in training]
    if "train_seconds" in training:
        parts.append(f"{training['train_seconds']} s" + (f" on {training['device']}" if "device" in training else ""))
    if "heldout_samples" in training:
        parts.append(f"{_count(training['heldout_samples'])} held out")
    return ", ".join(parts)


def format_curves(curves: dict[str, dict[int, float]]) -> str:
    """Acceptance curves as a markdown table: one row per tree budget, one column per search mode."""
    budgets = sorted({b for curve in curves.values() for b in curve})
    lines = ["| tree budget | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(f"{c[b]:.2f}" if b in c else "-" for c in curves.values()) + " |")
    return "\n".join(lines)


def format_drafter_info(info: dict) -> str:
    """`ctcspec info`'s text: what the drafter is, its size, base model and training, then its curves."""
    base = info["base"]
    lines = [f"{info['path']}: {info['kind']} drafter",
             "module: " + ", ".join(f"{k} {v}" for k, v in info["draft"].items() if k != "kind"),
             f"trained parameters: {_count(info['parameters'])} ({'/'.join(info['weights_dtype']).lower()}); "
             f"draft vocabulary: {_count(info['draft_vocab_size'])} tokens; on disk: {info['size_bytes'] / 1e6:.1f} MB",
             f"base model: {base.get('architecture')} ({base.get('model_type')}), "
             f"hidden size {base.get('hidden_size')}, vocabulary {_count(base.get('vocab_size'))}, "
             f"LM head sha256 {base.get('lm_head_sha256')}"]
    if info["training"]:
        lines.append("training: " + (format_training(info["training"]) or "no summary"))
    if info["training"].get("data"):
        lines.append("training data: " + ", ".join(map(str, info["training"]["data"])))
    if info["acceptance_curve"]:
        lines += ["held-out acceptance (mean accepted draft tokens per step):", format_curves(info["acceptance_curve"])]
    else:
        lines.append("held-out acceptance: none saved (the tree budget falls back to the drafter's default)")
    return "\n".join(lines)


def format_coverage(data: dict) -> str:
    """`ctcspec info --data`'s lines: the distilled data, and the draft vocabulary's share of its answers."""
    lines = [f"distilled data (--data): {data['prompts']:,} distinct prompts, {data['tokens']:,} tokens "
             f"({data['answer_tokens']:,} answer tokens)"]
    for name, what in (("train", "train"), ("heldout", "held-out")):
        lines.append(f"{what}: {data[name]['answers']:,} answers; the draft vocabulary covers "
                     f"{data[name]['covered']:.1%} of their tokens")
    return "\n".join(lines)


def cmd_info(args) -> int:
    info = describe_drafter(args.path)
    if args.data:
        info["data_coverage"] = vocabulary_coverage(read_vocab_ids(args.path), args.data)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_drafter_info(info))
        if args.data:
            print(format_coverage(info["data_coverage"]))
    return 0


def cmd_export_vllm(args) -> int:
    check_vllm_drafter(args.drafter)  # before the model loads
    loaded = load_from_args(args)
    speculative = export_vllm_drafter(args.drafter, loaded.model, args.out)
    print(f"vllm serve {shlex.quote(str(loaded.path))} --speculative-config {shlex.quote(json.dumps(speculative))}")
    return 0


def cmd_kernels(args) -> int:
    loaded = load_from_args(argparse.Namespace(**{**vars(args), "kernels": "plain"}))
    choice = choose_kernels(loaded.model, remeasure=args.remeasure)
    print(json.dumps(asdict(choice), indent=2) if args.json else choice.describe())
    return 0
