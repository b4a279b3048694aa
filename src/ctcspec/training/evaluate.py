"""Held-out evaluation of a draft module: how many draft tokens the base model would accept per step,
for each tree budget.

Exact for the positions scored: the distilled answers are the base model's own greedy output, so its
hidden states there are what decoding would hand the drafter, and a draft is accepted exactly as far
as it spells that output.
"""

from __future__ import annotations

import torch

from ctcspec.search import accepted_by_budget
from ctcspec.training.data import base_hidden, choose_anchors, draft_targets, pad_batch

BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SEARCH_BUDGETS = BUDGETS[:10]  # sequential drafters pay a forward per node: their curves stop at 32 nodes


@torch.no_grad()
def acceptance_curve(module, model, samples: list[dict], mode: str | None = None, budgets=BUDGETS,
                     max_anchors: int = 48, max_length: int = 1024, seed: int = 0) -> dict[int, float]:
    """Mean draft tokens the base model would accept, per tree budget, on held-out distilled sequences.

    `mode` is one of the module's `search_modes` (for the CTC module: its transform; default: the first),
    applied at up to `max_anchors` answer positions per sequence, as at inference.
    """
    mode = mode or module.search_modes[0]
    was_training = module.training
    module.eval()
    other = module.config.other_id
    totals, drafts = [0] * len(budgets), 0
    generator = torch.Generator().manual_seed(seed)
    device = module.embed_weight.device
    for sample in samples:
        tokens, lengths, prompt_lens = pad_batch([sample], max_length, device)
        anchors, valid = choose_anchors(lengths.cpu(), prompt_lens.cpu(), max_anchors, [generator])
        anchors, valid = anchors.to(device), valid.to(device)
        hidden = base_hidden(model, tokens, lengths, module.feature_layers)
        truth, truth_lengths = draft_targets(module, tokens, lengths, anchors, valid, module.draft_depth)
        kept = [a for a in range(anchors.shape[1]) if bool(valid[0, a])]
        if not kept:
            continue
        ranked = module.offline_nodes(hidden, tokens, [int(anchors[0, a]) for a in kept], max(budgets), mode)
        for a, nodes in zip(kept, ranked, strict=True):
            target = [t for t in truth[0, a, :int(truth_lengths[0, a])].tolist() if t != other]
            totals = [x + y for x, y in zip(totals, accepted_by_budget(nodes, target, budgets), strict=True)]
            drafts += 1
    module.train(was_training)
    return {b: total / max(drafts, 1) for b, total in zip(budgets, totals, strict=True)}
