"""The base model in llama.cpp: a GGUF of it (F32 or F16) runs every forward; drafters stay in PyTorch.

A tree goes through llama.cpp's multi-sequence batches: every root-to-leaf path of the tree is one sequence
id, and a node carries the ids of all leaves below it. llama.cpp lets a token see a cached entry when they
share the token's first sequence id and the entry's position is not later, so a node sees exactly the
cached sequence, its ancestors and itself (its first id is a leaf below it: the entries holding that id
are the path to that leaf, and the ones past the node sit at later positions). For this the committed
sequence must hold every id in use: invariant between calls, every cached entry holds ids 0..shared-1.
`keep` restores it: it drops the tree's entries from every id but the kept path's leaf, cuts that id
after the path, and copies the path to the other ids (in llama.cpp's unified KV cache a copy adds an id
to the cell; nothing moves). The accepted entries stay in the cells they were written to, so the cache's
cell order is not position order; attention sums over cells in cell order, which is the one arithmetic
difference from decoding token by token (docs/llama_cpp.md measures it: 0 differing outputs in f32; f16 and q8_0
round several tokens differently from one and are refused).

The HF model stays loaded beside the GGUF: drafters read its config, embeddings and LM head, and decoding
settings come from its generation config. Hidden states are llama.cpp's embeddings output with pooling off,
the last layer after the final norm, as HF's are.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctcspec.backends.base import Backend, ForwardResult, HiddenLayers, node_depths
from ctcspec.errors import CtcspecError
from ctcspec.gguf import GGML_TYPE_F32, check_vocab, context_size, import_llama_cpp

_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0"}  # general.file_type values (llama_ftype) of the GGUFs ctcspec converts
# Weights whose multi-token kernels round as the one-token ones do, so a tree step equals token-by-token decoding.
# q8_0's do not (docs/llama_cpp.md: 4 of 6 prompts left llama.cpp's own q8_0 greedy decoding within 128 tokens).
LOSSLESS_PRECISIONS = ("f32",)  # f16 and q8_0 drift: docs/llama_cpp.md
_MAX_BATCH = 512    # tokens per llama_decode call (a longer prompt goes in several)


@dataclass
class LlamaCppCache:
    """A handle on the backend's one llama.cpp sequence state; `serial` tells a stale handle from the live one."""
    length: int
    serial: int


def path_seq_ids(parents: list[int]) -> tuple[list[list[int]], int]:
    """(Sequence ids per node, leaf count): leaf j (in node order) is id j, and every node carries the ids of the
    leaves below it, lowest first."""
    has_child = [False] * len(parents)
    for parent in parents:
        if parent >= 0:
            has_child[parent] = True
    ids: list[list[int]] = [[] for _ in parents]
    leaf = 0
    for node, inner in enumerate(has_child):
        if inner:
            continue
        while node >= 0:
            ids[node].append(leaf)
            node = parents[node]
        leaf += 1
    return ids, leaf


class LlamaCppBackend(Backend):
    """Runs the GGUF `gguf` of `model` in llama.cpp on `threads` CPU threads (KV cache in F32 when the weights are,
    else llama.cpp's F16 default; flash attention off, as in llama.cpp's plain decoding in the bench's peers).
    With `tokenizer` (the model's HF tokenizer) the GGUF's vocabulary is checked against it first.
    One sequence at a time: `new_cache` starts a new one and retires the previous handle."""

    name = "llama.cpp"
    earlier_layers = False  # llama.cpp hands back the last layer's states (its embeddings output) only

    def __init__(self, model: torch.nn.Module, gguf: str | Path, threads: int, tokenizer=None):
        super().__init__(model)
        self.gguf, self.threads = Path(gguf), int(threads)
        self._ctx = self._batch = self._model = None
        self._lib = import_llama_cpp()
        self.max_seqs = int(self._lib.llama_max_parallel_sequences())
        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = self._lib.llama_model_load_from_file(str(self.gguf).encode(), params)
        if not self._model:
            raise CtcspecError(f"llama.cpp cannot load {self.gguf}; delete it to convert again")
        self.vocab = int(self._lib.llama_vocab_n_tokens(self._lib.llama_model_get_vocab(self._model)))
        self.width = int(self._lib.llama_model_n_embd(self._model))
        self.trained_context = int(self._lib.llama_model_n_ctx_train(self._model))
        self.precision = self._file_type()
        if self.precision not in LOSSLESS_PRECISIONS:
            raise CtcspecError(f"the llama.cpp backend refuses {self.precision} weights: llama.cpp's {self.precision} "
                               f"kernels round several tokens differently from one, so verifying a tree would not "
                               f"equal llama.cpp's own greedy decoding; use --gguf f32")
        self._check_matches(model)
        if tokenizer is not None:
            check_vocab(self._model, tokenizer)
        self.model_vocab = model.get_output_embeddings().weight.shape[0]
        self._n_ctx = self._serial = self._shared = self._past = 0
        self._first_ids: list[int] = []
        self._parents: list[int] = []

    def _file_type(self) -> str:
        value = ctypes.create_string_buffer(32)
        self._lib.llama_model_meta_val_str(self._model, b"general.file_type", value, len(value))
        code = int(value.value or b"-1")
        if code not in _FILE_TYPES:
            raise CtcspecError(f"{self.gguf.name}: weight type {code} is not one of {', '.join(_FILE_TYPES.values())}")
        return _FILE_TYPES[code]

    def _check_matches(self, model: torch.nn.Module) -> None:
        config = model.config
        layers = int(self._lib.llama_model_n_layer(self._model))
        if (self.width, layers) != (config.hidden_size, config.num_hidden_layers):
            raise CtcspecError(f"{self.gguf.name} is not this model: {layers} layers of width {self.width}, the model "
                               f"has {config.num_hidden_layers} of {config.hidden_size}")
        if self.vocab < model.get_output_embeddings().weight.shape[0]:
            raise CtcspecError(f"{self.gguf.name} has {self.vocab} tokens, fewer than the model's LM head")

    # --- llama.cpp objects ---

    def _open(self, n_ctx: int) -> None:
        """A fresh llama.cpp context of `n_ctx` cells (the old one, if any, freed)."""
        self.close()
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_ctx, _MAX_BATCH)
        params.n_seq_max = self.max_seqs
        params.kv_unified = True       # one cell pool shared by every sequence id: what a tree needs
        params.embeddings = True       # last-layer states next to the logits
        params.pooling_type = lib.LLAMA_POOLING_TYPE_UNSPECIFIED  # a causal LM: none, per-token states
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = self.threads
        if self.precision == "f32":
            params.type_k = params.type_v = GGML_TYPE_F32
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise CtcspecError(f"llama.cpp could not make a context of {n_ctx} positions")
        self._batch = lib.llama_batch_init(params.n_batch, 0, self.max_seqs)
        self._n_ctx = n_ctx

    def close(self) -> None:
        """Free the llama.cpp context (the model stays loaded; the next cache opens a new context)."""
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        if getattr(self, "_lib", None) is None:
            return
        self.close()
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    @property
    def _memory(self):
        return self._lib.llama_get_memory(self._ctx)

    # --- the Backend interface ---

    def context_limit(self, max_context: int) -> tuple[int, str]:
        if self.trained_context < max_context:
            return self.trained_context, f"the GGUF's context holds {self.trained_context}"
        return max_context, f"the model's context holds {max_context}"

    def new_cache(self, capacity: int) -> LlamaCppCache:
        needed = context_size(capacity, self.trained_context)
        if self._ctx is None or self._n_ctx < needed:
            self._open(needed)
        else:
            self._lib.llama_memory_clear(self._memory, True)
        self._serial += 1
        self._shared = 1
        self._parents = []
        return LlamaCppCache(0, self._serial)

    def length(self, cache: LlamaCppCache) -> int:
        return cache.length

    def _check_live(self, cache: LlamaCppCache) -> None:
        if cache.serial != self._serial:
            raise CtcspecError("this llama.cpp cache was retired: the backend holds one sequence at a time")

    def forward(self, cache: LlamaCppCache, tokens: list[int], parents: list[int],
                hidden_layers: HiddenLayers = None) -> ForwardResult:
        if hidden_layers:
            raise CtcspecError("the llama.cpp backend returns the last layer's states only")
        self._check_live(cache)
        past, count = cache.length, len(tokens)
        if past + count > self._n_ctx:
            self._grow(cache, past + count)
        ids, leaves = path_seq_ids(parents)
        if leaves > self.max_seqs:
            raise CtcspecError(f"a draft tree with {leaves} leaves; llama.cpp verifies at most {self.max_seqs}")
        for seq in range(self._shared, leaves):  # the cached sequence must hold every id a node starts with
            self._lib.llama_memory_seq_cp(self._memory, 0, seq, -1, -1)
        self._shared = max(self._shared, leaves)
        positions = [past + depth for depth in node_depths(parents)]
        logits, hidden = [], []
        for start in range(0, count, _MAX_BATCH):
            stop = min(start + _MAX_BATCH, count)
            self._decode(tokens[start:stop], positions[start:stop], ids[start:stop])
            logits.append(self._outputs(self._lib.llama_get_logits(self._ctx), stop - start, self.vocab))
            if hidden_layers is not None:
                hidden.append(self._outputs(self._lib.llama_get_embeddings(self._ctx), stop - start, self.width))
        cache.length = past + count
        self._past, self._parents, self._first_ids = past, list(parents), [node_ids[0] for node_ids in ids]
        if leaves == 1:  # a chain (a prompt): share it now, so the invariant holds without a keep
            for seq in range(1, self._shared):
                self._lib.llama_memory_seq_cp(self._memory, 0, seq, past, past + count)
        states = torch.cat(hidden) if hidden_layers is not None else None
        return ForwardResult(torch.cat(logits)[:, :self.model_vocab], states)

    def _decode(self, tokens: list[int], positions: list[int], ids: list[list[int]]) -> None:
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, position, node_ids) in enumerate(zip(tokens, positions, ids, strict=True)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, len(node_ids), True
            row = batch.seq_id[i]
            for j, seq in enumerate(node_ids):
                row[j] = seq
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise CtcspecError(f"llama.cpp's decode failed (status {status}) on {len(tokens)} tokens")

    @staticmethod
    def _outputs(pointer, rows: int, width: int) -> torch.Tensor:
        """A copy of llama.cpp's output rows (it reuses the buffer on the next decode)."""
        array = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(rows, width))
        return torch.from_numpy(array.copy())

    def keep(self, cache: LlamaCppCache, past_len: int, nodes: list[int]) -> None:
        """Backend.keep for what the engine keeps: a path from a node of the last forward that continued the cache
        (parent -1) down through its children."""
        self._check_live(cache)
        parents = self._parents
        if past_len != self._past or any(not 0 <= node < len(parents) or parents[node] != (nodes[i - 1] if i else -1)
                                         for i, node in enumerate(nodes)):
            raise CtcspecError("the llama.cpp backend keeps only a path from the root of its last forward")
        end, memory = past_len + len(nodes), self._memory
        if not nodes:
            self._lib.llama_memory_seq_rm(memory, -1, past_len, -1)
        else:
            leaf = self._first_ids[nodes[-1]]
            for seq in range(self._shared):
                if seq != leaf:
                    self._lib.llama_memory_seq_rm(memory, seq, past_len, -1)
            self._lib.llama_memory_seq_rm(memory, leaf, end, -1)
            for seq in range(self._shared):
                if seq != leaf:
                    self._lib.llama_memory_seq_cp(memory, leaf, seq, past_len, end)
        cache.length = end
        self._parents = []

    def _grow(self, cache: LlamaCppCache, needed: int) -> None:
        """Move the live sequence into a context with room for `needed` entries (llama.cpp's state copy of id 0)."""
        size = context_size(needed, self.trained_context)
        if size < needed:
            raise CtcspecError(f"{needed} positions do not fit the GGUF's context of {self.trained_context}")
        lib = self._lib
        state = (ctypes.c_uint8 * lib.llama_state_seq_get_size(self._ctx, 0))()
        written = lib.llama_state_seq_get_data(self._ctx, state, len(state), 0)
        self._open(size)
        if lib.llama_state_seq_set_data(self._ctx, state, written, 0) == 0:
            raise CtcspecError("llama.cpp could not restore the sequence into a larger context")
        self._shared = 1

    def entries(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise CtcspecError("the llama.cpp backend keeps its KV cache inside llama.cpp")

    def describe(self) -> dict:
        return {"backend": self.name, "gguf": self.gguf.name, "precision": self.precision,
                "llama_cpp_threads": self.threads}
