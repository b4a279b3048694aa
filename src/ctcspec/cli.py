"""The `ctcspec` command line: generate, bench, report, distill, store, train, info, kernels, eval, serve, chat.

Every user error (a bad flag value, an unreadable or malformed file, a model or drafter that cannot be
used) ends in one line on stderr and exit code 2; library code raises `CtcspecError` and never prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ctcspec import __version__
from ctcspec.assembly import build_drafter, build_engine, default_drafter, drafter_dirs
from ctcspec.backends import BACKENDS, Backend, LlamaCppBackend, make_backend
from ctcspec.backends.llamacpp import LOSSLESS_PRECISIONS
from ctcspec.bench.peers import (
    LLAMA_CPP_PEERS,
    PEERS,
    VllmCtcPeer,
    import_llama_speculative,
    make_peer,
    peer_names,
    peers_problem,
)
from ctcspec.bench.questions import load_questions, resolve_bench, select_questions
from ctcspec.bench.report import cpu_model, environment, peak_rss_mb, write_outputs
from ctcspec.bench.run import GREEDY, bench_questions, bench_systems, loglik_scorer, system_runners
from ctcspec.bench.store import BenchStore
from ctcspec.bench.summary import describe_settings, format_category_table, format_table, read_report, subset_report
from ctcspec.budget import drafting_cost_curve, machine_cost_curve
from ctcspec.chat import Conversation, run_chat
from ctcspec.cpu_kernels import KERNELS
from ctcspec.decoding import MIN_TEMPERATURE, decoding_for, eos_ids, settings_in_effect
from ctcspec.drafters import DRAFTERS, MODULE_KIND, check_drafter_name, make_drafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError, read_text_file
from ctcspec.gguf import PRECISIONS, converter_path, gguf_for, import_llama_cpp
from ctcspec.kernel_choice import choose_kernels
from ctcspec.models import DEFAULT_MODEL, LoadedModel, load_model, parse_dtype
from ctcspec.modules import KINDS
from ctcspec.modules.files import describe_drafter, drafter_kind, read_config, read_vocab_ids, shipped_drafter_dir
from ctcspec.prompts import encode, require_prompt
from ctcspec.search import TRANSFORMS
from ctcspec.server.metrics import ServerMetrics
from ctcspec.server.service import GenerationService
from ctcspec.text import ReleasedText, decode
from ctcspec.training.compare import (
    EVAL_BUDGETS,
    EvalRow,
    ablation_rows,
    evaluate_drafter,
    heldout_samples,
    read_ablations,
    vocabulary_coverage,
)
from ctcspec.training.data import check_data_base
from ctcspec.training.distill import (
    DISTILL_ENGINES,
    STYLED_COUNT,
    distill,
    float32_agreement,
    read_prompt_file,
    read_samples,
    record_run,
    round_slice,
    self_instruct,
    styled_prompts,
    templated_prompts,
    vllm_answers,
)
from ctcspec.training.store import (
    DEFAULT_MAX_MB,
    MANIFEST,
    distill_meta,
    is_store,
    read_manifest,
    store_distilled,
    store_prompts,
    store_summary,
)
from ctcspec.training.train import TrainConfig, summary_json, train
from ctcspec.vllm_drafter import CAUSAL_CTC_NAME, check_vllm_drafter, export_vllm_drafter
from ctcspec.vllm_engine import VllmEngine, vllm_problem


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


# Flags that only shape sampling, by their settings key; given without sampling they are refused, not ignored.
SAMPLING_ONLY = {"top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p"}


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local Hugging Face model directory, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default; fastest on CPU), bfloat16, float16")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives the steadiest timings)")


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
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


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model, its runtime and one drafter: what generate, serve and chat decode with."""
    _add_model_args(p)
    _add_kernel_args(p)
    p.add_argument("--drafter", default=None,
                   help=f"{' | '.join(DRAFTERS)} (default: ctc+lookup when a CTC drafter is given or ships for the "
                        "model, the fastest on both benchmarks here; else the kind of --drafter-path; else lookup)")
    _add_drafter_args(p)


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with streaming, metrics and a chat page",
                           description="Serve the model with speculative decoding over the OpenAI API: "
                                       "/v1/chat/completions and /v1/completions (streaming or not), /v1/models, "
                                       "/health, /metrics (Prometheus) and a chat page at /. Requests queue for "
                                       "the engine, one generation at a time. Greedy unless a request sets "
                                       "temperature above 0 (docs/serving.md).")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
                            "interface)")
    serve.add_argument("--port", type=port_number, default=8000, help="(default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("CTCSPEC_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $CTCSPEC_API_KEY; unset: no key)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients name (default: --model as given)")
    serve.add_argument("--max-queue", type=positive_int, default=64,
                       help="requests admitted at once, waiting or running; beyond it a request gets 429 "
                            "(default: 64)")
    serve.add_argument("--drain-timeout", type=bounded_float(lambda v: v >= 0, "at least 0"), default=60.0,
                       metavar="S", help="on Ctrl-C or SIGTERM, seconds open requests get to finish before they "
                                     "are cancelled (default: 60)")


def _add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="a conversation in the terminal, streamed",
                          description="Chat with the model in the terminal: answers stream as tokens are accepted, "
                                      "the conversation goes through the model's chat template. /reset, /stats "
                                      "(beta and speed of the last answer), /quit; Ctrl-C stops an answer. With "
                                      "stdin not a terminal, each line is answered and the command exits.")
    _add_engine_args(chat)
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    chat.add_argument("--max-new-tokens", type=positive_int, default=512, help="per answer (default: 512)")
    _add_decoding_args(chat)


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


def _add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="what a saved drafter holds",
                          description="Print a saved drafter's kind, module config, size, base model, training "
                                      "summary and held-out acceptance curves. Reads config.json and the weights' "
                                      "header only: no model is loaded.")
    info.add_argument("path", type=Path, help="a drafter directory (config.json + model.safetensors)")
    info.add_argument("--data", type=Path, nargs="+", default=[], metavar="DIR",
                      help="also summarise these distilled data directories and how much of their answer tokens "
                           "(train and held-out split, as training makes them) the draft vocabulary covers")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_export_vllm_parser(sub) -> None:
    export = sub.add_parser("export-vllm", help="a CTC drafter as a draft model that vLLM runs",
                            description="Write a CTC drafter (trained with --slot-attention causal) as a vLLM draft "
                                        "model directory and print the `vllm serve` command that runs it: vLLM's "
                                        "EAGLE proposer in parallel-drafting mode, through ctcspec's vLLM plugin "
                                        "(installed into vLLM's environment by `make vllm`; docs/vllm.md).")
    _add_model_args(export)
    export.add_argument("drafter", type=Path, help="a CTC drafter directory, trained for --model")
    export.add_argument("--out", type=Path, required=True, help="the directory to write (config.json + weights)")


def _add_kernels_parser(sub) -> None:
    kernels = sub.add_parser("kernels", help="which linear-layer kernels --kernels auto takes here, and why",
                             description="Print the kernels --kernels auto takes on this machine for --model and "
                                         "--threads, with the timings the choice rests on (measured once and cached "
                                         "under $CTCSPEC_HOME/kernels; --remeasure measures again).")
    _add_model_args(kernels)
    kernels.add_argument("--remeasure", action="store_true", help="measure again and replace the cached choice")
    kernels.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="held-out acceptance of drafters side by side, with predicted speedups",
                              description="Measure trained drafters' held-out acceptance (mean accepted draft "
                                          "tokens per step, per tree budget) on the held-out split training makes "
                                          "of --data, or read saved ablation curves (--ablations), and predict "
                                          "each one's speedup at its best budget from this machine's cost curve.")
    _add_model_args(evaluate)
    _add_kernel_args(evaluate)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, nargs="+", metavar="DIR",
                        help="directories written by ctcspec distill, in the order training was given them")
    source.add_argument("--ablations", type=Path, metavar="DIR",
                        help="a directory of saved ablation runs (round*.json, *_config.json; e.g. docs/ablations): "
                             "their saved curves, priced with one CTC drafter's drafting time")
    evaluate.add_argument("--drafter-path", type=Path, action="append", default=[], metavar="DIR",
                          help="a trained drafter directory; repeat to compare several, of any kinds (default: the "
                               "drafters shipped for the embedded default model)")
    evaluate.add_argument("--transforms", type=transform_list, default=list(TRANSFORMS), metavar="LIST",
                          help=f"CTC transforms to read CTC drafters with (default: {','.join(TRANSFORMS)})")
    evaluate.add_argument("--budgets", type=budget_list, default=EVAL_BUDGETS, metavar="LIST",
                          help=f"tree budgets (default: {','.join(map(str, EVAL_BUDGETS))})")
    evaluate.add_argument("--samples", type=positive_int, default=64, metavar="N",
                          help="held-out sequences (default: 64)")
    evaluate.add_argument("--sources", type=source_list, default=None, metavar="S1,S2",
                          help="only held-out sequences of these prompt sources (as `ctcspec store` lists them, e.g. "
                               "alpaca_eval/instructions.jsonl,styled); default: every source")
    evaluate.add_argument("--anchors", type=positive_int, default=16, metavar="N",
                          help="draft positions per held-out sequence (default: 16)")
    evaluate.add_argument("--json", type=Path, default=None, metavar="OUT",
                          help="also write the rows and the cost curve to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctcspec", description="Lossless speculative decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"ctcspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one prompt, streaming, with statistics",
                         description="Generate from one prompt: greedy by default, token for token what "
                                     "model.generate(do_sample=False) gives; sampling (--temperature, --sample) has "
                                     "the distribution of model.generate(do_sample=True).")
    _add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_decoding_args(gen)

    bench = sub.add_parser("bench", help="benchmark drafters side by side against vanilla and HF generate",
                           description="Run each drafter and HF generate on the same questions (FastChat jsonl, "
                                       "both turns; or GSM8K jsonl) and print beta, tokens/s and speedups. "
                                       "Sampling, every system gets the same seed per question turn, and the "
                                       "mean log-likelihood per token of each system's outputs under the base "
                                       "model replaces the count of outputs differing from vanilla.")
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
    bench.add_argument("--peers", type=peer_list, default=[],
                       help=f"comma-separated peer systems run side by side on the same prompt ids and threads, from: "
                            f"{', '.join(PEERS)}; a family's name ('llama.cpp', 'vllm') runs its two peers unless the "
                            f"other is named too (llama.cpp needs `make peers`, docs/llama_cpp.md; vLLM `make vllm`, "
                            f"docs/vllm.md)")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"),
                       help="output directory: turns.jsonl (every turn, saved question by question), run.json (the "
                            "settings), report.md, report.json, plot.png, answers/<drafter>.jsonl (default: "
                            "runs/bench); results already there are never overwritten")
    bench.add_argument("--resume", action="store_true",
                       help="continue the run saved in --out (same settings): skip the questions it finished")
    _add_decoding_args(bench)

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
    distill.add_argument("--styled", action="store_true",
                         help="also answer the styled requests: the templates and code tasks x topics x answer styles "
                              f"({STYLED_COUNT} prompts, none of them a --templated one; for --round)")
    distill.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts of each file")
    distill.add_argument("--round", type=non_negative_int, default=None, metavar="R",
                         help="training round R: take prompts [R*M, (R+1)*M) of each source (files, --templated, "
                              "--styled) in a fixed shuffled order (M = --round-size), so rounds never repeat a "
                              "prompt; --self-instruct is seeded with R unless --seed is given")
    distill.add_argument("--round-size", type=positive_int, default=None, metavar="M",
                         help="prompts per source per round (with --round)")
    distill.add_argument("--seed", type=seed_int, default=None,
                         help="seed of the --self-instruct requests (default: --round, else 0)")
    distill.add_argument("--time-limit-s", type=bounded_float(lambda v: v > 0, "positive"), default=None,
                         help="start no new batch after this many seconds from the command's start (what is "
                              "answered is kept; run again to answer the rest)")
    distill.add_argument("--check-float32", type=non_negative_int, default=0, metavar="N",
                         help="with --dtype bfloat16/float16 or --engine vllm: answer the first N prompts of DIR again "
                              "with HF generate in float32 (--engine vllm: one prompt at a time) and report how far "
                              "the answers agree (default: 0, no check)")
    distill.add_argument("--engine", default="hf", choices=DISTILL_ENGINES,
                         help="what answers the prompts: hf = HF generate on left-padded batches (default); vllm = "
                              "vLLM's continuous batching over each batch, in its own environment (`make vllm`, "
                              "docs/vllm.md; --batch-size 64 or more suits it); --self-instruct always uses HF")
    distill.add_argument("--max-new-tokens", type=positive_int, default=256)
    distill.add_argument("--batch-size", type=positive_int, default=16)
    distill.add_argument("--store", type=Path, default=None, metavar="STORE",
                         help="a data store (ctcspec store): leave out the prompts it already holds answers to")
    distill.add_argument("--out", type=Path, required=True, help="data directory (created; resumes if it exists)")

    store = sub.add_parser("store", help="add distilled data to a data store (compressed shards + manifest, for git)",
                           description="Add the answers of `ctcspec distill` directories that the store lacks, one "
                                       "shard per directory, with each directory's record (engine, machine, "
                                       "throughput, float32 check); prints the store's summary. Train and evaluate "
                                       "on a store with --data STORE (docs/ctc.md).")
    _add_model_args(store)
    store.add_argument("data", type=Path, nargs="*", help="directories written by ctcspec distill")
    store.add_argument("--check-float32", type=non_negative_int, default=8, metavar="N",
                       help="answer N of each shard's new prompts (seeded random) again with HF generate in float32, "
                            "one at a time, and record how far the answers agree (default: 8; 0 skips the check and "
                            "the model load)")
    store.add_argument("--into", type=Path, required=True, help="the data store directory (created if absent)")
    store.add_argument("--name", default="", help="the new shard's name (default: the directory's name)")
    store.add_argument("--max-mb", type=bounded_float(lambda v: v > 0, "positive"), default=DEFAULT_MAX_MB,
                       help=f"refuse to grow the store past this many MB (default {DEFAULT_MAX_MB:g}: the repository's "
                            "budget for distilled data)")

    train = sub.add_parser("train", help="train a drafter (CTC, or a Medusa/Hydra/EAGLE baseline) on distilled data",
                           description="Train the attention draft module with CTC loss against the base model's "
                                       "own next tokens (--kind ctc), or a baseline (--kind medusa|hydra|eagle) on "
                                       "the same data; checkpoints periodically; --resume continues.")
    _add_model_args(train)
    train.add_argument("--data", type=Path, nargs="+", required=True, help="directories written by ctcspec distill")
    train.add_argument("--out", type=Path, required=True, help="drafter directory to write")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    defaults = TrainConfig()
    explained = {"init_from": "a saved drafter DIR of this --kind to continue training from (a warm start: it keeps "
                              "that drafter's weights and draft vocabulary; the architecture options must match it)",
                 "layer_init": "ctc: random, or base = start the draft layer as the base model's last decoder "
                               "layer (Llama-family bases)",
                 "num_layers": "ctc: draft layers over the slots",
                 "slot_attention": "ctc: bidirectional or causal (vLLM runs causal drafters: docs/vllm.md); "
                                   "none = bidirectional, or --init-from's",
                 "prefix_weight": "ctc: weight of a loss term that rewards drafts whose first tokens are right "
                                  "(-log P(draft starts with the first k targets), averaged over k)",
                 "soft_weight": "ctc: weight of a KL term to the base model's next-token distributions at the "
                                "slots the best CTC alignment gives a target",
                 "feature_layers": "ctc: comma-separated base layers (HF hidden_states indices, 0 = embeddings) "
                                   "whose states join the last layer's in the context units (EAGLE-3's fused "
                                   "features), e.g. 8,16; none = none, or --init-from's (a warm start may add them)",
                 "eval_every": "steps between held-out evaluations (the progress bar's beta16 and the summary's "
                               "eval_history: acceptance at budgets 1, 4, 16 by answer tokens seen)",
                 "eval_samples": "held-out sequences of each of those evaluations",
                 "hidden_cache": "a directory caching the base model's hidden states of the data (fp16), shared by "
                                 "several trainings on the same data"}
    for name, kind in (("kind", str), ("num_slots", int), ("target_tokens", int), ("intermediate_size", int),
                       ("slot_attention", str), ("loss", str), ("layer_init", str), ("num_layers", int),
                       ("prefix_weight", float), ("soft_weight", float), ("feature_layers", str), ("draft_vocab", int),
                       ("max_train_samples", int), ("hidden_cache", str), ("init_from", str), ("steps", int),
                       ("epochs", float), ("batch_size", int), ("anchors_per_sequence", int), ("max_length", int),
                       ("lr", float), ("eval_every", int), ("eval_samples", int), ("final_eval_samples", int),
                       ("checkpoint_every", int), ("seed", int), ("time_limit_s", float)):
        default = getattr(defaults, name)
        shown = default if default != "" else "none"
        train.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                           help=f"{explained.get(name, '')} (default: {shown})".strip())

    report = sub.add_parser("report", help="print the tables of a saved bench report",
                            description="Print the summary and per-category tables of a JSON report written by bench.")
    report.add_argument("path", type=Path, help="a directory (or its report.json) written by ctcspec bench --out")
    report.add_argument("--per-category", type=positive_int, default=None,
                        help="only the first N questions of each category (file order), the tables recomputed "
                             "from the per-turn records")
    report.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N questions (applied after --per-category)")
    _add_info_parser(sub)
    _add_kernels_parser(sub)
    _add_export_vllm_parser(sub)
    _add_eval_parser(sub)
    _add_serve_parser(sub)
    _add_chat_parser(sub)
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
    kernels = "plain" if base_in_llama_cpp(args) else getattr(args, "kernels", "plain")  # torch: drafters only
    return load_model(args.model, device=args.device, dtype=args.dtype, kernels=kernels)


def base_in_llama_cpp(args) -> bool:
    """Whether llama.cpp runs the base model (--backend llama.cpp)."""
    return getattr(args, "backend", None) == LlamaCppBackend.name


def check_llama_cpp(args) -> None:
    """Before loading or converting anything: say what llama.cpp needs and is missing, for the backend and for
    bench's peers (and what vLLM's peers need)."""
    peers = llama_cpp_peers(args)
    problem = peers_problem(getattr(args, "peers", None) or ())
    if problem:
        raise CtcspecError(problem)
    if base_in_llama_cpp(args):
        if args.device != "cpu" or args.dtype != "float32":
            raise CtcspecError("llama.cpp runs on the CPU beside a float32 model: drop --device and --dtype "
                               "(--gguf picks llama.cpp's weights)")
        if args.gguf not in LOSSLESS_PRECISIONS:
            raise CtcspecError(f"--backend llama.cpp takes --gguf {' or '.join(LOSSLESS_PRECISIONS)}: llama.cpp's "
                               f"{args.gguf} kernels round several tokens differently from one, so verifying a tree "
                               f"would not equal llama.cpp's own greedy decoding (docs/llama_cpp.md)")
    if peers:
        import_llama_speculative()
    if peers or base_in_llama_cpp(args):
        import_llama_cpp()
        converter_path()


def _load_backend(args) -> tuple[LoadedModel, Backend]:
    """The model, and the --backend that runs it (llama.cpp: on the GGUF of --model at --gguf)."""
    check_llama_cpp(args)
    loaded = _load(args)
    if args.backend != LlamaCppBackend.name:
        return loaded, make_backend(loaded.model, args.backend)
    return loaded, make_backend(loaded.model, args.backend, gguf_for(loaded.path, args.gguf), loaded.tokenizer)


def _read_prompt(args) -> str:
    return args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "prompt file")


def print_tokens(tokenizer) -> Callable[[list[int]], None]:
    """An on_tokens callback printing the text of the tokens as it becomes final."""
    released = ReleasedText(tokenizer)

    def write(tokens: list[int]) -> None:
        sys.stdout.write(released.add(tokens))
        sys.stdout.flush()
    return write


def cli_drafter_dirs(args) -> dict[str, Path]:
    """Trained drafter directories by kind, before the model loads (the CLI knows the model by name): each
    --drafter-path, then the drafters shipped for the embedded default model for the kinds not given."""
    dirs = drafter_dirs(args.drafter_path)
    shipped = {kind: shipped_drafter_dir(args.model, kind) for kind in KINDS} if args.model == DEFAULT_MODEL else {}
    return {**{kind: path for kind, path in shipped.items() if path is not None}, **dirs}


def engine_from_args(args) -> tuple[LoadedModel, SpeculativeEngine]:
    """The model and an engine (assembly.build_engine) with --drafter (default: assembly.default_drafter) on
    --backend, its budget from --tree-budget and --adaptive-budget."""
    dirs = cli_drafter_dirs(args)
    name = check_drafter_name(args.drafter or default_drafter(dirs, args.drafter_path))
    loaded, backend = _load_backend(args)
    return loaded, build_engine(loaded.model, name, backend=backend, drafter_paths=list(dirs.values()),
                                tree_budget=args.tree_budget, adaptive=args.adaptive_budget, transform=args.transform)


def cmd_generate(args) -> int:
    text = require_prompt(_read_prompt(args))  # before the model loads: fail fast
    settings = generation_settings(args)
    seed = args.seed if args.seed is not None or not settings["do_sample"] else secrets.randbelow(2**31)
    loaded, engine = engine_from_args(args)
    drafter, name = engine.drafter, engine.drafter.name
    prompt_ids = encode(loaded.tokenizer, text, chat=args.chat)
    in_effect = settings_in_effect(loaded.model, settings)
    streamer = None if args.json else print_tokens(loaded.tokenizer)
    result = engine.generate(prompt_ids, args.max_new_tokens, on_tokens=streamer, seed=seed, **settings)
    stats = result.stats
    if args.json:
        print(json.dumps({"prompt": text, "model": str(loaded.path), "drafter": name,
                          "settings": drafter.settings(), "settings_in_effect": in_effect, "seed": seed,
                          "output": decode(loaded.tokenizer, result.tokens),
                          "output_ids": result.tokens, "stats": stats.to_dict()}))
    else:
        print(file=sys.stdout)
        print(f"[{name}] {stats.new_tokens} tokens in {stats.steps} steps (beta {stats.beta:.2f}), "
              f"{stats.tokens_per_s:.1f} tok/s; time: draft {stats.draft_s:.2f}s, verify {stats.verify_s:.2f}s, "
              f"bookkeeping {stats.bookkeeping_s:.2f}s, prefill {stats.prefill_s:.2f}s; stop: {stats.stop_reason}; "
              f"{describe_settings(in_effect, seed)}", file=sys.stderr)
    return 0


def bench_drafter_names(args, dirs: dict[str, Path]) -> list[str]:
    """--drafters, checked, with vanilla first (the reference every speedup is measured against); by default
    vanilla, lookup, every trained drafter available and ctc+lookup when a CTC drafter is."""
    if args.drafters is None:
        names = ["vanilla", "lookup", *(k for k in KINDS if k in dirs), *(["ctc+lookup"] if "ctc" in dirs else [])]
    else:
        names = [check_drafter_name(d.strip()) for d in args.drafters.split(",") if d.strip()]
    return names if "vanilla" in names else ["vanilla", *names]


def peer_list(text: str) -> list[str]:
    """--peers: comma-separated names from PEERS (bench/peers.py: peer_names)."""
    try:
        return peer_names([t.strip() for t in text.split(",") if t.strip()])
    except CtcspecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def llama_cpp_peers(args) -> bool:
    """Whether bench's --peers include a llama.cpp peer."""
    return any(name in LLAMA_CPP_PEERS for name in getattr(args, "peers", None) or ())


def uses_gguf(args) -> bool:
    """Whether --gguf matters: llama.cpp runs the base model or one of bench's peers."""
    return base_in_llama_cpp(args) or llama_cpp_peers(args)


def build_peers(args, loaded: LoadedModel, peers: dict, vllm_drafter: Path | None = None) -> dict:
    """--peers, started one by one into `peers` (so that the caller can close those started when a later one
    fails); vllm-ctc runs `vllm_drafter` (`vllm_ctc_drafter`)."""
    threads = args.threads or torch.get_num_threads()
    for name in args.peers:
        peers[name] = make_peer(name, loaded.path, threads, eos_ids(loaded.model.generation_config), args.gguf,
                                tokenizer=loaded.tokenizer, dtype=dtype_name(args.dtype),
                                ctc_drafter=vllm_drafter, model=loaded.model)
    return peers


def vllm_ctc_drafter(args) -> Path | None:
    """The CTC drafter the vllm-ctc peer runs: --drafter-path's, else the causal one shipped for the embedded
    default (None when the peer is not asked for); what vLLM cannot run of it is an error before anything loads."""
    if VllmCtcPeer.name not in (getattr(args, "peers", None) or ()):
        return None
    given = [path for path in args.drafter_path if drafter_kind(path) == "ctc"]
    shipped = shipped_drafter_dir(args.model, CAUSAL_CTC_NAME) if args.model == DEFAULT_MODEL else None
    path = given[0] if given else shipped
    if path is None:
        raise CtcspecError(VllmCtcPeer.needs)
    try:
        check_vllm_drafter(path)
    except CtcspecError as exc:
        raise CtcspecError(f"--peers vllm-ctc: {exc}") from None
    return path


def dtype_name(text: str) -> str:
    """--dtype as torch names it (float32, bfloat16, float16), the names vLLM takes."""
    return str(parse_dtype(text)).removeprefix("torch.")


def _abspath(path) -> str:
    """An existing path made absolute (so a resume from another directory compares equal); anything else as given."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def bench_seed(args) -> int:
    """bench's --seed: 0 unless given."""
    return 0 if args.seed is None else args.seed


def bench_settings(args, systems: list[str], dirs: dict[str, Path], settings: dict,
                   vllm_drafter: Path | None = None) -> dict:
    """What `bench --resume` requires to equal the saved run's (DIR/run.json): the model, the questions and their
    selection, the systems, the generation length and settings (with the seed; both left out when greedy with
    no other setting, as runs saved before they existed), the drafter files and flags, and the device settings."""
    sampling = {} if settings == GREEDY else {"generation_settings": settings, "seed": bench_seed(args)}
    kinds = sorted({MODULE_KIND[name] for name in systems if name in MODULE_KIND})
    return {"model": _abspath(args.model), "questions": _abspath(args.questions), "per_category": args.per_category,
            "limit": args.limit, "systems": systems, "max_new_tokens": args.max_new_tokens,
            "drafter_paths": {kind: _abspath(dirs[kind]) if kind in dirs else None for kind in kinds},
            "tree_budget": args.tree_budget, "transform": args.transform, "adaptive_budget": args.adaptive_budget,
            "device": args.device, "dtype": args.dtype, "kernels": args.kernels, "backend": args.backend,
            "threads": args.threads, "gguf": args.gguf if uses_gguf(args) else None, **sampling,
            **({"vllm_ctc_drafter": _abspath(vllm_drafter)} if vllm_drafter else {})}


def write_bench_outputs(store: BenchStore, meta: dict) -> None:
    """Write and print the report of the questions finished so far (nothing when none is)."""
    if not store.n_done:
        return
    report = store.report()
    meta = {**meta, "n_questions": store.n_done, "n_questions_planned": len(store.questions),
            "complete": store.n_done == len(store.questions), "peak_rss_mb": peak_rss_mb()}
    paths = write_outputs(report, meta, store.out)
    print(format_table(report))
    print()
    print(format_category_table(report))
    print(f"report: {paths['markdown']} (and report.json, plot.png, answers/; every turn in turns.jsonl)",
          file=sys.stderr)


def cmd_bench(args) -> int:
    dirs = cli_drafter_dirs(args)
    names = bench_drafter_names(args, dirs)  # before loading anything
    settings = generation_settings(args)
    if args.peers and settings != GREEDY:
        raise CtcspecError("--peers: the peers decode greedily only, without sampling or logits processors; "
                           "drop --peers or the decoding flags")
    bench_name = args.questions
    args.questions = resolve_bench(args.questions, args.data_dir)
    questions = select_questions(load_questions(args.questions), args.per_category, args.limit)
    systems = bench_systems(names, include_hf=not args.no_hf, peers=args.peers)
    check_llama_cpp(args)
    vllm_drafter = vllm_ctc_drafter(args)
    store = BenchStore.open(args.out, bench_settings(args, systems, dirs, settings, vllm_drafter), questions, systems,
                            resume=args.resume)
    loaded, backend = _load_backend(args)
    in_effect, seed = settings_in_effect(loaded.model, settings), bench_seed(args)
    processors = decoding_for(loaded.model, [0], max_new_tokens=1, **settings).processors
    if args.peers and processors:
        raise CtcspecError(f"--peers: the peers decode plain greedy, without the logits processors these settings or "
                           f"the model's generation_config ask for ({', '.join(type(p).__name__ for p in processors)})")
    drafters = {name: build_drafter(name, backend, dirs, args.tree_budget, args.adaptive_budget, args.transform)
                for name in names}
    meta = {"model": str(loaded.path), "bench": bench_name, "questions": str(args.questions),
            "command": "ctcspec " + " ".join(sys.argv[1:]), "max_new_tokens": args.max_new_tokens,
            "device": args.device, "dtype": args.dtype, **environment(), **backend.describe(),
            "cpu_count": os.cpu_count(), "per_category": args.per_category, "limit": args.limit,
            "drafter_settings": {n: d.settings() for n, d in drafters.items()},
            "settings_in_effect": in_effect, "seed": seed,
            **({"gguf": args.gguf} if uses_gguf(args) else {})}
    peers: dict = {}
    try:
        runners = system_runners(backend, drafters, build_peers(args, loaded, peers, vllm_drafter), settings)
        for records in bench_questions(runners, loaded.tokenizer, questions, args.max_new_tokens, systems,
                                       start=store.n_done, seed=seed,
                                       scorer=loglik_scorer(loaded.model, in_effect)):
            store.append(records)
    except KeyboardInterrupt:
        write_bench_outputs(store, meta)
        print(f"ctcspec: interrupted after {store.n_done} of {len(questions)} questions; rerun with --resume to "
              "continue", file=sys.stderr)
        return 130
    finally:
        for peer in peers.values():
            peer.close()
    write_bench_outputs(store, meta)
    return 0


def cmd_distill(args) -> int:
    deadline = time.monotonic() + args.time_limit_s if args.time_limit_s else None
    if not args.prompts and args.self_instruct <= 0 and not args.templated and not args.styled:
        raise CtcspecError("give --prompts FILE [FILE ...], --templated, --styled and/or --self-instruct N")
    if (args.round is None) != (args.round_size is None):
        raise CtcspecError("--round and --round-size go together")
    if args.round is not None and args.limit is not None:
        raise CtcspecError("--limit and --round both choose prompts: give one")
    sources = [(str(path), read_prompt_file(path)) for path in args.prompts]
    sources += [("--templated", templated_prompts())] if args.templated else []
    sources += [("--styled", styled_prompts())] if args.styled else []
    if args.check_float32 and parse_dtype(args.dtype) == torch.float32 and args.engine == "hf":
        raise CtcspecError("--check-float32 compares a lower precision or vLLM with HF in float32: give --dtype "
                           "bfloat16 or float16, or --engine vllm")
    problem = vllm_problem() if args.engine == "vllm" else None
    if problem:
        raise CtcspecError(problem)
    prompts = []
    for what, group in sources:
        chosen = group[:args.limit] if args.round is None else round_slice(group, args.round, args.round_size)
        if not chosen:
            logging.getLogger("ctcspec").warning("--round %d: earlier rounds of --round-size %d used all %d prompts "
                                                 "of %s; it adds none", args.round, args.round_size, len(group), what)
        prompts += chosen
    if not prompts and args.self_instruct <= 0:
        raise CtcspecError("no prompts left to answer: every source is used up by earlier rounds")
    if args.store is not None and not is_store(args.store):
        raise CtcspecError(f"--store {str(args.store)!r} is not a data store (no {MANIFEST}); make one with "
                           "ctcspec store")
    skip = store_prompts(args.store) if args.store is not None else frozenset()  # read before any long work
    loaded = _load(args)
    if args.store is not None:
        check_data_base([args.store], loaded.model)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.self_instruct > 0:
        seed = args.seed if args.seed is not None else args.round or 0
        prompts += self_instruct(loaded.model, loaded.tokenizer, args.self_instruct, args.out,
                                 batch_size=max(args.batch_size, 8), seed=seed, deadline=deadline)
    with contextlib.ExitStack() as stack:
        answer_batch = None
        if args.engine == "vllm":
            engine = stack.enter_context(VllmEngine(loaded.path, args.threads or torch.get_num_threads(),
                                                    dtype=dtype_name(args.dtype)))
            answer_batch = vllm_answers(engine, loaded.model, loaded.tokenizer, args.max_new_tokens)
        stats = distill(loaded.model, loaded.tokenizer, prompts, args.out, args.max_new_tokens, args.batch_size,
                        deadline=deadline, answer_batch=answer_batch, engine=args.engine, skip=skip)
    if args.check_float32:
        checked = read_samples(args.out)[:args.check_float32]
        stats["float32_check"] = float32_agreement(loaded.model, loaded.tokenizer, checked, args.max_new_tokens,
                                                   1 if args.engine == "vllm" else args.batch_size)
    options = {"sources": [what for what, _ in sources] + (["--self-instruct"] if args.self_instruct > 0 else []),
               "round": args.round, "round_size": args.round_size, "limit": args.limit,
               "self_instruct": args.self_instruct, "batch_size": args.batch_size}
    record_run(args.out, {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_model": cpu_model(),
                          "threads": args.threads or torch.get_num_threads(), **options, **stats})
    print(json.dumps(stats))
    print(f"distilled {len(prompts) - stats['skipped']} prompts into {stats['path']} ({stats['answered']} answered "
          f"now, {stats['skipped']} left to the store's answers, "
          f"{stats['tokens_per_s']} answer tokens/s)", file=sys.stderr)
    return 0


def cmd_store(args) -> int:
    """Add distilled directories to a data store, one shard each (each directory's metadata is checked before any is
    written; its samples, base and the store's budget as it is added), then summarise the store."""
    if not is_store(args.into):
        if not args.data:
            raise CtcspecError(f"{str(args.into)!r} is not a data store yet: give distilled directories to add")
        if args.into.exists() and (not args.into.is_dir() or any(args.into.iterdir())):
            raise CtcspecError(f"--into {str(args.into)!r} holds other files and no {MANIFEST}: it is not a data "
                               "store; give a new directory")
    read_manifest(args.into)
    for directory in args.data:
        if not directory.is_dir():
            raise CtcspecError(f"{str(directory)!r} is not a directory written by ctcspec distill")
        distill_meta(directory)
    check = None
    if args.check_float32 and args.data:
        loaded = _load(args)
        check_data_base(args.data, loaded.model)  # the float32 check runs --model on their token ids

        def check(samples: list[dict], max_new_tokens: int) -> dict:
            picked = random.Random(0).sample(samples, min(args.check_float32, len(samples)))
            return float32_agreement(loaded.model, loaded.tokenizer, picked, max_new_tokens, 1)
    for directory in args.data:
        entry = store_distilled(args.into, directory, args.name, args.max_mb, check)
        added = (f"added {entry['file']}: {entry['samples']:,} answers, {entry['answer_tokens']:,} answer tokens, "
                 f"{entry['bytes'] / 1e6:.2f} MB") if entry else "nothing new (the store holds every answer)"
        print(f"{directory}: {added}", file=sys.stderr)
    print(json.dumps(store_summary(args.into), indent=1))
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
        shown = subset_report(report, args.per_category, args.limit)
        tables = format_table(shown), format_category_table(shown)
        questions, total, max_new, model, threads = (meta[k] for k in (
            "questions", "n_questions", "max_new_tokens", "model", "threads"))
    except OSError as exc:
        raise CtcspecError(f"cannot read report {str(args.path)!r}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CtcspecError(f"{str(args.path)!r} is not a ctcspec bench report ({exc!r})") from None
    count = f"{total} questions"
    if args.per_category is not None or args.limit is not None:
        picked = len({r["question_id"] for rows in shown["turns"].values() for r in rows})
        count = f"{picked} of {count} (--per-category {args.per_category}, --limit {args.limit})"
    how = describe_settings(meta.get("settings_in_effect"), meta.get("seed"))
    print(f"{questions}: {count}, {max_new} new tokens, {how}, model {model}, threads {threads}")
    print(tables[0])
    print()
    print(tables[1])
    return 0


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
    loaded = _load(args)
    speculative = export_vllm_drafter(args.drafter, loaded.model, args.out)
    print(f"vllm serve {shlex.quote(str(loaded.path))} --speculative-config {shlex.quote(json.dumps(speculative))}")
    return 0


def cmd_kernels(args) -> int:
    loaded = _load(argparse.Namespace(**{**vars(args), "kernels": "plain"}))
    choice = choose_kernels(loaded.model, remeasure=args.remeasure)
    print(json.dumps(asdict(choice), indent=2) if args.json else choice.describe())
    return 0


def format_cost_curve(cost: dict[int, float]) -> str:
    one = cost[min(cost)]
    return (f"verification cost curve (x a one-token forward of {1000 * one:.1f} ms): "
            + ", ".join(f"q{q} {s / one:.2f}" for q, s in sorted(cost.items())))


def format_eval_table(rows: list[EvalRow], budgets) -> str:
    """`ctcspec eval`'s table: accepted draft tokens per budget, then the best budget and predicted speedup."""
    notes = any(row.note for row in rows)
    lines = ["| drafter | params | steps | " + " | ".join(f"accepted @{b}" for b in budgets)
             + " | best budget | drafting ms | predicted speedup |" + (" change |" if notes else ""),
             "|---|---|---|" + "---|" * (len(budgets) + 3 + notes)]
    for row in rows:
        params = "-" if row.parameters is None else f"{row.parameters / 1e6:.2f} M"
        accepted = " | ".join(f"{row.acceptance[b]:.2f}" if b in row.acceptance else "-" for b in budgets)
        lines.append(f"| {row.label} | {params} | {'-' if row.steps is None else row.steps} | {accepted} | "
                     f"{row.tree_budget} | {1000 * row.draft_seconds:.1f} | {row.speedup:.2f}x |"
                     + (f" {row.note} |" if notes else ""))
    return "\n".join(lines)


def eval_drafter_dirs(args) -> dict[str, Path]:
    """eval's drafters by label (the directory name; the whole path where two names clash), their configs
    checked before any model loads: each --drafter-path, else those shipped for the embedded default model."""
    paths = list(args.drafter_path)
    if not paths and args.model == DEFAULT_MODEL:
        paths = [p for p in (shipped_drafter_dir(args.model, kind) for kind in KINDS) if p is not None]
    for path in paths:
        read_config(path)
    names = [p.name for p in paths]
    return {(p.name if names.count(p.name) == 1 else str(p)): p for p in paths}


def _finish_eval(args, backend: Backend, cost: dict[int, float], rows: list[EvalRow]) -> int:
    print(format_cost_curve(cost))
    print()
    print(format_eval_table(rows, args.budgets))
    if args.json:
        record = {"model": args.model, **backend.describe(), "threads": torch.get_num_threads(),
                  "budgets": list(args.budgets), "cost_curve": cost, "rows": [row.to_dict() for row in rows]}
        try:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            raise CtcspecError(f"cannot write --json {str(args.json)!r}: {exc.strerror}") from None
    return 0


def _eval_ablations(args, dirs: dict[str, Path]) -> int:
    """eval --ablations: saved curves, every run priced with the first CTC drafter's drafting time."""
    if args.sources:
        raise CtcspecError("--sources picks held-out samples of --data; --ablations reads saved curves instead")
    ctc = next((path for path in dirs.values() if drafter_kind(path) == "ctc"), None)
    if ctc is None:
        raise CtcspecError("--ablations prices every run with a CTC drafter's drafting time: pass --drafter-path "
                           "DIR of a CTC drafter for --model")
    shipped = shipped_drafter_dir(args.model, "ctc") if args.model == DEFAULT_MODEL else None
    runs = read_ablations(args.ablations, {"shipped": read_config(shipped)} if shipped else None)
    loaded, backend = _load_backend(args)
    cost = machine_cost_curve(backend)
    draft_cost = drafting_cost_curve(make_drafter("ctc", loaded.model, ctc), loaded.model, list(args.budgets))
    return _finish_eval(args, backend, cost, ablation_rows(runs, args.transforms, args.budgets, cost, draft_cost))


def cmd_eval(args) -> int:
    dirs = eval_drafter_dirs(args)
    if args.ablations:
        return _eval_ablations(args, dirs)
    if not dirs:
        raise CtcspecError("give --drafter-path DIR (repeat it to compare several drafters)")
    heldout = heldout_samples(args.data, args.samples, args.sources)
    loaded, backend = _load_backend(args)
    check_data_base(args.data, loaded.model)
    cost = machine_cost_curve(backend)
    rows = []
    for label, path in dirs.items():
        rows += evaluate_drafter(path, loaded.model, heldout, args.transforms, args.budgets, cost, label, args.anchors)
        print(f"{label}: measured on {len(heldout)} held-out sequences", file=sys.stderr)
    return _finish_eval(args, backend, cost, rows)


def cmd_serve(args) -> int:
    # The serving stack (FastAPI, uvicorn) loads for `serve` alone, so distill, train and eval run where torch,
    # transformers and accelerate are all there is (a GPU training machine: scripts/gpu_round.sh).
    from ctcspec.server.app import check_address, create_app, run_server

    check_address(args.host, args.port)  # before the model loads: fail fast
    loaded, engine = engine_from_args(args)
    service = GenerationService(engine, loaded.tokenizer, args.max_queue, ServerMetrics())
    app = create_app(service, args.served_model_name or args.model, args.api_key)
    logging.getLogger("ctcspec").info("serving %s with the %s drafter at http://%s:%d (chat page at /, API at /v1)",
                                      args.model, engine.drafter.name, args.host, args.port)
    run_server(app, args.host, args.port, args.drain_timeout)
    return 0


def cmd_chat(args) -> int:
    settings = generation_settings(args)
    loaded, engine = engine_from_args(args)
    conversation = Conversation(engine, loaded.tokenizer, args.max_new_tokens, settings, system=args.system)
    conversation.prompt_ids("hello")  # a model without a chat template is refused before the first line
    return run_chat(conversation, sys.stdin, sys.stdout, sys.stderr, sys.stdin.isatty(), seed=args.seed)


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


if __name__ == "__main__":
    sys.exit(main())
