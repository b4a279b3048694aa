"""Batched throughput (`ctcspec bench --batch-size B`): every system decodes the same prompts, up to B at a time,
side by side in one run.

The prompts are the first turn of each question (a batch cannot wait for a second turn's history). All requests
arrive at once: each ctcspec drafter runs them through a `BatchEngine` of B sequences (continuous batching: a new
request joins as soon as one finishes), HF `generate` runs them B at a time, left-padded, each group until its longest
answer ends (what `model.generate` on a list of prompts does). Per system: the total output tokens per second, the
latency of every request from the start of the run to its last token (median and 95th percentile), tokens per base
forward per sequence, draft nodes verified per sequence-step (how much the budget rule let the drafter speculate at
this batch size), and how many outputs differ from vanilla's (which is HF greedy on each prompt alone; HF's own
padded batch may differ where padding changes the rounding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ctcspec.batch import BatchEngine
from ctcspec.bench.run import GREEDY
from ctcspec.bench.summary import HF
from ctcspec.cpu_kernels import plain_linear_layers
from ctcspec.decoding import eos_ids


@dataclass(frozen=True)
class BatchRun:
    system: str
    outputs: list[list[int]]    # per prompt, in prompt order
    latencies: list[float]      # per prompt: seconds from the start of the run to its last token
    seconds: float              # the whole run
    forwards: int               # base forwards over the batch
    steps: int                  # sequence-steps: forwards each sequence took part in, summed
    drafted: int = 0            # draft nodes verified, all sequences

    def row(self, reference: BatchRun | None, hf: BatchRun | None) -> dict:
        tokens = sum(map(len, self.outputs))
        rate = tokens / self.seconds if self.seconds else 0.0
        hf_rate = sum(map(len, hf.outputs)) / hf.seconds if hf and hf.seconds else None
        differ = None if reference is None else sum(a != b for a, b in zip(self.outputs, reference.outputs,
                                                                            strict=True))
        return {"system": self.system, "new_tokens": tokens, "seconds": self.seconds, "tokens_per_s": rate,
                "vs_hf": rate / hf_rate if hf_rate else None, "beta": tokens / self.steps if self.steps else None,
                "drafted_per_step": self.drafted / self.steps if self.steps else 0.0, "forwards": self.forwards,
                "latency_p50_s": float(np.median(self.latencies)),
                "latency_p95_s": float(np.percentile(self.latencies, 95)), "differ_from_vanilla": differ}


def run_engine_batch(name: str, engine: BatchEngine, prompts: list[list[int]], max_new_tokens: int,
                     settings: dict, seeds: list[int]) -> BatchRun:
    """Every prompt through `engine`, all submitted at once."""
    sampling = settings.get("do_sample", False)
    start = time.perf_counter()
    forwards = engine.forwards
    ids = [engine.submit(prompt, max_new_tokens, seed=seed if sampling else None, **settings)
           for prompt, seed in zip(prompts, seeds, strict=True)]
    results, finished = {}, {}
    while engine.busy:
        for request, result in engine.step().items():
            results[request], finished[request] = result, time.perf_counter() - start
    seconds = time.perf_counter() - start
    return BatchRun(name, [results[i].tokens for i in ids], [finished[i] for i in ids], seconds,
                    engine.forwards - forwards, sum(results[i].stats.steps for i in ids),
                    sum(results[i].stats.drafted_nodes for i in ids))


def run_hf_batch(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, settings: dict,
                 seed: int) -> BatchRun:
    """HF `generate` on `batch_size` prompts at a time, left-padded, on the model's original linear layers."""
    eos = sorted(eos_ids(model.generation_config))
    pad = eos[0] if eos else 0
    outputs, latencies, steps, forwards = [], [], 0, 0
    torch.manual_seed(seed)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        group = prompts[first:first + batch_size]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=model.device)
        with torch.inference_mode(), plain_linear_layers(model):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                                 pad_token_id=pad, **{**GREEDY, **settings})
        done = time.perf_counter() - start
        forwards += out.shape[1] - width
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            outputs.append(row if cut is None else row[:cut + 1])
            latencies.append(done)
            steps += out.shape[1] - width
    return BatchRun(HF, outputs, latencies, time.perf_counter() - start, forwards, steps)


def batch_table(rows: list[dict]) -> str:
    """The markdown table of `BatchRun.row`s."""
    header = ["system", "tok/s", "vs HF batched", "β per sequence", "draft nodes per step", "forwards",
              "latency p50 (s)", "latency p95 (s)", "differ from vanilla"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        differ = r["differ_from_vanilla"]
        cells = [r["system"], f"{r['tokens_per_s']:.1f}", f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-",
                 f"{r['beta']:.2f}" if r["beta"] else "-", f"{r['drafted_per_step']:.2f}", str(r["forwards"]),
                 f"{r['latency_p50_s']:.1f}",
                 f"{r['latency_p95_s']:.1f}", "-" if differ is None else str(differ)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
