"""GGUF files for llama.cpp: the converter, the cache of converted models, the vocabulary check, llama_cpp itself.

Setup (`make peers`, see docs/llama_cpp.md): llama-cpp-python built from source, and llama.cpp's GGUF converter
from the same source release copied to `$VENV/share/ctcspec/llama.cpp` (or `$CTCSPEC_GGUF_CONVERTER`).
A GGUF is converted once from the HF model directory and cached under `$CTCSPEC_HOME/gguf`. The llama.cpp
backend and the llama.cpp peers both take HF tokenizer ids as they are, so `check_vocab` refuses a GGUF whose
id -> piece map differs from the HF tokenizer's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from ctcspec.errors import CtcspecError
from ctcspec.home import ctcspec_home

PRECISIONS = ("f32", "f16", "q8_0")
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SETUP = "run `make peers` (builds llama-cpp-python from source and installs llama.cpp's GGUF converter)"
_CONVERTER = "convert_hf_to_gguf.py"
log = logging.getLogger(__name__)


GGML_TYPE_F32 = 0  # ggml_type of an F32 KV cache
_MIN_CONTEXT = 512


def import_llama_cpp():
    """The llama_cpp module, its backend initialised once and its log silenced below errors, or a CtcspecError
    saying how to install it."""
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError as exc:
        raise CtcspecError(f"llama.cpp needs llama-cpp-python ({exc}); {SETUP}") from None
    set_verbose(False)
    _initialise(llama_cpp)
    return llama_cpp


@functools.cache
def _initialise(llama_cpp) -> None:
    """llama.cpp's one-time global set-up, as llama-cpp-python's own `Llama` does it."""
    llama_cpp.llama_backend_init()


def context_size(needed: int, limit: int) -> int:
    """llama.cpp context cells for `needed` positions: the smallest power of two >= `needed` (at least 512),
    capped at `limit` (the model's trained context)."""
    size = _MIN_CONTEXT
    while size < needed:
        size *= 2
    return min(size, limit)


def converter_path() -> Path:
    """llama.cpp's convert_hf_to_gguf.py as `make peers` installs it (next to its `conversion` and `gguf-py`)."""
    override = os.environ.get("CTCSPEC_GGUF_CONVERTER")
    path = Path(override) if override else Path(sys.prefix) / "share" / "ctcspec" / "llama.cpp" / _CONVERTER
    if not path.is_file():
        raise CtcspecError(f"llama.cpp's GGUF converter is not installed (no {path}); {SETUP}")
    return path


def _model_key(model_dir: Path) -> str:
    """Changes when the model directory or any file in it changes (path, name, size, mtime)."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    for item in sorted(model_dir.resolve().iterdir()):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def gguf_path(model_dir: Path, precision: str) -> Path:
    """Where the GGUF of `model_dir` at `precision` is cached (it may not exist yet)."""
    model_dir = Path(model_dir)
    return ctcspec_home() / "gguf" / f"{model_dir.resolve().name}-{_model_key(model_dir)}.{precision}.gguf"


def gguf_for(model_dir: str | Path, precision: str = "f32") -> Path:
    """A GGUF of the HF model in `model_dir` at `precision` (f32, f16 or q8_0), converted once by llama.cpp's
    converter and cached; a cached file is complete (written under a temporary name, then renamed)."""
    if precision not in PRECISIONS:
        raise CtcspecError(f"unknown GGUF precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    model_dir = Path(model_dir)
    target = gguf_path(model_dir, precision)
    if target.is_file():
        return target
    converter = converter_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    log.info("converting %s to GGUF %s once: %s", model_dir, precision, target)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the converter's own gguf-py
    command = [sys.executable, str(converter), str(model_dir), "--outtype", precision, "--outfile", str(partial)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CtcspecError(f"llama.cpp's converter failed on {model_dir} ({precision}): {last}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def check_vocab(llama_model, tokenizer) -> None:
    """Raise CtcspecError unless every id of the HF `tokenizer` names the same piece in the GGUF model
    `llama_model` (a llama_cpp model pointer)."""
    llama_cpp = import_llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llama_model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    hf_pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if len(hf_pieces) > n_vocab:
        raise CtcspecError(f"the GGUF has {n_vocab} tokens, the HF tokenizer {len(hf_pieces)}")
    for token_id, piece in enumerate(hf_pieces):
        gguf_piece = llama_cpp.llama_vocab_get_text(vocab, token_id).decode("utf-8", errors="replace")
        if gguf_piece != piece:
            raise CtcspecError(f"token id {token_id} is {piece!r} in the HF tokenizer but {gguf_piece!r} in the GGUF")
