"""llama.cpp as a peer system: its plain greedy decoding and its prompt-lookup decoding, through llama-cpp-python.

A peer takes the same prompt token ids as ctcspec's engines (HF tokenizer ids, passed straight in: the GGUF is
converted from the same model directory, and `check_vocab` refuses a GGUF whose id -> piece map differs) and
returns a `PeerResult` measured like the engine measures itself: new tokens (EOS included, nothing after it),
base decode calls (prompt evaluation included) and the seconds from the start of prompt evaluation to the last
token. Both peers are exactly greedy (argmax, no penalties, no sampling).

Setup: `make peers` (docs/llama_cpp.md); the GGUF comes from ctcspec.gguf.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcspec.errors import CtcspecError
from ctcspec.gguf import GGML_TYPE_F32, check_vocab, context_size, gguf_for, import_llama_cpp


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


PEER_CLASSES = {peer.name: peer for peer in (LlamaCppPeer, LlamaCppLookupPeer)}
PEERS = tuple(PEER_CLASSES)  # the one list of peer names


def make_peer(name: str, model_dir: str | Path, threads: int, eos_ids: Iterable[int], precision: str = "f32",
              tokenizer=None) -> LlamaCppPeer:
    """The peer `name` (one of PEERS) on the GGUF of `model_dir` at `precision`, converted on first use.
    With `tokenizer` (the HF tokenizer of `model_dir`), its ids are checked against the GGUF's first."""
    if name not in PEER_CLASSES:
        raise CtcspecError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    import_llama_speculative()  # say what is missing before converting anything
    peer = PEER_CLASSES[name](gguf_for(model_dir, precision), threads, eos_ids, precision)
    if tokenizer is not None:
        check_vocab(peer._llm.model, tokenizer)
    return peer
