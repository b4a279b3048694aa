"""The `ctcspec` command line: generate, bench, report, distill, store, train, info, kernels, eval, serve, chat.

One module per command group: generate, serve (serve, chat), bench (bench, report), data (distill, store, train),
info (info, export-vllm, kernels), evaluate (eval); `args` holds the options they share, `common` the loading of
model, backend and engine (assembly.build_engine).

Every user error (a bad flag value, an unreadable or malformed file, a model or drafter that cannot be
used) ends in one line on stderr and exit code 2; library code raises `CtcspecError` and never prints.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ctcspec import __version__
from ctcspec.cli.bench import add_bench_parser, add_report_parser, cmd_bench, cmd_report
from ctcspec.cli.common import cli_drafter_dirs, engine_from_args
from ctcspec.cli.data import add_distill_parser, add_store_parser, add_train_parser, cmd_distill, cmd_store, cmd_train
from ctcspec.cli.evaluate import add_eval_parser, cmd_eval
from ctcspec.cli.generate import add_generate_parser, cmd_generate
from ctcspec.cli.info import (
    add_export_vllm_parser,
    add_info_parser,
    add_kernels_parser,
    cmd_export_vllm,
    cmd_info,
    cmd_kernels,
)
from ctcspec.cli.serve import add_chat_parser, add_serve_parser, cmd_chat, cmd_serve
from ctcspec.errors import CtcspecError

__all__ = ["COMMANDS", "build_parser", "cli_drafter_dirs", "engine_from_args", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctcspec", description="Lossless speculative decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"ctcspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parser, add_bench_parser, add_distill_parser, add_store_parser, add_train_parser,
                add_report_parser, add_info_parser, add_kernels_parser, add_export_vllm_parser, add_eval_parser,
                add_serve_parser, add_chat_parser):
        add(sub)
    return parser


COMMANDS = {"generate": cmd_generate, "bench": cmd_bench, "distill": cmd_distill, "store": cmd_store,
            "train": cmd_train, "report": cmd_report, "info": cmd_info, "kernels": cmd_kernels, "eval": cmd_eval,
            "serve": cmd_serve, "chat": cmd_chat, "export-vllm": cmd_export_vllm}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for every user error, usage errors included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    handler = logging.StreamHandler(sys.stderr)  # ctcspec's own progress lines only, not other libraries'
    handler.setFormatter(logging.Formatter("ctcspec: %(message)s"))
    logger = logging.getLogger("ctcspec")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except CtcspecError as exc:
        print(f"ctcspec: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # always one line
        return 2
    except OSError as exc:  # a file the command must write or read that the system refuses (permissions, disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ctcspec: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctcspec: interrupted", file=sys.stderr)
        return 130
