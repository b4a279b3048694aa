"""Side-by-side benchmark: every drafter and HF `generate` on the same questions, in one run.

For each question turn the systems run one after another (in an order rotated per question, so
slow drift of the machine does not favour one system), each keeping its own conversation. The
report gives beta, tokens/s, speedup (mean and median over turns of tokens/s over the reference's
tokens/s, the paper's gamma) and how many outputs differ from vanilla.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ctcspec.bench.questions import Question
from ctcspec.bench.summary import HF, summarize
from ctcspec.cpu_kernels import plain_linear_layers
from ctcspec.drafters import Drafter
from ctcspec.engine import SpeculativeEngine, eos_ids_of
from ctcspec.prompts import encode_chat


@dataclass
class TurnRecord:
    question_id: str
    category: str
    turn: int
    tokens: list[int]
    steps: int
    seconds: float
    draft_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


@dataclass
class SystemRuns:
    name: str
    turns: list[TurnRecord] = field(default_factory=list)


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> TurnRecord:
    """Stock HF greedy `generate`: on the model's original linear layers even when the engines run packed ones."""
    from transformers import GenerationConfig

    eos = sorted(eos_ids_of(model))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                              pad_token_id=eos[0] if eos else 0)
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode(), plain_linear_layers(model):
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        seconds = time.perf_counter() - start
    tokens = out[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)  # be exact should anything follow EOS
    tokens = tokens if cut is None else tokens[: cut + 1]
    return TurnRecord("", "", 0, tokens, len(tokens), seconds, verify_s=seconds)


def run_system(name: str, engines: dict, model, prompt: list[int], max_new_tokens: int) -> TurnRecord:
    if name == HF:
        return hf_generate(model, prompt, max_new_tokens)
    result = engines[name].generate(prompt, max_new_tokens)
    s = result.stats
    return TurnRecord("", "", 0, result.tokens, s.steps, s.total_s, s.draft_s, s.verify_s, s.bookkeeping_s)


def run_bench(model, tokenizer, questions: list[Question], drafters: dict[str, Drafter], max_new_tokens: int,
              include_hf: bool = True, progress: bool = True) -> dict:
    names = [*drafters, HF] if include_hf else list(drafters)
    engines = {name: SpeculativeEngine(model, drafter) for name, drafter in drafters.items()}
    runs = {n: SystemRuns(n) for n in names}
    warm = encode_chat(tokenizer, [{"role": "user", "content": "Say hello."}])
    for name in names:  # first calls pay one-off costs; keep them out of the timings
        run_system(name, engines, model, warm, 8)
    units = sum(len(q.turns) for q in questions)
    bar = tqdm(total=units * len(names), desc="bench", unit="gen", disable=not progress)
    for qi, question in enumerate(questions):
        order = names[qi % len(names):] + names[: qi % len(names)]
        history = {n: [] for n in names}
        for turn_index, turn in enumerate(question.turns):
            for name in order:
                history[name].append({"role": "user", "content": turn})
                record = run_system(name, engines, model, encode_chat(tokenizer, history[name]), max_new_tokens)
                record.question_id, record.category, record.turn = question.question_id, question.category, turn_index
                runs[name].turns.append(record)
                answer = tokenizer.decode(record.tokens, skip_special_tokens=True)
                history[name].append({"role": "assistant", "content": answer})
                bar.update(1)
    bar.close()
    return summarize(runs, tokenizer)
