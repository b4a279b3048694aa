"""The `ctcspec` command line: generate and bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ctcspec import __version__
from ctcspec.draft_heads import HEAD_KINDS
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL
from ctcspec.prompts import require_prompt
from ctcspec.train import TrainConfig

TRAINABLE = ("ctc", *HEAD_KINDS)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local Hugging Face model directory, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default; fastest on CPU), bfloat16, float16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives the steadiest timings)")


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    from ctcspec.cpu_kernels import KERNELS

    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="linear-layer kernels of the base model: packed = oneDNN-packed fp32 weights, much faster "
                        "for the few-row forwards of tree verification on CPU; plain = the HF model as it is; "
                        "auto (default) = packed on CPU in fp32")


def _add_ctc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter-path", type=Path, default=None,
                   help="trained drafter directory (default: the one shipped for the embedded default model)")
    for kind in ("medusa", "hydra", "eagle"):
        p.add_argument(f"--{kind}-path", type=Path, default=None,
                       help=f"trained {kind} drafter directory (default: the one shipped for the default model)")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="draft tree nodes per step for the trained drafters (default: each drafter's choice from "
                        "its acceptance curve and this machine's verification cost curve)")
    p.add_argument("--transform", default="beam", choices=["beam", "topk", "none"],
                   help="CTC transform: prefix beam search (default), the paper's per-slot top-k paths, or none "
                        "(ablation: slot i read as depth i, a plain per-slot top-k tree)")
    p.add_argument("--adaptive-budget", action="store_true",
                   help="re-choose the CTC tree budget during each generation from the acceptance observed, "
                        "drafting nothing while plain decoding would be faster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctcspec", description="Lossless speculative decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"ctcspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one prompt, streaming, with statistics",
                         description="Generate greedily from one prompt; output equals plain greedy decoding.")
    _add_model_args(gen)
    _add_kernel_args(gen)
    gen.add_argument("--drafter", default=None,
                     help="vanilla | lookup | ctc | ctc+lookup | medusa | hydra | eagle "
                          "(default: ctc+lookup when a CTC drafter is given or ships for the model, the fastest "
                          "on both benchmarks here; else lookup)")
    _add_ctc_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=256)
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
                       help="comma-separated, from: vanilla, lookup, medusa, hydra, eagle, ctc, ctc+lookup "
                            "(default: vanilla, lookup and every trained drafter available for the model)")
    bench.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    bench.add_argument("--per-category", type=int, default=None,
                       help="use only the first N questions of each category (applied before --limit)")
    _add_ctc_args(bench)
    bench.add_argument("--max-new-tokens", type=int, default=256)
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


def _load(args):
    import torch

    from ctcspec.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device, dtype=args.dtype, kernels=getattr(args, "kernels", "plain"))


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise CtcspecError(f"cannot read prompt file {str(args.prompt_file)!r}: {exc.strerror}") from None


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


def _check_ctc_args(args) -> None:
    if args.tree_budget is not None and args.tree_budget < 1:
        raise CtcspecError("--tree-budget must be at least 1")
    for option in ("drafter_path", "medusa_path", "hydra_path", "eagle_path"):
        path = getattr(args, option)
        if path is not None and not path.is_dir():
            raise CtcspecError(f"--{option.replace('_', '-')}: drafter directory {str(path)!r} does not exist")


def _make(name: str, args, loaded):
    from ctcspec.drafters import make_drafter

    return make_drafter(name, model=loaded.model, model_name=args.model, drafter_path=args.drafter_path,
                        tree_budget=args.tree_budget, transform=args.transform, adaptive=args.adaptive_budget,
                        baseline_paths={k: getattr(args, f"{k}_path") for k in ("medusa", "hydra", "eagle")})


def cmd_generate(args) -> int:
    from ctcspec.checkpoint import default_drafter_dir
    from ctcspec.drafters import check_drafter_name
    from ctcspec.engine import SpeculativeEngine
    from ctcspec.prompts import encode

    text = require_prompt(_read_prompt(args))  # before the model loads: fail fast
    if args.max_new_tokens < 1:
        raise CtcspecError("--max-new-tokens must be at least 1")
    _check_ctc_args(args)
    if args.drafter is None:  # the fastest here on MT-bench and GSM8K (README Results), else the untrained one
        args.drafter = "ctc+lookup" if args.drafter_path or default_drafter_dir(args.model) else "lookup"
    check_drafter_name(args.drafter)
    loaded = _load(args)
    drafter = _make(args.drafter, args, loaded)
    prompt_ids = encode(loaded.tokenizer, text, chat=args.chat)
    engine = SpeculativeEngine(loaded.model, drafter)
    streamer = None if args.json else _Streamer(loaded.tokenizer)
    result = engine.generate(prompt_ids, args.max_new_tokens, on_tokens=streamer)
    stats = result.stats
    if args.json:
        print(json.dumps({"prompt": text, "model": str(loaded.path), "drafter": args.drafter,
                          "output": loaded.tokenizer.decode(result.tokens, skip_special_tokens=True),
                          "output_ids": result.tokens, "stats": stats.to_dict()}))
    else:
        print(file=sys.stdout)
        print(f"[{args.drafter}] {stats.new_tokens} tokens in {stats.steps} steps (beta {stats.beta:.2f}), "
              f"{stats.tokens_per_s:.1f} tok/s; time: draft {stats.draft_s:.2f}s, verify {stats.verify_s:.2f}s, "
              f"bookkeeping {stats.bookkeeping_s:.2f}s, prefill {stats.prefill_s:.2f}s; stop: {stats.stop_reason}",
              file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from ctcspec.bench import format_category_table, format_table, run_bench
    from ctcspec.bench_report import write_outputs
    from ctcspec.checkpoint import default_drafter_dir
    from ctcspec.cpu_kernels import linear_kernels_of
    from ctcspec.drafters import check_drafter_name
    from ctcspec.prompts import load_questions, resolve_bench, select_questions

    if args.drafters is None:
        args.drafters = ",".join(["vanilla", "lookup", *(
            k for k in ("medusa", "hydra", "eagle", "ctc")
            if getattr(args, "drafter_path" if k == "ctc" else f"{k}_path") or default_drafter_dir(args.model, k))])
    names = [check_drafter_name(d.strip()) for d in args.drafters.split(",") if d.strip()]  # before loading
    if "vanilla" not in names:
        names.insert(0, "vanilla")  # the reference every speedup is measured against
    _check_ctc_args(args)
    bench_name = args.questions
    args.questions = resolve_bench(args.questions, args.data_dir)
    questions = select_questions(load_questions(args.questions), args.per_category, args.limit)
    loaded = _load(args)
    drafters = {name: _make(name, args, loaded) for name in names}
    report = run_bench(loaded.model, loaded.tokenizer, questions, drafters, args.max_new_tokens,
                       include_hf=not args.no_hf)
    meta = {"model": str(loaded.path), "bench": bench_name, "questions": str(args.questions),
            "n_questions": len(questions), "command": "ctcspec " + " ".join(sys.argv[1:]),
            "max_new_tokens": args.max_new_tokens, "threads": args.threads, "device": args.device,
            "dtype": args.dtype, "kernels": linear_kernels_of(loaded.model), "cpu_count": os.cpu_count(),
            "per_category": args.per_category,
            "drafter_settings": {n: _settings(d) for n, d in drafters.items()}}
    paths = write_outputs(report, meta, args.out)
    print(format_table(report))
    print()
    print(format_category_table(report))
    print(f"report: {paths['markdown']} (and report.json, plot.png, answers/)", file=sys.stderr)
    return 0


def _settings(drafter) -> dict:
    keys = ("tree_budget", "transform", "top_k", "beam_width", "max_nodes", "draft_len")
    settings = {k: getattr(drafter, k) for k in keys if hasattr(drafter, k)}
    ctc = getattr(drafter, "ctc", drafter)
    if hasattr(ctc, "adaptive"):
        settings["adaptive_budget"] = ctc.adaptive is not None
    return settings


def cmd_distill(args) -> int:
    from ctcspec.distill import distill, read_prompt_file, self_instruct, templated_prompts

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
    from dataclasses import fields

    from ctcspec.train import summary_json, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    if config.kind not in TRAINABLE:
        raise CtcspecError(f"unknown --kind {config.kind!r}; choose from: {', '.join(TRAINABLE)}")
    if args.out.exists() and not args.resume and (args.out / "checkpoint.pt").exists():
        raise CtcspecError(f"{str(args.out)!r} already holds a training checkpoint: pass --resume to continue it, "
                           "or choose a new --out")
    loaded = _load(args)
    summary = train(loaded.model, args.data, args.out, config, resume=args.resume)
    if summary:
        print(summary_json(summary))
    return 0


def cmd_report(args) -> int:
    from ctcspec.bench import format_category_table, format_table, read_report

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "bench": cmd_bench, "distill": cmd_distill, "train": cmd_train,
                    "report": cmd_report}
        return commands[args.command](args)
    except CtcspecError as exc:
        print(f"ctcspec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctcspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
