"""The `ctcspec` command line: generate and bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ctcspec import __version__
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL
from ctcspec.prompts import require_prompt

DEFAULT_DRAFTERS = "vanilla,lookup"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local Hugging Face model directory, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default; fastest on CPU), bfloat16, float16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives the steadiest timings)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctcspec", description="Lossless speculative decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"ctcspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one prompt, streaming, with statistics",
                         description="Generate greedily from one prompt; output equals plain greedy decoding.")
    _add_model_args(gen)
    gen.add_argument("--drafter", default="lookup", help="vanilla | lookup (default: lookup)")
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
    bench.add_argument("--questions", default="builtin",
                       help="question jsonl (FastChat or GSM8K format), or 'builtin' for the demo set (default)")
    bench.add_argument("--drafters", default=DEFAULT_DRAFTERS, help=f"comma-separated (default: {DEFAULT_DRAFTERS})")
    bench.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    bench.add_argument("--max-new-tokens", type=int, default=256)
    bench.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    bench.add_argument("--out", type=Path, default=Path("runs/bench.json"), help="JSON report path")

    report = sub.add_parser("report", help="print the tables of a saved bench report",
                            description="Print the summary and per-category tables of a JSON report written by bench.")
    report.add_argument("path", type=Path, help="a report written by ctcspec bench --out")
    return parser


def _load(args):
    import torch

    from ctcspec.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device, dtype=args.dtype)


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


def cmd_generate(args) -> int:
    from ctcspec.drafters import make_drafter
    from ctcspec.engine import SpeculativeEngine
    from ctcspec.prompts import encode

    text = require_prompt(_read_prompt(args))  # before the model loads: fail fast
    if args.max_new_tokens < 1:
        raise CtcspecError("--max-new-tokens must be at least 1")
    drafter = make_drafter(args.drafter)
    loaded = _load(args)
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
    from ctcspec.bench import format_category_table, format_table, run_bench, write_report
    from ctcspec.drafters import make_drafter
    from ctcspec.prompts import load_questions

    drafters = [d.strip() for d in args.drafters.split(",") if d.strip()]
    for name in drafters:
        make_drafter(name)  # fail on a typo before loading anything
    if "vanilla" not in drafters:
        drafters.insert(0, "vanilla")  # the reference every speedup is measured against
    questions = load_questions(args.questions)
    if args.limit is not None:
        if args.limit < 1:
            raise CtcspecError("--limit must be at least 1")
        questions = questions[: args.limit]
    loaded = _load(args)
    report = run_bench(loaded.model, loaded.tokenizer, questions, drafters, args.max_new_tokens,
                       include_hf=not args.no_hf)
    meta = {"model": str(loaded.path), "questions": str(args.questions), "n_questions": len(questions),
            "max_new_tokens": args.max_new_tokens, "threads": args.threads, "device": args.device,
            "dtype": args.dtype, "cpu_count": os.cpu_count()}
    write_report(report, args.out, meta)
    print(format_table(report))
    print()
    print(format_category_table(report))
    print(f"report: {args.out}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from ctcspec.bench import format_category_table, format_table

    try:
        report = json.loads(args.path.read_text(encoding="utf-8"))
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
        return {"generate": cmd_generate, "bench": cmd_bench, "report": cmd_report}[args.command](args)
    except CtcspecError as exc:
        print(f"ctcspec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctcspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
