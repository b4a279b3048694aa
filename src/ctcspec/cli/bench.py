"""ctcspec bench and ctcspec report: systems side by side on benchmark questions, and saved reports' tables."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ctcspec.assembly import build_batch_engine, build_drafter
from ctcspec.bench.batch import batch_table, run_engine_batch, run_hf_batch
from ctcspec.bench.peers import (
    PEERS,
    VllmCtcPeer,
    make_peer,
)
from ctcspec.bench.questions import load_questions, resolve_bench, select_questions
from ctcspec.bench.report import environment, peak_rss_mb, write_outputs
from ctcspec.bench.run import GREEDY, bench_questions, bench_systems, loglik_scorer, system_runners, turn_seed
from ctcspec.bench.store import BenchStore
from ctcspec.bench.summary import HF, describe_settings, format_category_table, format_table, read_report, subset_report
from ctcspec.cli.args import (
    add_decoding_args,
    add_drafter_args,
    add_kernel_args,
    add_model_args,
    dtype_name,
    generation_settings,
    peer_list,
    positive_int,
)
from ctcspec.cli.common import (
    base_in_llama_cpp,
    check_llama_cpp,
    cli_drafter_dirs,
    load_backend,
    load_from_args,
    uses_gguf,
)
from ctcspec.decoding import decoding_for, eos_ids, settings_in_effect
from ctcspec.drafters import DRAFTERS, MODULE_KIND, check_drafter_name
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL, LoadedModel
from ctcspec.modules import KINDS
from ctcspec.modules.files import drafter_kind, shipped_drafter_dir
from ctcspec.prompts import encode_chat
from ctcspec.vllm_drafter import CAUSAL_CTC_NAME, check_vllm_drafter


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark drafters side by side against vanilla and HF generate",
                           description="Run each drafter and HF generate on the same questions (FastChat jsonl, "
                                       "both turns; or GSM8K jsonl) and print beta, tokens/s and speedups. "
                                       "Sampling, every system gets the same seed per question turn, and the "
                                       "mean log-likelihood per token of each system's outputs under the base "
                                       "model replaces the count of outputs differing from vanilla.")
    add_model_args(bench)
    add_kernel_args(bench)
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
    add_drafter_args(bench)
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
    bench.add_argument("--batch-size", type=positive_int, default=None,
                       help="throughput of batches: every system decodes the questions' first turns, up to this many "
                            "at a time (ctcspec drafters with continuous batching, HF generate left-padded); writes "
                            "batch_report.md and batch_report.json to --out")
    add_decoding_args(bench)


def add_report_parser(sub) -> None:
    report = sub.add_parser("report", help="print the tables of a saved bench report",
                            description="Print the summary and per-category tables of a JSON report written by bench.")
    report.add_argument("path", type=Path, help="a directory (or its report.json) written by ctcspec bench --out")
    report.add_argument("--per-category", type=positive_int, default=None,
                        help="only the first N questions of each category (file order), the tables recomputed "
                             "from the per-turn records")
    report.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N questions (applied after --per-category)")


def bench_drafter_names(args, dirs: dict[str, Path]) -> list[str]:
    """--drafters, checked, with vanilla first (the reference every speedup is measured against); by default
    vanilla, lookup, every trained drafter available and ctc+lookup when a CTC drafter is."""
    if args.drafters is None:
        names = ["vanilla", "lookup", *(k for k in KINDS if k in dirs), *(["ctc+lookup"] if "ctc" in dirs else [])]
    else:
        names = [check_drafter_name(d.strip()) for d in args.drafters.split(",") if d.strip()]
    return names if "vanilla" in names else ["vanilla", *names]


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
    if args.batch_size is not None:
        return bench_batch(args, names, dirs, settings)
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
    loaded, backend = load_backend(args)
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


def bench_batch(args, names: list[str], dirs: dict[str, Path], settings: dict) -> int:
    """`bench --batch-size B` (bench/batch.py): the systems one after another on the same first turns."""
    for flag, given in (("--peers", args.peers), ("--resume", args.resume),
                        ("--backend llama.cpp", base_in_llama_cpp(args))):
        if given:
            raise CtcspecError(f"--batch-size: {flag} is not supported with batches")
    report_paths = [args.out / "batch_report.json", args.out / "batch_report.md"]
    if any(path.exists() for path in report_paths):
        raise CtcspecError(f"--out {str(args.out)!r} already holds a batch report; give another --out")
    questions = select_questions(load_questions(resolve_bench(args.questions, args.data_dir)), args.per_category,
                                 args.limit)
    loaded = load_from_args(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in questions]
    seed = bench_seed(args)
    seeds = [turn_seed(seed, q.question_id, 0) for q in questions]
    engines = {name: build_batch_engine(model, name, max_batch=args.batch_size, backend=args.backend,
                                        drafter_paths=list(dirs.values()), shipped=False, tree_budget=args.tree_budget,
                                        adaptive=args.adaptive_budget, transform=args.transform) for name in names}
    warm = [encode_chat(tokenizer, [{"role": "user", "content": "Say hello."}])]
    runs = []
    for name, engine in tqdm(engines.items(), desc="bench batches", unit="system"):
        run_engine_batch(name, engine, warm, 8, settings, [seed])  # first calls pay one-off costs
        runs.append(run_engine_batch(name, engine, prompts, args.max_new_tokens, settings, seeds))
    if not args.no_hf:
        run_hf_batch(model, warm, 8, 1, settings, seed)
        runs.append(run_hf_batch(model, prompts, args.max_new_tokens, args.batch_size, settings, seed))
    reference = runs[0] if runs[0].system == "vanilla" and not settings.get("do_sample") else None
    hf = next((run for run in runs if run.system == HF), None)
    rows = [run.row(reference, hf) for run in runs]
    meta = {"model": str(loaded.path), "bench": args.questions, "prompts": len(prompts), "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "command": "ctcspec " + " ".join(sys.argv[1:]),
            "settings_in_effect": settings_in_effect(model, settings), "seed": seed, **environment(),
            "drafter_settings": {name: engine.drafter.settings() for name, engine in engines.items()}}
    table = batch_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    report_paths[0].write_text(json.dumps({"meta": meta, "rows": rows,
                                           "outputs": {run.system: run.outputs for run in runs}}, indent=1))
    report_paths[1].write_text(f"# Batches of {args.batch_size}: {len(prompts)} prompts of {args.questions}\n\n"
                               f"`{meta['command']}` ({meta['cpu_model']}, {meta['threads']} threads)\n\n{table}\n")
    print(table)
    print(f"report: {report_paths[1]} (and batch_report.json)", file=sys.stderr)
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
