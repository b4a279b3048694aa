"""Batched speculative decoding with continuous batching: several sequences advance together, one base forward a
step, and sequences join and leave at step boundaries.

Each step every active sequence's drafter proposes a tree for that sequence alone; the roots and trees of all of them
run in one forward (batch_cache.BatchRunner: one row per sequence, per-row positions, one mask), and each sequence
accepts on its own rows exactly as the one-sequence engine does (engine.speculative_step's rule, with its own
decoding settings and stop conditions). So each sequence's output is what that prompt alone gives with `model.generate`
— token for token when greedy, in distribution when sampling — whatever else shares its batch.

Invariant between steps, per active sequence: its cache row holds every token of its `tokens` but the last (the root).
Joining sequences are prefilled together in one forward of their own, then merged into the batch; finished ones leave.
Each sequence has its own drafter (`Drafter.fork`: the same network, its own state) and its own budget policy.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ctcspec.accept import accept_path
from ctcspec.backends.hf import HFBackend
from ctcspec.batch_cache import BatchCache, BatchRunner
from ctcspec.decoding import Decoding, NodeChooser, decoding_for
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.engine import (
    GenerationResult,
    check_drafter,
    check_tree_tokens,
    emit_tokens,
    model_context,
    vocab_size,
)
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree
from ctcspec.verify import node_parents


@dataclass
class SequenceState:
    """One request in the batch and everything that is its own."""
    id: int
    prompt: list[int]
    decoding: Decoding
    drafter: Drafter
    token_limit: int
    max_new_tokens: int
    on_tokens: Callable[[list[int]], None] | None
    tokens: torch.Tensor = field(init=False)
    started: float = 0.0            # when it joined the batch (its prefill began): its stats time from there
    result: GenerationResult = field(default_factory=lambda: GenerationResult([]))
    new_hidden: torch.Tensor | None = None
    accepted: int = 0
    tree: TokenTree = field(default_factory=TokenTree)

    def __post_init__(self) -> None:
        self.tokens = torch.tensor(self.prompt)


class BatchEngine:
    """Speculative decoding of up to `max_batch` sequences at once, each with its own fork of `drafter`.

    `submit` queues a request and returns its id; `step` admits queued requests (up to `max_batch` active), runs one
    step for every active one and returns those that finished, by id; `generate` does both for a list of prompts.
    The base model runs its own HF forward (batch_cache.py), whatever backend the one-sequence engine would use."""

    def __init__(self, model: torch.nn.Module, drafter: Drafter, max_batch: int = 8, max_context: int | None = None,
                 max_tree_budget: int = 64, backend: str = "auto"):
        if max_batch < 1:
            raise CtcspecError(f"the batch size must be at least 1, got {max_batch}")
        check_drafter(model, drafter)
        self.runner = BatchRunner(model, backend)  # refuses, by name, what cannot be verified exactly
        self.model, self.drafter, self.max_batch = model, drafter, max_batch
        self.max_context, self.context_note = HFBackend(model).context_limit(max_context or model_context(model))
        self.max_tree_budget = max_tree_budget
        self.vocab_size = vocab_size(model)
        self.hidden_layers = drafter.feature_layers if drafter.needs_hidden_states else None
        self._ids = itertools.count()
        self.forwards = 0       # batched forwards so far (prefills included)
        self.nodes = 0          # nodes run in them (roots, draft nodes, prompts; padding not counted)
        self.clear()

    def clear(self) -> None:
        """Drop every request, active or waiting (after a failed step)."""
        self.cache = BatchCache.empty(self.model, 0, 1)
        self.active: list[SequenceState] = []
        self.waiting: list[SequenceState] = []
        self.finished: dict[int, GenerationResult] = {}
        self.last_forwards: list[tuple[int, int]] = []  # (sequences, nodes) of each forward of the last step

    def context_limit_of(self) -> tuple[int, str]:
        """Tokens a sequence may hold (prompt and generation), and what limits it."""
        return self.max_context, self.context_note

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int,
               on_tokens: Callable[[list[int]], None] | None = None, decoding: Decoding | None = None,
               seed: int | None = None, **settings) -> int:
        """Queue a request, as SpeculativeEngine.generate takes it; it joins the batch at the next step."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise CtcspecError("the prompt is empty")
        if decoding is not None and (settings or seed is not None):
            raise CtcspecError("give generation settings and a seed, or a prepared decoding, not both")
        if len(prompt) >= self.max_context:
            raise CtcspecError(f"the prompt has {len(prompt)} tokens; {self.context_note}, leaving no room to "
                               "generate")
        if decoding is None:
            decoding = decoding_for(self.model, prompt, seed=seed, max_new_tokens=max(max_new_tokens, 1), **settings)
        token_limit = min(max_new_tokens, self.max_context - len(prompt))
        sequence = SequenceState(next(self._ids), prompt, decoding, self.drafter.fork(), token_limit, max_new_tokens,
                             on_tokens)
        if max_new_tokens <= 0:
            sequence.result.stats.stop_reason = "max_new_tokens"
            self.finished[sequence.id] = sequence.result
        else:
            self.waiting.append(sequence)
        return sequence.id

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def step(self) -> dict[int, GenerationResult]:
        """Admit queued requests, advance every active one by one step; the requests that finished, by id."""
        self.last_forwards = []
        joining = self.waiting[:self.max_batch - len(self.active)]
        self.waiting = self.waiting[len(joining):]
        if joining:
            self._prefill(joining)
        if self.active:
            self._advance()
        done, self.finished = self.finished, {}
        return done

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seeds: Sequence[int | None] | None = None,
                 **settings) -> list[GenerationResult]:
        """Every prompt's generation, as SpeculativeEngine.generate gives it for that prompt alone, batched."""
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        ids = [self.submit(prompt, max_new_tokens, seed=seed, **settings) for prompt, seed in zip(prompts, seeds,
                                                                                                  strict=True)]
        results = self.step()
        while self.busy:
            results.update(self.step())
        return [results[i] for i in ids]

    def _prefill(self, joining: list[SequenceState]) -> None:
        """Run the joining prompts in one forward of their own, choose each one's first token, merge their rows."""
        start = time.perf_counter()
        for sequence in joining:
            sequence.started = start
        cache = BatchCache.empty(self.model, len(joining), max(len(s.prompt) for s in joining) + 64)
        chains = [list(range(-1, len(s.prompt) - 1)) for s in joining]
        rows = self.runner.forward(cache, [s.prompt for s in joining], chains, self.hidden_layers, last_only=True)
        cache.keep([list(range(len(s.prompt))) for s in joining])
        self._count(len(joining), sum(len(s.prompt) for s in joining))
        elapsed = time.perf_counter() - start
        stay = []
        for sequence, row in zip(joining, rows, strict=True):
            stats = sequence.result.stats
            first = NodeChooser(sequence.decoding, row.logits, sequence.tokens)(0, [])
            stats.steps, stats.prefill_s = 1, elapsed
            sequence.new_hidden = row.hidden
            stay.append(not self._emit(sequence, [first]))
        self.cache.merge(cache)
        stay = [True] * len(self.active) + stay
        self.active.extend(joining)
        self._leave(stay)

    def _advance(self) -> None:
        """One draft-verify-accept step for every active sequence, in one base forward."""
        for sequence in self.active:
            t0 = time.perf_counter()
            room = self.max_context - len(sequence.tokens)
            request = DraftRequest(sequence.tokens, max_depth=room, accepted=sequence.accepted,
                                   new_hidden=sequence.new_hidden, batch=len(self.active))
            tree = sequence.drafter.propose(request).truncated(min(self.max_tree_budget, room), room)
            check_tree_tokens(tree, self.vocab_size, sequence.drafter.name)
            sequence.tree = tree
            sequence.result.stats.draft_s += time.perf_counter() - t0
        start = time.perf_counter()
        nodes = [[int(s.tokens[-1]), *s.tree.tokens] for s in self.active]
        parents = [node_parents(s.tree) for s in self.active]
        rows = self.runner.forward(self.cache, nodes, parents, self.hidden_layers)
        verify_s = time.perf_counter() - start
        self._count(len(nodes), sum(map(len, nodes)))
        paths, stay = [], []
        for sequence, row, row_nodes, row_parents in zip(self.active, rows, nodes, parents, strict=True):
            t0 = time.perf_counter()
            accepted = accept_path(row_nodes, row_parents, NodeChooser(sequence.decoding, row.logits, sequence.tokens))
            paths.append(accepted.path)
            sequence.new_hidden = row.hidden[accepted.path] if row.hidden is not None else None
            sequence.accepted = len(accepted.path) - 1
            stats = sequence.result.stats
            stats.steps += 1
            stats.drafted_nodes += len(sequence.tree)
            stats.verify_s += verify_s
            stay.append(not self._emit(sequence, accepted.tokens))
            stats.bookkeeping_s += time.perf_counter() - t0
        self.cache.keep(paths)
        self._leave(stay)

    def _count(self, sequences: int, nodes: int) -> None:
        self.forwards += 1
        self.nodes += nodes
        self.last_forwards.append((sequences, nodes))

    def _emit(self, sequence: SequenceState, new: list[int]) -> bool:
        """Append a step's tokens to the sequence and its result (engine.emit_tokens: cut at a stop, as the
        one-sequence engine does); True when it finished."""
        sequence.tokens = torch.cat([sequence.tokens, torch.tensor(new, dtype=sequence.tokens.dtype)])
        result = sequence.result
        stop = emit_tokens(result, sequence.tokens, new, sequence.decoding, sequence.token_limit, sequence.on_tokens)
        if stop:
            stats = result.stats
            if stats.stop_reason == "max_new_tokens" and sequence.token_limit < sequence.max_new_tokens:
                stats.stop_reason = "context_limit"
            stats.total_s = time.perf_counter() - sequence.started
            self.finished[sequence.id] = result
        return stop

    def _leave(self, stay: list[bool]) -> None:
        """Drop the rows of the sequences that finished."""
        if all(stay):
            return
        keep = [i for i, kept in enumerate(stay) if kept]
        self.active = [self.active[i] for i in keep]
        self.cache.select(keep)
