"""The decoding loop: draft -> tree -> verify -> accept, until a stopping criterion, max_new_tokens or the context
limit.

Invariant between steps: the KV cache holds every token of `tokens` except the last one, the
"root", which the next verification forward runs together with the draft tree. Every emitted
token is one the base model chose after exactly its own prefix, under the same processors and the
same rule (argmax, or a draw from the processed softmax) as transformers' generate (decoding.py), so
the output equals decoding without a draft: token for token when greedy, in distribution when sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ctcspec.accept import accept_path
from ctcspec.backends import Backend, make_backend
from ctcspec.backends.base import HiddenLayers
from ctcspec.decoding import Decoding, NodeChooser, decoding_for
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree
from ctcspec.verify import node_parents, prefill, tree_precision_problem, verify_tree


@dataclass
class GenerationStats:
    new_tokens: int = 0
    steps: int = 0              # base-model forwards, prefill included (vanilla: one per token)
    drafted_nodes: int = 0      # draft tokens sent to verification
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0  # tree building, acceptance, cache compaction, stop checks
    total_s: float = 0.0
    stop_reason: str = ""

    @property
    def beta(self) -> float:
        """Mean tokens per base forward (the paper's beta; vanilla gives 1.0)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.verify_s + self.bookkeeping_s

    def to_dict(self) -> dict:
        decode = self.decode_s or 1.0
        return {**asdict(self), "beta": self.beta, "tokens_per_s": self.tokens_per_s,
                "draft_share": self.draft_s / decode, "verify_share": self.verify_s / decode,
                "bookkeeping_share": self.bookkeeping_s / decode}


@dataclass
class GenerationResult:
    tokens: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass(frozen=True)
class StepOutcome:
    tokens: list[int]              # accepted draft tokens, then the base model's next token
    path: list[int]                # verification nodes kept (0 = root); tokens[i] was chosen at node path[i]
    hidden: torch.Tensor | None    # base hidden states of the kept nodes, if asked for
    verify_s: float                # time of the base forward alone


def speculative_step(backend: Backend, cache, tokens: torch.Tensor, tree: TokenTree,
                     hidden_layers: HiddenLayers = None, decoding: Decoding | None = None) -> StepOutcome:
    """One verify-and-accept step (greedy unless `decoding` says otherwise). `cache` holds tokens[:-1];
    afterwards it holds the accepted path too."""
    past_len = len(tokens) - 1
    root = int(tokens[-1])
    start = time.perf_counter()
    verified = verify_tree(backend, cache, root, tree, hidden_layers)
    verify_s = time.perf_counter() - start
    choose = NodeChooser(decoding or Decoding(), verified.logits, tokens)
    accepted = accept_path([root, *tree.tokens], node_parents(tree), choose)
    backend.keep(cache, past_len, accepted.path)
    hidden = verified.hidden[accepted.path] if hidden_layers is not None else None
    return StepOutcome(accepted.tokens, accepted.path, hidden, verify_s)


def check_tree_tokens(tree: TokenTree, vocab_size: int, drafter_name: str) -> None:
    """Draft tokens must be ids of the base model's vocabulary."""
    if tree.tokens and not 0 <= min(tree.tokens) <= max(tree.tokens) < vocab_size:
        bad = next(t for t in tree.tokens if not 0 <= t < vocab_size)
        raise CtcspecError(f"the {drafter_name} drafter proposed token id {bad}, outside the base model's "
                           f"vocabulary (0..{vocab_size - 1})")


def check_drafter(model: torch.nn.Module, drafter: Drafter) -> None:
    """Refuse, by name, a drafter that could not run losslessly on this model: trees in a precision that rounds their
    rows differently, or base layers the model does not have."""
    if drafter.drafts and (problem := tree_precision_problem(model)):
        raise CtcspecError(f"the {drafter.name} drafter cannot run losslessly here: {problem}")
    layers = int(getattr(model.config, "num_hidden_layers", 0))
    if drafter.needs_hidden_states and any(not 0 <= i < layers for i in drafter.feature_layers):
        raise CtcspecError(f"the {drafter.name} drafter reads base layers {list(drafter.feature_layers)}; this "
                           f"model has layers 0 .. {layers - 1} beside its last")


def model_context(model: torch.nn.Module) -> int:
    """The tokens the model's positions cover (its config's max_position_embeddings)."""
    return int(getattr(model.config, "max_position_embeddings", 1 << 30))


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output embedding: the ids a draft token may take."""
    return model.get_output_embeddings().weight.shape[0]


class SpeculativeEngine:
    """Speculative decoding of one sequence with any `Drafter`, on any `Backend` (default: the best one for
    `model`, see backends.make_backend)."""

    def __init__(self, model: torch.nn.Module, drafter: Drafter, max_context: int | None = None,
                 max_tree_budget: int = 64, backend: Backend | None = None):
        if backend is not None and backend.model is not model:
            raise CtcspecError("the backend runs another model than the one given to the engine")
        check_drafter(model, drafter)
        self.backend = backend or make_backend(model)
        if drafter.needs_hidden_states and drafter.feature_layers and not self.backend.earlier_layers:
            raise CtcspecError(f"the {drafter.name} drafter reads base layers {list(drafter.feature_layers)} beside "
                               f"the last, which the {self.backend.name} backend does not return; use --backend "
                               "static or hf")
        self.model = model
        self.drafter = drafter
        self.max_context = max_context or model_context(model)
        self.max_tree_budget = max_tree_budget
        self.vocab_size = vocab_size(model)

    def context_limit_of(self) -> tuple[int, str]:
        """Tokens a sequence may hold (prompt and generation), and what limits it."""
        return self.backend.context_limit(self.max_context)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 on_tokens: Callable[[list[int]], None] | None = None, decoding: Decoding | None = None,
                 seed: int | None = None, **settings) -> GenerationResult:
        """Generate up to `max_new_tokens` as `model.generate(prompt, max_new_tokens=..., **settings)` would — greedy
        unless settings set do_sample=True; the model's generation_config applies as there — or as a prepared
        `decoding` (prepared for this prompt) says. `seed` makes sampling reproducible; `on_tokens` gets each
        step's new tokens."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise CtcspecError("the prompt is empty")
        if decoding is not None and (settings or seed is not None):
            raise CtcspecError("give generation settings and a seed, or a prepared decoding, not both")
        stats = GenerationStats()
        result = GenerationResult([], stats)
        if max_new_tokens <= 0:
            stats.stop_reason = "max_new_tokens"
            return result
        max_context, limit = self.context_limit_of()
        if len(prompt) >= max_context:
            raise CtcspecError(f"the prompt has {len(prompt)} tokens; {limit}, leaving no room to generate")
        start = time.perf_counter()  # preparing the settings counts, as in HF generate's own time
        if decoding is None:
            decoding = decoding_for(self.model, prompt, seed=seed, max_new_tokens=max_new_tokens, **settings)
        token_limit = min(max_new_tokens, max_context - len(prompt))  # the sequence never outgrows the context
        # room for the prompt, a first stretch of generation and one tree; a static cache grows past it if needed
        cache = self.backend.new_cache(min(max_context, len(prompt) + min(token_limit, 1024) + self.max_tree_budget))
        hidden = self.drafter.feature_layers if self.drafter.needs_hidden_states else None
        self.drafter.reset()
        first = prefill(self.backend, cache, prompt, hidden)
        new = [NodeChooser(decoding, first.logits, torch.tensor(prompt))(0, [])]
        stats.steps = 1
        stats.prefill_s = time.perf_counter() - start
        tokens = torch.tensor(prompt + new)
        stop = emit_tokens(result, tokens, new, decoding, token_limit, on_tokens)
        new_hidden, accepted = first.hidden, 0

        while not stop:
            t0 = time.perf_counter()
            room = max_context - len(tokens)  # the cache never holds more than max_context entries
            request = DraftRequest(tokens, max_depth=room, accepted=accepted, new_hidden=new_hidden)
            tree = self.drafter.propose(request)
            t1 = time.perf_counter()
            tree = tree.truncated(min(self.max_tree_budget, room), room)  # also merges duplicate prefixes
            check_tree_tokens(tree, self.vocab_size, self.drafter.name)
            t2 = time.perf_counter()
            step = speculative_step(self.backend, cache, tokens, tree, hidden, decoding=decoding)
            t3 = time.perf_counter()
            new_hidden, accepted = step.hidden, len(step.path) - 1
            tokens = torch.cat([tokens, torch.tensor(step.tokens)])
            stop = emit_tokens(result, tokens, step.tokens, decoding, token_limit, on_tokens)
            t4 = time.perf_counter()
            stats.steps += 1
            stats.drafted_nodes += len(tree)
            stats.draft_s += t1 - t0
            stats.verify_s += step.verify_s
            stats.bookkeeping_s += (t2 - t1) + (t3 - t2 - step.verify_s) + (t4 - t3)
        if stats.stop_reason == "max_new_tokens" and token_limit < max_new_tokens:
            stats.stop_reason = "context_limit"
        stats.total_s = time.perf_counter() - start
        return result


def emit_tokens(result: GenerationResult, sequence: torch.Tensor, new: list[int], decoding: Decoding, token_limit: int,
                on_tokens: Callable[[list[int]], None] | None) -> bool:
    """Append a step's tokens `new` (the end of `sequence`), cut after the first that ends generation: EOS,
    max_new_tokens, or a stopping criterion (called with that token's prefix and, as generate calls it without
    output_scores, no scores). True when it ended."""
    stats = result.stats
    ids = sequence[None].to(decoding.device) if decoding.stopping else None
    keep = 0
    for i, token in enumerate(new):
        keep = i + 1
        end = len(sequence) - len(new) + keep
        if token in decoding.eos:
            stats.stop_reason = "eos"
        elif len(result.tokens) + keep >= token_limit:
            stats.stop_reason = "max_new_tokens"
        elif decoding.stopping and bool(decoding.stopping(ids[:, :end], None).any()):
            stats.stop_reason = "stopping_criteria"
        if stats.stop_reason:
            break
    new = new[:keep]
    result.tokens.extend(new)
    stats.new_tokens = len(result.tokens)
    if on_tokens and new:
        on_tokens(new)
    return bool(stats.stop_reason)


__all__ = ["GenerationResult", "GenerationStats", "SpeculativeEngine", "TokenTree", "check_drafter", "emit_tokens"]
