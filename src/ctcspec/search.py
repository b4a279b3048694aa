"""Every way draft nodes are ranked and cut to a tree budget: the CTC transform, best-first search
over a draft network's distributions, the budgeted trie, and offline acceptance per budget.

A draft node is a path of class ids from the root. Every ranking here returns nodes best first with
parents before children, so the first b nodes always form a tree: `build_tree` keeps them.

The CTC transform: slot distributions -> collapsed candidate continuations -> a draft trie.

A slot emits a class per frame: a draft-vocabulary token, "other" (a token the drafter cannot
name; the draft ends there) or the blank. An alignment collapses to a token sequence by merging
consecutive repeats and deleting blanks ("a a _ b b" -> "a b"; "a _ a" -> "a a").

Two ways to get candidates, both returning {collapsed prefix: probability}:
- `topk_alignments` (the paper's way): per-slot top-k classes combined into whole alignments,
  the most probable ones kept, each collapsed; alignments that collapse alike add up.
- `prefix_beam_search`: CTC prefix beam search, which scores each collapsed prefix by the summed
  probability of all alignments (within the beam) that produce it, frame by frame.

`none` is the ablation without the transform: slot i's distribution (blank excluded) is read as
the token at depth i, Medusa-style, and the best nodes of that per-slot top-k tree are taken.

`best_first_nodes` ranks the nodes of any draft network that scores one tree level at a time
(Medusa, Hydra, EAGLE-style): a node's score is its path log-probability, and nodes leave a heap best
first, so a node's children are computed only when it is taken (one small forward for the sequential
drafters).

`build_tree` turns ranked nodes into a trie: a node's score is the summed probability of the
candidates that pass through it (an estimate of the chance the base model accepts it), and the
`tree_budget` best nodes are kept; scores never grow with depth, so every kept node's parent is kept.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ctcspec.tree import ROOT, TokenTree

TRANSFORMS = ("beam", "topk", "none")


def collapse(alignment: Sequence[int], blank: int, other: int) -> tuple[int, ...]:
    out: list[int] = []
    previous = None
    for cls in alignment:
        if cls == other:
            break
        if cls != blank and cls != previous:
            out.append(cls)
        previous = cls
    return tuple(out)


def topk_alignments(log_probs: torch.Tensor, top_k: int, num_paths: int, blank: int,
                    other: int) -> dict[tuple[int, ...], float]:
    """Best `num_paths` alignments over per-slot top-k classes, collapsed, probabilities summed."""
    values, indices = log_probs.topk(top_k, dim=-1)
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for frame_values, frame_indices in zip(values.tolist(), indices.tolist(), strict=True):
        grown = [(a + (c,), s + v) for a, s in beams for c, v in zip(frame_indices, frame_values, strict=True)]
        grown.sort(key=lambda item: item[1], reverse=True)
        beams = grown[:num_paths]
    candidates: dict[tuple[int, ...], float] = defaultdict(float)
    for alignment, score in beams:
        candidates[collapse(alignment, blank, other)] += math.exp(score)
    return dict(candidates)


def prefix_beam_search(log_probs: torch.Tensor, top_k: int, beam_width: int, blank: int,
                       other: int) -> dict[tuple[int, ...], float]:
    """CTC prefix beam search; probability of each surviving prefix after the last frame.

    Classes are draft-vocabulary tokens first, then "other" and blank; each frame extends the
    beam with its `top_k` most probable tokens (a prefix's last token is always considered too,
    as a repeat that merges into it).
    """
    probs = log_probs.exp()
    tokens = probs[:, :min(blank, other)]  # real tokens come first; "other" and blank are the last classes
    top = tokens.topk(min(top_k, tokens.shape[1]), dim=-1).indices
    # Every prefix is built from top-k tokens, so those columns (and blank) are all the search reads:
    # move only them to Python, never a whole vocabulary row.
    columns = sorted({*top.flatten().tolist(), blank})
    frames = [dict(zip(columns, row, strict=True)) for row in probs[:, columns].tolist()]
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (1.0, 0.0)}  # prefix -> (ends in blank, not)
    for frame, extend_with in zip(frames, top.tolist(), strict=True):
        grown: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
        p_blank = frame[blank]
        for prefix, (pb, pnb) in beams.items():
            total = pb + pnb
            grown[prefix][0] += total * p_blank
            if prefix:
                grown[prefix][1] += pnb * frame[prefix[-1]]  # a repeat merges into the last token
            for cls in extend_with:
                p = frame[cls]
                if prefix and cls == prefix[-1]:
                    if pb > 0.0:  # a repeated token needs a blank between
                        grown[prefix + (cls,)][1] += pb * p
                else:
                    grown[prefix + (cls,)][1] += total * p
        best = sorted(grown.items(), key=lambda item: item[1][0] + item[1][1], reverse=True)[:beam_width]
        beams = {prefix: (pb, pnb) for prefix, (pb, pnb) in best}
    return {prefix: pb + pnb for prefix, (pb, pnb) in beams.items()}


def node_scores(candidates: dict[tuple[int, ...], float]) -> dict[tuple[int, ...], float]:
    """Every non-empty prefix of every candidate, scored by the candidates passing through it."""
    scores: dict[tuple[int, ...], float] = defaultdict(float)
    for candidate, p in candidates.items():
        for depth in range(1, len(candidate) + 1):
            scores[candidate[:depth]] += p
    return dict(scores)


def ranked_nodes(candidates: dict[tuple[int, ...], float], max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Trie nodes best first (score, then shallower first so parents precede children on ties)."""
    scores = node_scores(candidates)
    nodes = [n for n in scores if max_depth is None or len(n) <= max_depth]
    nodes.sort(key=lambda n: (-scores[n], len(n), n))
    return nodes


def slotwise_nodes(log_probs: torch.Tensor, blank: int, other: int, tree_budget: int,
                   max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Transform off: slot i predicts depth i+1 directly; the best `tree_budget` nodes of that tree."""
    log_probs = log_probs.float().clone()
    log_probs[:, blank] = float("-inf")

    def expand(depth: int, cls: int | None) -> tuple[int, torch.Tensor]:
        depth = depth + 1
        return depth, log_probs[min(depth, len(log_probs) - 1)]

    depth = len(log_probs) if max_depth is None else min(max_depth, len(log_probs))
    return best_first_nodes(-1, expand, tree_budget, depth, top_k=tree_budget, other_id=other) if depth > 0 else []


def transform_nodes(log_probs: torch.Tensor, transform: str, top_k: int, beam_width: int, blank: int, other: int,
                    tree_budget: int, max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Ranked trie nodes (best first, parents before children) from slot log-probabilities."""
    if transform == "none":
        return slotwise_nodes(log_probs, blank, other, tree_budget, max_depth)
    if transform == "topk":
        candidates = topk_alignments(log_probs, top_k, beam_width, blank, other)
    else:
        candidates = prefix_beam_search(log_probs, top_k, beam_width, blank, other)
    return ranked_nodes(candidates, max_depth=max_depth)


Expand = Callable[[Any, int | None], tuple[Any, torch.Tensor]]


def best_first_nodes(root_state: Any, expand: Expand, tree_budget: int, max_depth: int, top_k: int,
                     other_id: int) -> list[tuple[int, ...]]:
    """Up to `tree_budget` draft nodes, best (highest path log-probability) first.

    expand(parent_state, class_id) gives the state of the child reached by class_id and the
    log-probabilities (classes,) of its own children; expand(root_state, None) those of the root.
    "other" is never drafted (the base model will pick a token the drafter cannot name).
    """
    counter = itertools.count()
    heap: list = []

    def push_children(path: tuple[int, ...], score: float, state: Any, log_probs: torch.Tensor) -> None:
        if len(path) >= max_depth:
            return
        log_probs = log_probs.float().clone()
        log_probs[other_id] = float("-inf")
        values, ids = log_probs.topk(min(top_k, log_probs.shape[0] - 1))
        for value, cls in zip(values.tolist(), ids.tolist(), strict=True):
            if value == float("-inf"):  # excluded classes (other; the CTC blank) are never drafted
                break
            heapq.heappush(heap, (-(score + value), next(counter), path + (cls,), state))

    root, log_probs = expand(root_state, None)
    push_children((), 0.0, root, log_probs)
    nodes: list[tuple[int, ...]] = []
    while heap and len(nodes) < tree_budget:
        neg_score, _, path, parent_state = heapq.heappop(heap)
        nodes.append(path)
        if len(nodes) < tree_budget and len(path) < max_depth:  # the last node's children are never needed
            state, log_probs = expand(parent_state, path[-1])
            push_children(path, -neg_score, state, log_probs)
    return nodes


def module_nodes(module, context, tree_budget: int, max_depth: int) -> list[tuple[int, ...]]:
    """The best `tree_budget` draft nodes of a level-by-level draft network after `context`: exactly the
    best, since every node may take up to `tree_budget` children. `module` offers search_root(context)
    and expand(state, class_id) (modules/heads.py)."""
    depth = min(max_depth, module.draft_depth)
    if depth < 1 or tree_budget < 1:
        return []
    return best_first_nodes(module.search_root(context), module.expand, tree_budget, depth, top_k=tree_budget,
                            other_id=module.config.other_id)


def build_tree(nodes: list[tuple[int, ...]], tree_budget: int,
               token_of_class: Sequence[int] | None = None) -> TokenTree:
    """The first `tree_budget` ranked nodes as a TokenTree (class ids mapped to token ids)."""
    kept = sorted(nodes[:tree_budget], key=len)  # parents before children
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for node in kept:
        parent = ROOT if len(node) == 1 else index.get(node[:-1])
        if parent is None:  # cannot happen for ranked nodes; skip rather than build a broken tree
            continue
        index[node] = len(tokens)
        tokens.append(int(token_of_class[node[-1]]) if token_of_class is not None else node[-1])
        parents.append(parent)
    return TokenTree(tuple(tokens), tuple(parents))


def accepted_by_budget(nodes: list[tuple[int, ...]], truth: Sequence[int], budgets: Sequence[int]) -> list[int]:
    """Draft tokens the base model would accept from the first b ranked nodes, for each tree budget b.

    `truth` is the base model's own continuation (class ids); acceptance is the longest prefix of
    it that the tree holds.
    """
    rank = {node: i for i, node in enumerate(nodes)}
    needed: list[int] = []  # needed[d-1]: nodes required to hold truth[:d]
    worst = -1
    for depth in range(1, len(truth) + 1):
        r = rank.get(tuple(truth[:depth]))
        if r is None:
            break
        worst = max(worst, r)
        needed.append(worst + 1)
    return [sum(1 for n in needed if n <= b) for b in budgets]
