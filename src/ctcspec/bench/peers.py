"""llama.cpp as a peer system: its plain greedy decoding and its prompt-lookup decoding, through llama-cpp-python.

A peer takes the same prompt token ids as ctcspec's engines (HF tokenizer ids, passed straight in: the GGUF is
converted from the same model directory, and `check_vocab` refuses a GGUF whose id -> piece map differs) and
returns a `PeerResult` measured like the engine measures itself: new tokens (EOS included, nothing after it),
base decode calls (prompt evaluation included) and the seconds from the start of prompt evaluation to the last
token. Both peers are exactly greedy (argmax, no penalties, no sampling).

Setup (`make peers`, see docs/peers.md): llama-cpp-python built from source, and llama.cpp's GGUF converter
from the same source release copied to `$VENV/share/ctcspec/llama.cpp` (or `$CTCSPEC_GGUF_CONVERTER`).
Converted GGUF files are cached under `$CTCSPEC_HOME/gguf`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcspec.errors import CtcspecError
from ctcspec.models import ctcspec_home

PRECISIONS = ("f32", "f16", "q8_0")
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_SETUP = "run `make peers` (builds llama-cpp-python from source and installs llama.cpp's GGUF converter)"
_CONVERTER = "convert_hf_to_gguf.py"
_GGML_TYPE_F32 = 0  # ggml_type of an F32 KV cache
log = logging.getLogger(__name__)


@dataclass
class PeerResult:
    tokens: list[int]   # new tokens only; ends at the first EOS if one came
    steps: int          # base decode calls, prompt evaluation included (plain greedy: one per token)
    seconds: float      # from the start of prompt evaluation to the last token

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


# --- setup: the converter, llama_cpp, the GGUF cache ---

def converter_path() -> Path:
    """llama.cpp's convert_hf_to_gguf.py as `make peers` installs it (next to its `conversion` and `gguf-py`)."""
    override = os.environ.get("CTCSPEC_GGUF_CONVERTER")
    path = Path(override) if override else Path(sys.prefix) / "share" / "ctcspec" / "llama.cpp" / _CONVERTER
    if not path.is_file():
        raise CtcspecError(f"llama.cpp's GGUF converter is not installed (no {path}); {_SETUP}")
    return path


def import_llama_cpp():
    """The llama_cpp module, or a CtcspecError saying how to install it."""
    try:
        import llama_cpp
        import llama_cpp.llama_speculative  # noqa: F401  (the lookup peer's drafter)
    except ImportError as exc:
        raise CtcspecError(f"the llama.cpp peers need llama-cpp-python ({exc}); {_SETUP}") from None
    return llama_cpp


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


def check_vocab(llm, tokenizer) -> None:
    """Raise CtcspecError unless every id of the HF `tokenizer` names the same piece in the GGUF model `llm`
    (peers get HF ids, so this is what makes their outputs comparable)."""
    llama_cpp = import_llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    hf_pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if len(hf_pieces) > n_vocab:
        raise CtcspecError(f"the GGUF has {n_vocab} tokens, the HF tokenizer {len(hf_pieces)}")
    for token_id, piece in enumerate(hf_pieces):
        gguf_piece = llama_cpp.llama_vocab_get_text(vocab, token_id).decode("utf-8", errors="replace")
        if gguf_piece != piece:
            raise CtcspecError(f"token id {token_id} is {piece!r} in the HF tokenizer but {gguf_piece!r} in the GGUF")


# --- the peers ---

def _context_size(needed: int, limit: int) -> int:
    """The smallest power of two >= `needed` (at least 512), capped at the model's trained context."""
    size = 512
    while size < needed:
        size *= 2
    return min(size, limit)


class LlamaCppPeer:
    """llama.cpp plain greedy decoding: prompt evaluation, then one decode call per token, argmax sampler.

    Invariants: every `generate` starts from an empty KV cache (no prefix reuse between calls, as ctcspec's
    engine prefills every prompt); the sampler chain is llama.cpp's greedy sampler (first maximum) behind a
    neutral penalties stage (repeat 1.0, frequency and presence 0: a no-op); with `precision` f32 the KV cache is
    F32 too, otherwise llama.cpp's default (F16)."""

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, threads: int, eos_ids: Iterable[int], precision: str = "f32"):
        self.gguf = Path(gguf)
        self.threads = int(threads)
        self.eos = frozenset(int(t) for t in eos_ids)
        self.precision = precision
        self._llama_cpp = import_llama_cpp()
        self._llm = None
        self._decodes = 0
        self.max_context = int(self._llama_cpp.llama_model_n_ctx_train(self._load(512).model))

    def _draft_model(self):
        return None

    def _load(self, n_ctx: int):
        """(Re)build the llama.cpp model and context with `n_ctx` positions; decode calls are counted."""
        kv_type = {"type_k": _GGML_TYPE_F32, "type_v": _GGML_TYPE_F32} if self.precision == "f32" else {}
        self.close()  # free the old context first
        try:
            llm = self._llama_cpp.Llama(
                model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=self.threads,
                n_threads_batch=self.threads, n_gpu_layers=0, draft_model=self._draft_model(), verbose=False,
                **kv_type)
        except ValueError as exc:  # llama-cpp-python's report of a GGUF it cannot load
            raise CtcspecError(f"llama.cpp cannot load {self.gguf} ({exc}); delete it to convert again") from None
        evaluate = llm.eval

        def counted_eval(tokens: Sequence[int]) -> None:  # n_batch == n_ctx: one decode call per eval
            self._decodes += 1
            evaluate(tokens)

        llm.eval = counted_eval
        self._llm = llm
        return llm

    def close(self) -> None:
        """Free the llama.cpp model and context now (the next `generate` loads them again)."""
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _context_for(self, needed: int):
        if self._llm is None or self._llm.n_ctx() < needed:
            self._load(_context_size(needed, self.max_context))
        return self._llm

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> PeerResult:
        """Greedy tokens after `prompt_ids` until EOS (kept), `max_new_tokens` or the model's context limit."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise CtcspecError("the prompt is empty")
        if len(prompt) >= self.max_context:
            raise CtcspecError(f"the prompt has {len(prompt)} tokens; the model's context is {self.max_context}")
        limit = min(max_new_tokens, self.max_context - len(prompt))
        if limit <= 0:
            return PeerResult([], 0, 0.0)
        llm = self._context_for(len(prompt) + limit)
        llm.reset()
        self._decodes = 0
        tokens: list[int] = []
        start = time.perf_counter()
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  frequency_penalty=0.0, presence_penalty=0.0, reset=False):
            tokens.append(int(token))
            if token in self.eos or len(tokens) >= limit:
                break
        seconds = time.perf_counter() - start
        return PeerResult(tokens, self._decodes, seconds)


class LlamaCppLookupPeer(LlamaCppPeer):
    """llama.cpp prompt-lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding` as the draft model):
    the draft is what followed the earliest match of the last 1..`max_ngram_size` tokens, up to
    `num_pred_tokens`; the base model checks it in one decode call and greedy sampling keeps the agreeing prefix.
    Every kept token is the base model's argmax at its position, computed in a multi-token decode call: equal to
    plain greedy wherever batched and single-token kernels agree (f32, f16 in our checks; not q8_0, see
    docs/peers.md). `num_pred_tokens` defaults to 2, llama-cpp-python's advice for CPU-only machines (its library
    default, 10, is for GPUs and was slower here)."""

    name = "llama.cpp-lookup"

    def __init__(self, gguf: str | Path, threads: int, eos_ids: Iterable[int], precision: str = "f32",
                 max_ngram_size: int = 2, num_pred_tokens: int = 2):
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens
        super().__init__(gguf, threads, eos_ids, precision)

    def _draft_model(self):
        speculative = self._llama_cpp.llama_speculative
        return speculative.LlamaPromptLookupDecoding(max_ngram_size=self.max_ngram_size,
                                                     num_pred_tokens=self.num_pred_tokens)


PEER_CLASSES = {peer.name: peer for peer in (LlamaCppPeer, LlamaCppLookupPeer)}
PEERS = tuple(PEER_CLASSES)  # the one list of peer names


def make_peer(name: str, model_dir: str | Path, threads: int, eos_ids: Iterable[int], precision: str = "f32",
              tokenizer=None) -> LlamaCppPeer:
    """The peer `name` (one of PEERS) on the GGUF of `model_dir` at `precision`, converted on first use.
    With `tokenizer` (the HF tokenizer of `model_dir`), its ids are checked against the GGUF's first."""
    if name not in PEER_CLASSES:
        raise CtcspecError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    import_llama_cpp()  # say what is missing before converting anything
    peer = PEER_CLASSES[name](gguf_for(model_dir, precision), threads, eos_ids, precision)
    if tokenizer is not None:
        check_vocab(peer._llm, tokenizer)
    return peer
