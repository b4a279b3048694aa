"""Helpers for CTC drafter tests: a draft module for a tiny base model, and fake distilled data."""

from __future__ import annotations

import json

import torch

from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.drafters.heads import HeadsDrafter
from ctcspec.modules import build_module
from ctcspec.modules.ctc import CTCConfig
from ctcspec.modules.heads import HeadsConfig
from ctcspec.training.distill import generate_batch


def tiny_module(model, seed: int = 0, vocab: int = 64, **options):
    base = model.config
    config = CTCConfig(hidden_size=base.hidden_size, num_heads=4, intermediate_size=96, draft_vocab_size=vocab,
                         **options)
    torch.manual_seed(seed)
    vocab_ids = torch.randperm(base.vocab_size)[:vocab].sort().values
    module = build_module("ctc", config, vocab_ids, model).eval()
    with torch.no_grad():  # a wide random init: spread the slot distributions so trees branch
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def tiny_ctc_drafter(model, seed: int = 0, tree_budget: int = 16, **options) -> CTCDrafter:
    return CTCDrafter(tiny_module(model, seed), budget=tree_budget, **options)


def write_distilled(model, path, count: int = 40, prompt_len: int = 6, answer_len: int = 30, seed: int = 0):
    """Greedy answers of `model` to random prompts, in the distill output format."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, model.config.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(count)]
    answers = generate_batch(model, prompts, answer_len, [], 0)
    path.mkdir(parents=True, exist_ok=True)
    with (path / "samples.jsonl").open("w") as f:
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            f.write(json.dumps({"index": i, "source": "test", "prompt_len": len(p), "ids": p + a}) + "\n")
    return path


def tiny_heads_module(model, kind: str, seed: int = 0, vocab: int = 64, depth: int = 4):
    """A randomly initialised (wide) Medusa / Hydra / EAGLE-style module for a tiny base model."""
    base = model.config
    config = HeadsConfig(kind=kind, hidden_size=base.hidden_size, draft_vocab_size=vocab, depth=depth,
                         intermediate_size=96, num_heads=4)
    torch.manual_seed(seed)
    vocab_ids = torch.randperm(base.vocab_size)[:vocab].sort().values
    module = build_module(kind, config, vocab_ids, model).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def tiny_heads_drafter(model, kind: str, seed: int = 0, tree_budget: int = 8):
    return HeadsDrafter(tiny_heads_module(model, kind, seed), budget=tree_budget)
