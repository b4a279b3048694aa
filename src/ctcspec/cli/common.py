"""Loading what a command runs on: the model and backend from the options, and the engine (assembly.build_engine, or
assembly.build_batch_engine for batches)."""

from __future__ import annotations

from pathlib import Path

import torch

from ctcspec.assembly import build_batch_engine, build_engine, default_drafter, drafter_dirs
from ctcspec.backends import Backend, LlamaCppBackend, make_backend
from ctcspec.backends.llamacpp import LOSSLESS_PRECISIONS
from ctcspec.batch import BatchEngine
from ctcspec.bench.peers import (
    LLAMA_CPP_PEERS,
    import_llama_speculative,
    peers_problem,
)
from ctcspec.drafters import check_drafter_name
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.gguf import converter_path, gguf_for, import_llama_cpp
from ctcspec.models import DEFAULT_MODEL, LoadedModel, load_model
from ctcspec.modules import KINDS
from ctcspec.modules.files import shipped_drafter_dir


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


def load_from_args(args) -> LoadedModel:
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


def load_backend(args) -> tuple[LoadedModel, Backend]:
    """The model, and the --backend that runs it (llama.cpp: on the GGUF of --model at --gguf)."""
    check_llama_cpp(args)
    loaded = load_from_args(args)
    if args.backend != LlamaCppBackend.name:
        return loaded, make_backend(loaded.model, args.backend)
    return loaded, make_backend(loaded.model, args.backend, gguf_for(loaded.path, args.gguf), loaded.tokenizer)


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
    loaded, backend = load_backend(args)
    return loaded, build_engine(loaded.model, name, backend=backend, drafter_paths=list(dirs.values()), shipped=False,
                                tree_budget=args.tree_budget, adaptive=args.adaptive_budget, transform=args.transform)


def batch_engine_from_args(args, max_batch: int) -> tuple[LoadedModel, BatchEngine]:
    """The model and a batched engine (assembly.build_batch_engine) for up to `max_batch` sequences on --backend
    (auto, static or hf), with --drafter and its budget options as engine_from_args takes them."""
    if base_in_llama_cpp(args):
        raise CtcspecError("--backend llama.cpp runs one sequence at a time; batches run on the static or hf "
                           "backend (leave --backend out)")
    dirs = cli_drafter_dirs(args)
    name = check_drafter_name(args.drafter or default_drafter(dirs, args.drafter_path))
    loaded = load_from_args(args)
    return loaded, build_batch_engine(loaded.model, name, max_batch=max_batch, backend=args.backend,
                                      drafter_paths=list(dirs.values()), shipped=False, tree_budget=args.tree_budget,
                                      adaptive=args.adaptive_budget, transform=args.transform)


def llama_cpp_peers(args) -> bool:
    """Whether bench's --peers include a llama.cpp peer."""
    return any(name in LLAMA_CPP_PEERS for name in getattr(args, "peers", None) or ())


def uses_gguf(args) -> bool:
    """Whether --gguf matters: llama.cpp runs the base model or one of bench's peers."""
    return base_in_llama_cpp(args) or llama_cpp_peers(args)
