"""CTC paths over a draft's N slots, for the loss terms beside plain CTC: the probability that a draft's
collapsed output *starts with* the first k targets (what tree verification accepts is always a prefix), and
the single most likely alignment of the targets to the slots (which slot spells which target).

Both walk the usual CTC lattice: the targets y_1 .. y_L interleaved with blanks, b y_1 b y_2 .. y_L b
(states 0 .. 2L); a slot stays in its state, moves one on, or skips a blank between two different tokens.
A path's collapsed output starts with y_1 .. y_k exactly when it enters state 2k-1 (y_k) from another
state, which happens at one slot only; so P(prefix y_1..k) is the sum over slots of the probability of
entering state 2k-1 there, whatever the later slots do.

Shapes: log_probs (N, drafts, classes) log-softmaxed, as F.ctc_loss takes them; targets (drafts, K) class
ids padded past each draft's length; lengths (drafts,) with 1 <= length <= K. Impossible events score
below IMPOSSIBLE (log 0 is kept finite).
"""

from __future__ import annotations

import torch

NEG_INF = -1e30  # log 0, kept finite so that gradients through impossible states stay 0, not nan
IMPOSSIBLE = -1e29  # a path score below this went through an impossible state


def _lattice(log_probs: torch.Tensor, targets: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot, the log-probability of each lattice state's label (N, drafts, 2K+1), and which states
    may be entered by skipping the blank before them (drafts, 2K+1)."""
    drafts, k = targets.shape
    labels = torch.full((drafts, 2 * k + 1), blank, dtype=torch.long, device=targets.device)
    labels[:, 1::2] = targets
    emissions = log_probs.gather(2, labels.expand(log_probs.shape[0], -1, -1))
    skip = torch.zeros_like(labels, dtype=torch.bool)
    skip[:, 2:] = (labels[:, 2:] != blank) & (labels[:, 2:] != labels[:, :-2])
    return emissions, skip


def _shifted(scores: torch.Tensor, by: int) -> torch.Tensor:
    """scores (drafts, states) moved `by` states on: state u gets what state u-by had (-inf where none)."""
    return torch.nn.functional.pad(scores, (by, 0), value=NEG_INF)[:, :scores.shape[1]]


def prefix_log_probs(log_probs: torch.Tensor, targets: torch.Tensor, blank: int) -> torch.Tensor:
    """log P(the collapsed draft starts with y_1 .. y_k) for k = 1 .. K, shape (drafts, K); entries past a
    draft's length are not meaningful (the caller masks them)."""
    emissions, skip = _lattice(log_probs, targets, blank)
    masked = torch.full_like(emissions[0], NEG_INF)
    alpha = masked.clone()
    alpha[:, :2] = emissions[0, :, :2]
    entered = [masked.clone()]
    entered[0][:, 1] = emissions[0, :, 1]                                # y_1 at the first slot
    for s in range(1, emissions.shape[0]):
        from_skip = _shifted(alpha, 2).masked_fill(~skip, NEG_INF)
        enter = emissions[s] + torch.logaddexp(_shifted(alpha, 1), from_skip)
        entered.append(enter)
        alpha = torch.logaddexp(emissions[s] + alpha, enter)
    return torch.stack(entered).logsumexp(0)[:, 1::2]


@torch.no_grad()
def best_alignment(log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
                   blank: int) -> torch.Tensor:
    """The most likely path that spells exactly y_1 .. y_L: per draft and slot, the index (0-based) of the
    target the slot emits, or -1 for a blank (drafts, N). A draft whose targets cannot fit is all -1."""
    emissions, skip = _lattice(log_probs, targets, blank)
    n, drafts, states = emissions.shape
    score = torch.full_like(emissions[0], NEG_INF)
    score[:, :2] = emissions[0, :, :2]
    moves = []                                                             # per slot: states moved by (0, 1, 2)
    for s in range(1, n):
        options = torch.stack([score, _shifted(score, 1), _shifted(score, 2).masked_fill(~skip, NEG_INF)])
        best, move = options.max(0)
        moves.append(move)
        score = emissions[s] + best
    rows = torch.arange(drafts, device=targets.device)
    ends = torch.stack([score[rows, 2 * lengths], score[rows, 2 * lengths - 1]])
    end_score, pick = ends.max(0)
    state = 2 * lengths - pick
    path = [state]
    for move in reversed(moves):
        state = state - move[rows, state]
        path.append(state)
    path = torch.stack(path[::-1], dim=1)                                  # (drafts, N) lattice states
    emitted = torch.where(path % 2 == 1, (path - 1) // 2, -1)
    return emitted.masked_fill((end_score <= IMPOSSIBLE)[:, None], -1)
