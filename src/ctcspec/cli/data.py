"""ctcspec distill, store and train: the data a drafter learns from, kept, and the training."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from ctcspec.bench.report import cpu_model
from ctcspec.cli.args import add_model_args, bounded_float, dtype_name, non_negative_int, positive_int, seed_int
from ctcspec.cli.common import load_from_args
from ctcspec.errors import CtcspecError
from ctcspec.models import parse_dtype
from ctcspec.modules import KINDS
from ctcspec.training.data import check_data_base
from ctcspec.training.distill import (
    DISTILL_ENGINES,
    STYLED_COUNT,
    ctcspec_answers,
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
from ctcspec.vllm_engine import VllmEngine, vllm_problem


def add_distill_parser(sub) -> None:
    distill = sub.add_parser("distill", help="self-distillation: the base model answers training prompts",
                             description="Answer training prompts greedily with the base model and store the token "
                                         "ids (resumable). Evaluation sets are refused.")
    add_model_args(distill)
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
                         help="with --dtype bfloat16/float16 or --engine vllm/ctcspec: answer the first N prompts of "
                              "DIR again with HF generate in float32 (--engine vllm: one prompt at a time) and report "
                              "how far the answers agree (default: 0, no check)")
    distill.add_argument("--engine", default="hf", choices=DISTILL_ENGINES,
                         help="what answers the prompts: hf = HF generate on left-padded batches (default); vllm = "
                              "vLLM's continuous batching over each batch, in its own environment (`make vllm`, "
                              "docs/vllm.md; --batch-size 64 or more suits it); ctcspec = ctcspec's batched engine "
                              "with prompt lookup, --batch-size sequences at a time (docs/batching.md); "
                              "--self-instruct always uses HF")
    distill.add_argument("--max-new-tokens", type=positive_int, default=256)
    distill.add_argument("--batch-size", type=positive_int, default=16)
    distill.add_argument("--store", type=Path, default=None, metavar="STORE",
                         help="a data store (ctcspec store): leave out the prompts it already holds answers to")
    distill.add_argument("--out", type=Path, required=True, help="data directory (created; resumes if it exists)")


def add_store_parser(sub) -> None:
    store = sub.add_parser("store", help="add distilled data to a data store (compressed shards + manifest, for git)",
                           description="Add the answers of `ctcspec distill` directories that the store lacks, one "
                                       "shard per directory, with each directory's record (engine, machine, "
                                       "throughput, float32 check); prints the store's summary. Train and evaluate "
                                       "on a store with --data STORE (docs/ctc.md).")
    add_model_args(store)
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


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a drafter (CTC, or a Medusa/Hydra/EAGLE baseline) on distilled data",
                           description="Train the attention draft module with CTC loss against the base model's "
                                       "own next tokens (--kind ctc), or a baseline (--kind medusa|hydra|eagle) on "
                                       "the same data; checkpoints periodically; --resume continues.")
    add_model_args(train)
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
        raise CtcspecError("--check-float32 compares a lower precision or another engine with HF in float32: give "
                           "--dtype bfloat16 or float16, or --engine vllm or ctcspec")
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
    loaded = load_from_args(args)
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
        elif args.engine == "ctcspec":
            answer_batch = ctcspec_answers(loaded.model, loaded.tokenizer, args.max_new_tokens, args.batch_size)
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
        loaded = load_from_args(args)
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
    loaded = load_from_args(args)
    summary = train(loaded.model, args.data, args.out, config, resume=args.resume)
    if summary:
        print(summary_json(summary))
    return 0
