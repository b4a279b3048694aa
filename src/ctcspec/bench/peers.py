"""Peer systems: llama.cpp's plain greedy decoding and its prompt-lookup decoding, through llama-cpp-python, and
vLLM's plain greedy decoding, its n-gram speculation and ctcspec's CTC drafter running inside it, in vLLM's own
environment (ctcspec/vllm_engine.py).

A peer takes the same prompt token ids as ctcspec's engines (HF tokenizer ids, passed straight in: the GGUF is
converted from the same model directory, and `check_vocab` refuses a GGUF whose id -> piece map differs) and
returns a `PeerResult` measured like the engine measures itself: new tokens (EOS included, nothing after it),
base decode calls (prompt evaluation included) and the seconds from the start of prompt evaluation to the last
token. Every peer is exactly greedy (argmax, no penalties, no sampling) and runs one request at a time.

Setup: `make peers` for llama.cpp (docs/llama_cpp.md; the GGUF comes from ctcspec.gguf), `make vllm` for vLLM
(docs/vllm.md; vLLM loads the model directory itself, in --dtype).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcspec.errors import CtcspecError
from ctcspec.gguf import GGML_TYPE_F32, check_vocab, context_size, gguf_for, import_llama_cpp
from ctcspec.vllm_drafter import export_vllm_drafter
from ctcspec.vllm_engine import VllmEngine, vllm_plugin_problem, vllm_problem

# vLLM's n-gram speculation: up to 5 draft tokens after the last earlier match of the last 4, 3 or 2 tokens (vLLM's
# default, matches of exactly 5, seldom drafts in chat answers of a small model).
VLLM_NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@dataclass
class PeerResult:
    tokens: list[int]   # new tokens only; ends at the first EOS if one came
    steps: int          # base decode calls, prompt evaluation included (plain greedy: one per token)
    seconds: float      # from the start of prompt evaluation to the last token

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


def import_llama_speculative():
    """The llama_cpp module with its speculative-decoding helpers (the lookup peer's drafter)."""
    llama_cpp = import_llama_cpp()
    try:
        import llama_cpp.llama_speculative  # noqa: F401
    except ImportError as exc:
        raise CtcspecError(f"the llama.cpp peers need llama_cpp.llama_speculative ({exc})") from None
    return llama_cpp


# --- the peers ---

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
        self._llama_cpp = import_llama_speculative()
        self._llm = None
        self._decodes = 0
        self.max_context = int(self._llama_cpp.llama_model_n_ctx_train(self._load(512).model))

    @classmethod
    def open(cls, model_dir: str | Path, threads: int, eos_ids: Iterable[int], precision: str = "f32",
             tokenizer=None, **_) -> LlamaCppPeer:
        """The peer on the GGUF of `model_dir` at `precision`, converted on first use; with `tokenizer` (the HF
        tokenizer of `model_dir`), its ids are checked against the GGUF's first."""
        import_llama_speculative()  # say what is missing before converting anything
        peer = cls(gguf_for(model_dir, precision), threads, eos_ids, precision)
        if tokenizer is not None:
            check_vocab(peer._llm.model, tokenizer)
        return peer

    def _draft_model(self):
        return None

    def _load(self, n_ctx: int):
        """(Re)build the llama.cpp model and context with `n_ctx` positions; decode calls are counted."""
        kv_type = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if self.precision == "f32" else {}
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
            self._load(context_size(needed, self.max_context))
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
    docs/llama_cpp.md). `num_pred_tokens` defaults to 2, llama-cpp-python's advice for CPU-only machines (its library
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


class VllmPeer:
    """vLLM's greedy decoding of one request at a time (its continuous batching with one sequence), float32 by
    default, through `VllmEngine`. Steps are vLLM's engine steps: one base forward each, prefill included."""

    name = "vllm"
    speculative_config: dict | None = None

    def __init__(self, model_dir: str | Path, threads: int, eos_ids: Iterable[int], dtype: str = "float32",
                 speculative_config: dict | None = None):
        self.eos = sorted(int(t) for t in eos_ids)
        self.engine = VllmEngine(model_dir, threads, speculative_config or self.speculative_config, dtype)

    @classmethod
    def open(cls, model_dir: str | Path, threads: int, eos_ids: Iterable[int], dtype: str = "float32",
             **_) -> VllmPeer:
        return cls(model_dir, threads, eos_ids, dtype)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> PeerResult:
        if not prompt_ids:
            raise CtcspecError("the prompt is empty")
        context = self.engine.max_model_len
        if len(prompt_ids) >= context:
            raise CtcspecError(f"the prompt has {len(prompt_ids)} tokens; vLLM's context is {context}")
        limit = min(max_new_tokens, context - len(prompt_ids))  # as ctcspec's engine stops at the context
        result = self.engine.generate([prompt_ids], limit, self.eos)
        return PeerResult(result.outputs[0], result.steps, result.seconds)

    def close(self) -> None:
        self.engine.close()


class VllmNgramPeer(VllmPeer):
    """vLLM's n-gram speculation (VLLM_NGRAM), verified by vLLM's rejection sampler: greedy, so every kept token is
    the base model's argmax at its position in a multi-token forward."""

    name = "vllm-ngram"
    speculative_config = VLLM_NGRAM


class VllmCtcPeer(VllmPeer):
    """ctcspec's CTC drafter inside vLLM (ctcspec/vllm_plugin.py): drafted from the target's hidden states in one
    causal forward per step, verified by vLLM. The drafter (trained with --slot-attention causal) is exported into a
    temporary directory, removed at `close`."""

    name = "vllm-ctc"
    needs = ("the vllm-ctc peer runs a CTC drafter trained with --slot-attention causal: pass --drafter-path DIR "
             "(docs/vllm.md)")

    def __init__(self, model_dir: str | Path, threads: int, eos_ids: Iterable[int], dtype: str,
                 drafter_dir: str | Path, model):
        problem = vllm_plugin_problem()
        if problem:
            raise CtcspecError(problem)
        self.export_dir = tempfile.TemporaryDirectory(prefix="ctcspec-vllm-drafter-")
        try:
            speculative = export_vllm_drafter(drafter_dir, model, self.export_dir.name)
            super().__init__(model_dir, threads, eos_ids, dtype, speculative)
        except BaseException:
            self.export_dir.cleanup()
            raise

    @classmethod
    def open(cls, model_dir: str | Path, threads: int, eos_ids: Iterable[int], dtype: str = "float32",
             ctc_drafter: str | Path | None = None, model=None, **_) -> VllmCtcPeer:
        if ctc_drafter is None or model is None:
            raise CtcspecError(cls.needs)
        return cls(model_dir, threads, eos_ids, dtype, ctc_drafter, model)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.export_dir.cleanup()


PEER_CLASSES = {peer.name: peer for peer in (LlamaCppPeer, LlamaCppLookupPeer, VllmPeer, VllmNgramPeer, VllmCtcPeer)}
LLAMA_CPP_PEERS = (LlamaCppPeer.name, LlamaCppLookupPeer.name)
VLLM_FAMILY = (VllmPeer.name, VllmNgramPeer.name)  # what --peers vllm means: vllm-ctc needs a causal CTC drafter
VLLM_PEERS = (*VLLM_FAMILY, VllmCtcPeer.name)
PEERS = (*LLAMA_CPP_PEERS, *VLLM_PEERS)  # the one list of peer names
PEER_FAMILIES = {LlamaCppPeer.name: LLAMA_CPP_PEERS, VllmPeer.name: VLLM_FAMILY}  # a family's name and its peers


def peer_names(names: Sequence[str]) -> list[str]:
    """--peers: names from PEERS, in PEERS order; a family's own name ('llama.cpp', 'vllm') means every peer of
    that family unless another of its peers is named too."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise CtcspecError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    chosen = set(names)
    for family, members in PEER_FAMILIES.items():
        if family in names and not any(m in names for m in members if m != family):
            chosen.update(members)
    return [name for name in PEERS if name in chosen]


def peers_problem(names: Sequence[str]) -> str | None:
    """What the peers `names` need and this machine lacks, in one line (before any model loads); None if nothing."""
    if VllmCtcPeer.name in names:
        return vllm_plugin_problem()
    if any(name in VLLM_PEERS for name in names):
        return vllm_problem()
    return None


def make_peer(name: str, model_dir: str | Path, threads: int, eos_ids: Iterable[int], precision: str = "f32",
              tokenizer=None, dtype: str = "float32", ctc_drafter: str | Path | None = None,
              model=None) -> LlamaCppPeer | VllmPeer:
    """The peer `name` (one of PEERS) on `model_dir`: llama.cpp's on its GGUF at `precision`, vLLM's on the
    directory itself in `dtype`, vllm-ctc with the CTC drafter `ctc_drafter` of base `model` (each class's `open`)."""
    if name not in PEER_CLASSES:
        raise CtcspecError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return PEER_CLASSES[name].open(model_dir, threads, eos_ids, precision=precision, tokenizer=tokenizer, dtype=dtype,
                                   ctc_drafter=ctc_drafter, model=model)
