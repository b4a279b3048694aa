"""The `ctcspec` command line: generate, bench, report, distill, train.

Every user error (a bad flag value, an unreadable or malformed file, a model or drafter that cannot be
used) ends in one line on stderr and exit code 2; library code raises `CtcspecError` and never prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from ctcspec import __version__
from ctcspec.bench.questions import load_questions, resolve_bench, select_questions
from ctcspec.bench.report import write_outputs
from ctcspec.bench.run import run_bench
from ctcspec.bench.summary import format_category_table, format_table, read_report
from ctcspec.budget import AdaptiveBudget, budget_plan, choose_tree_budget
from ctcspec.cpu_kernels import KERNELS, linear_kernels_of
from ctcspec.drafters import DRAFTERS, MODULE_KIND, Drafter, check_drafter_name, make_drafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError, read_text_file
from ctcspec.models import DEFAULT_MODEL, LoadedModel, load_model
from ctcspec.modules import KINDS
from ctcspec.modules.files import drafter_kind, shipped_drafter_dir
from ctcspec.prompts import encode, require_prompt
from ctcspec.search import TRANSFORMS
from ctcspec.training.distill import distill, read_prompt_file, self_instruct, templated_prompts
from ctcspec.training.train import TrainConfig, summary_json, train


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local Hugging Face model directory, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default; fastest on CPU), bfloat16, float16")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives the steadiest timings)")


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="linear-layer kernels of the base model: packed = oneDNN-packed fp32 weights, much faster "
                        "for the few-row forwards of tree verification on CPU; plain = the HF model as it is; "
                        "auto (default) = packed on CPU in fp32")


def _add_drafter_args(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctcspec", description="Lossless speculative decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"ctcspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one prompt, streaming, with statistics",
                         description="Generate greedily from one prompt; output equals plain greedy decoding.")
    _add_model_args(gen)
    _add_kernel_args(gen)
    gen.add_argument("--drafter", default=None,
                     help=f"{' | '.join(DRAFTERS)} (default: ctc+lookup when a CTC drafter is given or ships for "
                          "the model, the fastest on both benchmarks here; else the kind of --drafter-path; else "
                          "lookup)")
    _add_drafter_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    bench = sub.add_parser("bench", help="benchmark drafters side by side against vanilla and HF generate",
                           description="Run each drafter and HF generate on the same questions (FastChat jsonl, "
                                       "both turns; or GSM8K jsonl) and print beta, tokens/s and speedups.")
    _add_model_args(bench)
    _add_kernel_args(bench)
    bench.add_argument("--bench", "--questions", dest="questions", default="builtin",
                       help="mt_bench | vicuna_bench | gsm8k (its test split, read from --data-dir) | a question "
                            "jsonl (FastChat or GSM8K format) | builtin: the demo set (default)")
    bench.add_argument("--data-dir", default=None,
                       help="where the named benchmarks live (default: $CTCSPEC_DATA, else ../shared/data)")
    bench.add_argument("--drafters", default=None,
                       help=f"comma-separated, from: {', '.join(DRAFTERS)} (default: vanilla, lookup, every "
                            "trained drafter available for the model, and ctc+lookup when a CTC drafter is)")
    bench.add_argument("--limit", type=positive_int, default=None, help="use only the first N questions")
    bench.add_argument("--per-category", type=positive_int, default=None,
                       help="use only the first N questions of each category (applied before --limit)")
    _add_drafter_args(bench)
    bench.add_argument("--max-new-tokens", type=positive_int, default=256)
    bench.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"),
                       help="output directory: report.md, report.json, plot.png, answers/<drafter>.jsonl "
                            "(default: runs/bench)")

    distill = sub.add_parser("distill", help="self-distillation: the base model answers training prompts",
                             description="Answer training prompts greedily with the base model and store the token "
                                         "ids (resumable). Evaluation sets are refused.")
    _add_model_args(distill)
    distill.add_argument("--prompts", nargs="*", type=Path, default=[],
                         help="prompt files: FastChat question jsonl, GSM8K jsonl, or plain text (one per line)")
    distill.add_argument("--self-instruct", type=int, default=0,
                         help="also ask the base model to write this many diverse user requests and answer them")
    distill.add_argument("--templated", action="store_true",
                         help="also answer the built-in topic x task request templates (6360 prompts)")
    distill.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each file")
    distill.add_argument("--max-new-tokens", type=int, default=256)
    distill.add_argument("--batch-size", type=int, default=16)
    distill.add_argument("--out", type=Path, required=True, help="data directory (created; resumes if it exists)")

    train = sub.add_parser("train", help="train a drafter (CTC, or a Medusa/Hydra/EAGLE baseline) on distilled data",
                           description="Train the attention draft module with CTC loss against the base model's "
                                       "own next tokens (--kind ctc), or a baseline (--kind medusa|hydra|eagle) on "
                                       "the same data; checkpoints periodically; --resume continues.")
    _add_model_args(train)
    train.add_argument("--data", type=Path, nargs="+", required=True, help="directories written by ctcspec distill")
    train.add_argument("--out", type=Path, required=True, help="drafter directory to write")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    defaults = TrainConfig()
    for name, kind in (("kind", str), ("num_slots", int), ("target_tokens", int), ("intermediate_size", int),
                       ("slot_attention", str), ("loss", str), ("draft_vocab", int), ("max_train_samples", int),
                       ("hidden_cache", str), ("steps", int), ("epochs", float), ("batch_size", int),
                       ("anchors_per_sequence", int), ("max_length", int), ("lr", float), ("eval_every", int),
                       ("final_eval_samples", int),
                       ("checkpoint_every", int), ("seed", int), ("time_limit_s", float)):
        train.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                           help=f"(default: {getattr(defaults, name)})")

    report = sub.add_parser("report", help="print the tables of a saved bench report",
                            description="Print the summary and per-category tables of a JSON report written by bench.")
    report.add_argument("path", type=Path, help="a directory (or its report.json) written by ctcspec bench --out")
    return parser


def check_device(name: str) -> str:
    """The --device value, if torch knows it and this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CtcspecError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise CtcspecError(f"--device {name}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CtcspecError("--device mps: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CtcspecError(f"--device {name}: only cpu, cuda and mps are supported")
    return name


def _load(args) -> LoadedModel:
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device, dtype=args.dtype, kernels=getattr(args, "kernels", "plain"))


def _read_prompt(args) -> str:
    return args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "prompt file")


class _Streamer:
    """Prints newly accepted text; holds back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)


def drafter_dirs(args) -> dict[str, Path]:
    """Trained drafter directories by kind: each --drafter-path (its kind read from its config.json), then
    the drafters shipped for the embedded default model for the kinds not given."""
    dirs: dict[str, Path] = {}
    for path in args.drafter_path:
        kind = drafter_kind(path)
        if kind in dirs:
            raise CtcspecError(f"--drafter-path: two {kind} drafters given ({dirs[kind]} and {path})")
        dirs[kind] = path
    for kind in KINDS:
        shipped = shipped_drafter_dir(args.model, kind) if args.model == DEFAULT_MODEL else None
        if kind not in dirs and shipped is not None:
            dirs[kind] = shipped
    return dirs


def build_drafter(name: str, args, model, dirs: dict[str, Path]) -> Drafter:
    """The named drafter with its tree budget settled: --tree-budget, else chosen for this machine (the
    budget step), and wrapped in an adaptive budget with --adaptive-budget."""
    kind = MODULE_KIND.get(name)
    if kind is not None and kind not in dirs:
        raise CtcspecError(f"the {name} drafter needs a trained {kind} drafter: pass --drafter-path DIR "
                           f"(train one with ctcspec distill + ctcspec train --kind {kind})")
    drafter = make_drafter(name, model, dirs.get(kind), transform=args.transform)
    if kind is None:
        return drafter
    if args.tree_budget is not None:
        drafter.tree_budget = args.tree_budget
    else:
        drafter.tree_budget = choose_tree_budget(drafter, model)
    if args.adaptive_budget:
        plan = budget_plan(drafter, model)
        if plan is None:
            raise CtcspecError(f"--adaptive-budget needs a {name} drafter whose config.json holds acceptance curves")
        drafter = AdaptiveBudget(drafter, plan)
    return drafter


def default_drafter(args, dirs: dict[str, Path]) -> str:
    """generate's default: ctc+lookup with a CTC drafter (the fastest on both benchmarks here, README
    Results), else the kind of the first --drafter-path, else lookup."""
    if "ctc" in dirs:
        return "ctc+lookup"
    return drafter_kind(args.drafter_path[0]) if args.drafter_path else "lookup"


def cmd_generate(args) -> int:
    text = require_prompt(_read_prompt(args))  # before the model loads: fail fast
    dirs = drafter_dirs(args)
    name = check_drafter_name(args.drafter or default_drafter(args, dirs))
    loaded = _load(args)
    drafter = build_drafter(name, args, loaded.model, dirs)
    prompt_ids = encode(loaded.tokenizer, text, chat=args.chat)
    engine = SpeculativeEngine(loaded.model, drafter)
    streamer = None if args.json else _Streamer(loaded.tokenizer)
    result = engine.generate(prompt_ids, args.max_new_tokens, on_tokens=streamer)
    stats = result.stats
    if args.json:
        print(json.dumps({"prompt": text, "model": str(loaded.path), "drafter": name,
                          "settings": drafter.settings(),
                          "output": loaded.tokenizer.decode(result.tokens, skip_special_tokens=True),
                          "output_ids": result.tokens, "stats": stats.to_dict()}))
    else:
        print(file=sys.stdout)
        print(f"[{name}] {stats.new_tokens} tokens in {stats.steps} steps (beta {stats.beta:.2f}), "
              f"{stats.tokens_per_s:.1f} tok/s; time: draft {stats.draft_s:.2f}s, verify {stats.verify_s:.2f}s, "
              f"bookkeeping {stats.bookkeeping_s:.2f}s, prefill {stats.prefill_s:.2f}s; stop: {stats.stop_reason}",
              file=sys.stderr)
    return 0


def bench_drafter_names(args, dirs: dict[str, Path]) -> list[str]:
    """--drafters, checked, with vanilla first (the reference every speedup is measured against); by default
    vanilla, lookup, every trained drafter available and ctc+lookup when a CTC drafter is."""
    if args.drafters is None:
        names = ["vanilla", "lookup", *(k for k in KINDS if k in dirs), *(["ctc+lookup"] if "ctc" in dirs else [])]
    else:
        names = [check_drafter_name(d.strip()) for d in args.drafters.split(",") if d.strip()]
    return names if "vanilla" in names else ["vanilla", *names]


def cmd_bench(args) -> int:
    dirs = drafter_dirs(args)
    names = bench_drafter_names(args, dirs)  # before loading anything
    bench_name = args.questions
    args.questions = resolve_bench(args.questions, args.data_dir)
    questions = select_questions(load_questions(args.questions), args.per_category, args.limit)
    loaded = _load(args)
    drafters = {name: build_drafter(name, args, loaded.model, dirs) for name in names}
    report = run_bench(loaded.model, loaded.tokenizer, questions, drafters, args.max_new_tokens,
                       include_hf=not args.no_hf)
    meta = {"model": str(loaded.path), "bench": bench_name, "questions": str(args.questions),
            "n_questions": len(questions), "command": "ctcspec " + " ".join(sys.argv[1:]),
            "max_new_tokens": args.max_new_tokens, "threads": args.threads, "device": args.device,
            "dtype": args.dtype, "kernels": linear_kernels_of(loaded.model), "cpu_count": os.cpu_count(),
            "per_category": args.per_category,
            "drafter_settings": {n: d.settings() for n, d in drafters.items()}}
    paths = write_outputs(report, meta, args.out)
    print(format_table(report))
    print()
    print(format_category_table(report))
    print(f"report: {paths['markdown']} (and report.json, plot.png, answers/)", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    if not args.prompts and args.self_instruct <= 0 and not args.templated:
        raise CtcspecError("give --prompts FILE [FILE ...], --templated and/or --self-instruct N")
    prompts = []
    for path in args.prompts:
        prompts += read_prompt_file(path)[: args.limit]
    if args.templated:
        prompts += templated_prompts()[: args.limit]
    loaded = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.self_instruct > 0:
        prompts += self_instruct(loaded.model, loaded.tokenizer, args.self_instruct, args.out,
                                 batch_size=max(args.batch_size, 8))
    path = distill(loaded.model, loaded.tokenizer, prompts, args.out, args.max_new_tokens, args.batch_size)
    print(f"distilled {len(prompts)} prompts into {path}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    if config.kind not in KINDS:
        raise CtcspecError(f"unknown --kind {config.kind!r}; choose from: {', '.join(KINDS)}")
    if args.out.exists() and not args.resume and (args.out / "checkpoint.pt").exists():
        raise CtcspecError(f"{str(args.out)!r} already holds a training checkpoint: pass --resume to continue it, "
                           "or choose a new --out")
    loaded = _load(args)
    summary = train(loaded.model, args.data, args.out, config, resume=args.resume)
    if summary:
        print(summary_json(summary))
    return 0


def cmd_report(args) -> int:
    try:
        report = read_report(args.path)
        meta = report["meta"]
        tables = format_table(report), format_category_table(report)
    except OSError as exc:
        raise CtcspecError(f"cannot read report {str(args.path)!r}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CtcspecError(f"{str(args.path)!r} is not a ctcspec bench report ({exc!r})") from None
    print(f"{meta['questions']}: {meta['n_questions']} questions, {meta['max_new_tokens']} new tokens, "
          f"model {meta['model']}, threads {meta['threads']}")
    print(tables[0])
    print()
    print(tables[1])
    return 0


COMMANDS = {"generate": cmd_generate, "bench": cmd_bench, "distill": cmd_distill, "train": cmd_train,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for every user error, usage errors included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="ctcspec: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except CtcspecError as exc:
        print(f"ctcspec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctcspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
