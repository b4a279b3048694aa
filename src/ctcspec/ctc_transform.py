"""The CTC transform: slot distributions -> collapsed candidate continuations -> a draft trie.

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

`build_tree` turns candidates into a trie: a node's score is the summed probability of the
candidates that pass through it (an estimate of the chance the base model accepts it), and the
`budget` best nodes are kept; scores never grow with depth, so every kept node's parent is kept.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

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


def slotwise_nodes(log_probs: torch.Tensor, blank: int, other: int, max_nodes: int,
                   max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Transform off: slot i predicts depth i+1 directly; the best `max_nodes` nodes of that tree."""
    from ctcspec.draft_heads import best_first_nodes

    log_probs = log_probs.float().clone()
    log_probs[:, blank] = float("-inf")

    def expand(depth: int, cls: int | None) -> tuple[int, torch.Tensor]:
        depth = depth + 1
        return depth, log_probs[min(depth, len(log_probs) - 1)]

    depth = len(log_probs) if max_depth is None else min(max_depth, len(log_probs))
    return best_first_nodes(-1, expand, max_nodes, depth, top_k=max_nodes, other_id=other) if depth > 0 else []


def transform_nodes(log_probs: torch.Tensor, transform: str, top_k: int, beam_width: int, blank: int, other: int,
                    max_nodes: int, max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Ranked trie nodes (best first, parents before children) from slot log-probabilities."""
    if transform == "none":
        return slotwise_nodes(log_probs, blank, other, max_nodes, max_depth)
    if transform == "topk":
        candidates = topk_alignments(log_probs, top_k, beam_width, blank, other)
    else:
        candidates = prefix_beam_search(log_probs, top_k, beam_width, blank, other)
    return ranked_nodes(candidates, max_depth=max_depth)


def build_tree(nodes: list[tuple[int, ...]], budget: int, token_of_class: Sequence[int] | None = None) -> TokenTree:
    """The first `budget` ranked nodes as a TokenTree (class ids mapped to token ids)."""
    kept = sorted(nodes[:budget], key=len)  # parents before children
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
    """Draft tokens the base model would accept from the first b ranked nodes, for each budget b.

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
