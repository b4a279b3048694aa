"""Side-by-side benchmark: every drafter and HF `generate` on the same questions, in one run.

The systems are ctcspec engines (one per drafter), HF `generate` and, optionally, peer systems
(llama.cpp, bench/peers.py), each behind one `Runner`. For each question turn the systems run one
after another (in an order rotated per question, so slow drift of the machine does not favour one
system), each keeping its own conversation. Results
come out question by question as per-turn records (see `TurnRecord.to_dict`), so a caller can save
each question as soon as it is done; summary.py turns the records into beta, tokens/s, speedups and
how many outputs differ from vanilla.

Every system decodes with the same generation settings (`model.generate` keyword arguments: greedy, or
sampling) and, per question turn, the same seed (`turn_seed`). Sampled outputs cannot be compared token for
token, so when sampling each turn also records the log-likelihood of its output under the base model
(`output_loglik`): a system whose sampler drifted from the base distribution shows another mean per token
than HF generate's.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ctcspec.backends import Backend
from ctcspec.bench.questions import Question
from ctcspec.bench.summary import HF
from ctcspec.cpu_kernels import plain_linear_layers
from ctcspec.decoding import eos_ids
from ctcspec.drafters import Drafter
from ctcspec.engine import SpeculativeEngine
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
    loglik: float | None = None  # sampling: the output's log-likelihood under the base model (output_loglik)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0

    def to_dict(self, system: str, text: str) -> dict:
        """The saved form of one turn (one line of turns.jsonl), JSON-serialisable."""
        return {"system": system, "question_id": self.question_id, "category": self.category, "turn": self.turn,
                "new_tokens": len(self.tokens), "steps": self.steps, "seconds": self.seconds,
                "draft_s": self.draft_s, "verify_s": self.verify_s, "bookkeeping_s": self.bookkeeping_s,
                "tokens": list(self.tokens), "text": text, **({} if self.loglik is None else {"loglik": self.loglik})}


def bench_systems(drafter_names: list[str], include_hf: bool = True, peers: Sequence[str] = ()) -> list[str]:
    """The systems a bench runs, in report order: the drafters, HF generate unless left out, then the peers."""
    return [*drafter_names, *([HF] if include_hf else []), *peers]


GREEDY = {"do_sample": False}  # the generation settings of a greedy run


def turn_seed(seed: int, question_id: str, turn: int) -> int:
    """The seed every system samples one question turn with: a function of (seed, question id, turn) alone, so a
    question gets the same seeds whatever else a run selects, resumed or not."""
    digest = hashlib.sha256(f"{seed}/{question_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def output_loglik(model, prompt: list[int], tokens: list[int], temperature: float) -> float:
    """The sum over `tokens` of log p(token | prompt + the tokens before it), p the softmax of the base model's raw
    logits divided by `temperature` (no other processor), teacher-forced in one forward; 0 for no tokens."""
    if not tokens:
        return 0.0
    ids = torch.tensor([prompt + tokens], device=model.device)
    with torch.inference_mode():
        logits = model(ids, use_cache=False, logits_to_keep=len(tokens) + 1).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return float(logprobs.gather(1, ids[0, len(prompt):, None]).sum())


def hf_generate(model, prompt: list[int], max_new_tokens: int, seed: int | None = None, **settings) -> TurnRecord:
    """Stock HF `generate(do_sample=False, **settings)` (the model's generation_config merged in), on the model's
    original linear layers even when the engines run packed ones; sampling after torch.manual_seed(seed)."""
    eos = sorted(eos_ids(model.generation_config))
    ids = torch.tensor([prompt], device=model.device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode(), plain_linear_layers(model):
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0, **{**GREEDY, **settings})
        seconds = time.perf_counter() - start
    tokens = out[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)  # be exact should anything follow EOS
    tokens = tokens if cut is None else tokens[: cut + 1]
    return TurnRecord("", "", 0, tokens, len(tokens), seconds, verify_s=seconds)


Runner = Callable[[list[int], int, int], TurnRecord]  # (prompt ids, max new tokens, seed) -> one turn
Scorer = Callable[[list[int], list[int]], float]  # (prompt ids, output ids) -> the output's log-likelihood


def engine_runner(engine: SpeculativeEngine, settings: dict) -> Runner:
    def run(prompt: list[int], max_new_tokens: int, seed: int) -> TurnRecord:
        result = engine.generate(prompt, max_new_tokens, seed=seed, **settings)
        s = result.stats
        return TurnRecord("", "", 0, result.tokens, s.steps, s.total_s, s.draft_s, s.verify_s, s.bookkeeping_s)
    return run


def peer_runner(peer) -> Runner:
    """A peer system (bench/peers.py): greedy only (the seed is unused); only its total time is known, no
    draft/verify split."""
    def run(prompt: list[int], max_new_tokens: int, seed: int) -> TurnRecord:
        result = peer.generate(prompt, max_new_tokens)
        return TurnRecord("", "", 0, result.tokens, result.steps, result.seconds, verify_s=result.seconds)
    return run


def system_runners(backend: Backend, drafters: dict[str, Drafter], peers: dict | None = None,
                   settings: dict | None = None) -> dict[str, Runner]:
    """Every system a bench can run, by name: one engine per drafter, HF `generate`, and the given peers; the
    engines and HF generate decode with the generation `settings` (default: greedy)."""
    settings = settings or GREEDY
    runners = {name: engine_runner(SpeculativeEngine(backend.model, drafter, backend=backend), settings)
               for name, drafter in drafters.items()}
    runners[HF] = lambda prompt, max_new_tokens, seed: hf_generate(backend.model, prompt, max_new_tokens, seed,
                                                                   **settings)
    runners.update({name: peer_runner(peer) for name, peer in (peers or {}).items()})
    return runners


def run_question(question: Question, order: list[str], runners: dict[str, Runner], tokenizer,
                 max_new_tokens: int, bar: tqdm, seed: int = 0, scorer: Scorer | None = None) -> list[dict]:
    """Every system on every turn of one question (systems in `order` within each turn, all with the turn's
    seed), each with its own conversation; the per-turn records in run order, each output scored by `scorer`
    (untimed) when there is one."""
    history: dict[str, list[dict]] = {n: [] for n in order}
    records = []
    for turn_index, turn in enumerate(question.turns):
        seed_here = turn_seed(seed, question.question_id, turn_index)
        for name in order:
            history[name].append({"role": "user", "content": turn})
            prompt = encode_chat(tokenizer, history[name])
            record = runners[name](prompt, max_new_tokens, seed_here)
            if scorer is not None:
                record.loglik = scorer(prompt, record.tokens)
            record.question_id, record.category, record.turn = question.question_id, question.category, turn_index
            answer = tokenizer.decode(record.tokens, skip_special_tokens=True)
            records.append(record.to_dict(name, answer))
            history[name].append({"role": "assistant", "content": answer})
            bar.update(1)
    return records


def bench_questions(runners: dict[str, Runner], tokenizer, questions: list[Question], max_new_tokens: int,
                    systems: list[str], start: int = 0, progress: bool = True, seed: int = 0,
                    scorer: Scorer | None = None) -> Iterator[list[dict]]:
    """Yields the records of questions[start:], one question (all systems, all its turns) at a time. The system
    order of question i is `systems` rotated by i and its seeds are turn_seed(seed, ...), whatever `start` is, so
    a resumed run matches an unbroken one. Nothing runs (not even the warm-up) when no question is left."""
    todo = questions[start:]
    if not todo:
        return
    warm = encode_chat(tokenizer, [{"role": "user", "content": "Say hello."}])
    for name in systems:  # first calls pay one-off costs; keep them out of the timings
        runners[name](warm, 8, seed)
    units = sum(len(q.turns) for q in todo) * len(systems)
    with tqdm(total=units, desc="bench", unit="gen", disable=not progress) as bar:
        for qi, question in enumerate(todo, start=start):
            order = systems[qi % len(systems):] + systems[: qi % len(systems)]
            yield run_question(question, order, runners, tokenizer, max_new_tokens, bar, seed, scorer)


def loglik_scorer(model, in_effect: dict) -> Scorer | None:
    """Sampling (`in_effect` as settings_in_effect gives it): output_loglik at the temperature in effect; greedy:
    None (outputs are compared token for token instead)."""
    if not in_effect["do_sample"]:
        return None
    return lambda prompt, tokens: output_loglik(model, prompt, tokens, in_effect["temperature"])
