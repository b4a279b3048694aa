"""Self-distillation data: the base model answers training prompts greedily; we keep the token ids.

`DIR/samples.jsonl` gets one line per answered prompt ({"index", "source", "prompt_len", "ids"}),
appended batch by batch, so an interrupted run resumes where it stopped. Only token ids are kept:
training runs the base model over them for its hidden states (`ctcspec train --hidden-cache DIR`
keeps those on disk, fp16, for several trainings on the same data).

Prompts come from FastChat question jsonl (first turns), GSM8K jsonl, plain-text files (one
prompt per line), and optionally from the base model itself (`self_instruct`), which is asked to
write diverse user requests. Evaluation sets (MT-bench, Vicuna-bench, GSM8K test) are refused.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from ctcspec.assembly import build_batch_engine
from ctcspec.decoding import eos_ids
from ctcspec.errors import CtcspecError, read_text_file
from ctcspec.modules.files import drafter_base
from ctcspec.prompts import encode_chat

SAMPLES_FILE, META_FILE, INSTRUCTIONS_FILE = "samples.jsonl", "meta.json", "self_instruct.jsonl"
RUNS_FILE = "runs.jsonl"  # one line per distill call: its options, engine, machine and throughput (for the data store)

TOPICS = (
    "cooking", "personal finance", "travel planning", "ancient history", "astronomy", "climate change",
    "job interviews", "gardening", "music theory", "photography", "chess", "marine biology", "poetry",
    "startups", "public speaking", "nutrition", "the French revolution", "machine learning", "databases",
    "web development", "Python programming", "linear algebra", "probability", "geometry", "economics",
    "philosophy of mind", "world religions", "architecture", "renewable energy", "volcanoes", "genetics",
    "the immune system", "film making", "video games", "mythology", "urban planning", "sleep", "parenting",
    "time management", "negotiation", "chemistry", "quantum physics", "electric cars", "social media",
    "language learning", "painting", "sports training", "pets", "law and contracts", "medieval castles",
    "space exploration", "cybersecurity", "psychology", "statistics", "novels and storytelling",
    "email etiquette", "customer support", "mathematical puzzles", "sorting algorithms", "SQL queries",

    "Roman emperors", "the printing press", "jazz", "hip hop", "impressionist painting", "Shakespeare",
    "Greek philosophy", "the industrial revolution", "World War II", "the Cold War", "democracy", "human rights",
    "supply and demand", "inflation", "stock markets", "cryptocurrency", "small business marketing",
    "remote work", "leadership", "team conflicts", "friendship", "moving to a new city", "minimalism",
    "meditation", "running a marathon", "yoga", "basketball", "soccer tactics", "the Olympic games",
    "board games", "magic tricks", "birds", "dinosaurs", "rainforests", "deserts", "oceans", "earthquakes",
    "the water cycle", "photosynthesis", "black holes", "the solar system", "Mars colonization", "satellites",
    "the internet", "smartphones", "artificial intelligence ethics", "robots", "3D printing", "batteries",
    "recycling", "plastic pollution", "bees", "coffee", "tea ceremonies", "baking bread", "vegetarian recipes",
    "wine regions", "street food", "Japanese culture", "Indian history", "African geography", "South America",
    "the Arctic", "lighthouses", "trains", "airplanes", "bicycles", "car maintenance", "home repair",
    "interior design", "fashion history", "knitting", "woodworking", "poker odds", "prime numbers",
    "fractions", "percentages", "calculus", "graph theory", "recursion", "linked lists", "hash tables",
    "regular expressions", "JavaScript", "C++ memory management", "unit testing", "git", "APIs",
    "cloud computing", "operating systems", "computer networks", "encryption", "spreadsheets",
    "resume writing", "college applications", "studying for exams", "teaching kids to read", "dogs", "cats",
)

TASKS = (
    "short creative writing request (a story, poem or letter)", "role-play request where the assistant plays "
    "a character", "question that needs step-by-step reasoning", "math word problem", "coding task",
    "request to extract specific facts from a short text you include", "question about a science concept",
    "question about history or culture", "request for practical advice", "request to explain a concept "
    "to a child", "request to write a persuasive essay outline", "request to compare two things",
    "request to rewrite or summarize a paragraph you include", "brainstorming request for a list of ideas",
    "request for a short dialogue between two people", "question asking for a definition and examples",
)


EXAMPLES_PROMPT = (
    "Here are three requests users sent to an AI assistant:\n- Write a haiku about the sea at night.\n"
    "- How much is 15% of 240? Show the steps.\n- Pretend you are a pirate captain and describe your ship.\n\n"
    "Write one new request: a {task} about {topic}. Reply with the request only, without answering it.")
TEMPLATES = (
    "Write a short story about {topic}.", "Write a poem about {topic}.",
    "Pretend you are a famous expert on {topic}. Introduce yourself and answer: what do beginners get wrong?",
    "Explain {topic} to a ten-year-old.", "Give me five practical tips about {topic}.",
    "What are the pros and cons of studying {topic}? Answer step by step.",
    "Write a persuasive paragraph on why everyone should learn about {topic}.",
    "Summarize the most important ideas of {topic} in three bullet points.",
    "Write a dialogue between a teacher and a student about {topic}.",
    "Create a multiple-choice quiz with three questions about {topic}, with answers.",
    "Write a Python function that could be useful for someone working on {topic}, and explain it.",
    "Describe a common misconception about {topic} and correct it.",
    "Write a formal email to a colleague asking for help with a project on {topic}.",
    "Compare two different approaches to {topic} in a short table.",
    "Invent a word problem involving {topic} that needs arithmetic, then solve it.",
    "List the key terms of {topic} with a one-sentence definition each.",

    "Write a travel blog post about a trip that taught you something about {topic}.",
    "Act as a customer support agent and answer a frustrated customer's question about {topic}.",
    "Imagine you are a detective in a story about {topic}. Describe the first clue you find.",
    "Write a short speech for a school graduation that mentions {topic}.",
    "Write a product description for a new gadget related to {topic}.",
    "Draft a tweet thread of four tweets about {topic}.",
    "Write a limerick about {topic}.",
    "Explain the history of {topic} in two paragraphs.",
    "What would happen if {topic} disappeared tomorrow? Reason it through.",
    "Give a step-by-step plan for a beginner to learn {topic} in one month.",
    "Write an argument for and an argument against investing public money in {topic}.",
    "Describe {topic} using only simple words, as if to a friend.",
    "Write a short news report about a surprising discovery in {topic}.",
    "Write interview questions for a job related to {topic}, with model answers.",
    "Solve a simple logic puzzle about {topic} that you invent, explaining each step.",
    "Write a JavaScript function related to {topic} and explain how it works.",
    "Write a SQL query for a small database about {topic} and explain it.",
    "Fix a bug: write a short buggy Python snippet about {topic}, then show the corrected version.",
    "Write a letter from a grandparent to a grandchild about {topic}.",
    "Summarize a fictional research paper about {topic} with title, method and results.",
    "Role-play as a tour guide showing visitors an exhibition about {topic}.",
    "Write the opening paragraph of a fantasy novel set in a world shaped by {topic}.",
    "Estimate, with rough numbers and clear assumptions, something measurable about {topic}.",
    "Write a short essay on the ethical questions raised by {topic}.",
)


CODE_TEMPLATES = (
    "Complete this Python function and explain each line:\n\ndef summarize_{slug}(items):\n    \"\"\"Return a short "
    "summary of a list of {topic} records.\"\"\"\n",
    "Write a Python class that models {topic}, with two methods and a short usage example.",
    "Write unit tests with pytest for a function that validates data about {topic}.",
    "Refactor this code to be clearer and explain what you changed:\n\nx = [d for d in data if d['kind'] == "
    "'{topic}']\nfor i in range(len(x)):\n    print(x[i]['name'], x[i]['value'] * 2)",
    "Write a shell command pipeline that counts the lines mentioning {topic} in every .txt file of a folder.",
    "Explain the time complexity of searching a sorted list of {topic} facts, with Python code.",
    "Write a TypeScript interface and a function for a small app about {topic}.",
    "I get a KeyError in my Python script that processes {topic} data. What are the likely causes and fixes?",
)
STYLES = (  # one is appended to each styled request, so none repeats a plain templated request
    "Keep it under 120 words.", "Use a numbered list.", "Use a friendly, casual tone.", "Write for an expert.",
    "Include one concrete example.", "Start with a one-sentence summary.", "End with a question for me.",
    "Use a table where it helps.", "Be concise.", "Explain your reasoning step by step.",
    "Use simple words.", "Add a short code snippet if it helps.",
)


STYLED_COUNT = (len(TEMPLATES) + len(CODE_TEMPLATES)) * len(TOPICS) * len(STYLES)


def templated_prompts() -> list[Prompt]:
    """Every TEMPLATES x TOPICS request: broad coverage of writing, role-play, reasoning, coding, STEM."""
    return [Prompt("templated", t.format(topic=topic)) for t in TEMPLATES for topic in TOPICS]


def styled_prompts() -> list[Prompt]:
    """Every (TEMPLATES + CODE_TEMPLATES) x TOPICS x STYLES request, leaning toward chat and code: a pool for
    successive training rounds (--round) that holds none of the plain templated requests."""
    return [Prompt("styled", f"{t.format(topic=topic, slug=_slug(topic))}\n\n{style}")
            for t in TEMPLATES + CODE_TEMPLATES for topic in TOPICS for style in STYLES]


def _slug(topic: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in topic.lower()).strip("_")


def round_slice(prompts: list[Prompt], round_index: int, size: int) -> list[Prompt]:
    """Prompts [round_index * size, (round_index + 1) * size) of `prompts` in a fixed shuffled order: rounds of
    one size answer different prompts of each source and never one twice; empty once earlier rounds used all."""
    order = list(prompts)
    random.Random(0).shuffle(order)
    return order[round_index * size:(round_index + 1) * size]


@dataclass(frozen=True)
class Prompt:
    source: str
    text: str


def _refuse_evaluation_set(path: Path) -> None:
    parts = [p.lower() for p in path.parts]
    if any("mt_bench" in p or "vicuna_bench" in p for p in parts) or (
            any("gsm8k" in p for p in parts) and "test" in path.name.lower()):
        raise CtcspecError(f"{str(path)!r} is an evaluation set; training on it would make the benchmark "
                           "meaningless. Use training prompts (e.g. GSM8K train) or --self-instruct.")


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """FastChat question jsonl (first turn), GSM8K jsonl ("question"), other jsonl with "prompt" or
    "instruction", or plain text with one prompt per line."""
    path = Path(path)
    _refuse_evaluation_set(path)
    text = read_text_file(path, "prompt file")
    source = f"{path.parent.name}/{path.name}" if path.parent.name else path.name  # e.g. gsm8k/train.jsonl
    prompts = []
    jsonl = path.suffix == ".jsonl"
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(Prompt(source, line.strip()))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CtcspecError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        turns = record.get("turns") if isinstance(record, dict) else None
        value = turns[0] if isinstance(turns, list) and turns else None
        for key in ("question", "prompt", "instruction"):
            if value is None and isinstance(record, dict):
                value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise CtcspecError(f"{path} line {lineno}: needs 'turns', 'question', 'prompt' or 'instruction'")
        prompts.append(Prompt(source, value.strip()))
    if not prompts:
        raise CtcspecError(f"{path}: no prompts found")
    return prompts


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int],
                   pad_id: int, sample: bool = False, seed: int = 0) -> list[list[int]]:
    """Left-padded batched generation; each answer cut after its first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    config = GenerationConfig(do_sample=sample, temperature=1.0 if sample else None, top_p=0.95 if sample else None,
                              max_new_tokens=max_new_tokens, eos_token_id=list(eos) or None, pad_token_id=pad_id)
    if sample:
        torch.manual_seed(seed)
    out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append(row if cut is None else row[: cut + 1])
    return answers


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def stop_and_pad_ids(model, tokenizer) -> tuple[list[int], int]:
    """The model's end-of-sequence ids (answers are cut after the first) and the id that pads a batch."""
    eos = sorted(eos_ids(model.generation_config))
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)


def _clean_instruction(text: str) -> str | None:
    text = text.strip().strip('"').strip()
    for prefix in ("Request:", "Question:", "User:", "Task:"):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
    return text if 15 <= len(text) <= 600 else None


def _read_instructions(path: Path) -> list[str]:
    """The requests self_instruct cached so far (a line cut short by an interrupted run is dropped)."""
    if not path.exists():
        return []
    _drop_partial_last_line(path)
    have = []
    for lineno, line in enumerate(read_text_file(path, "self-instruct cache").splitlines(), start=1):
        try:
            have.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError):
            raise CtcspecError(f"{path} line {lineno} is corrupt; delete the file to have the requests "
                               "written again") from None
    return have


def self_instruct(model, tokenizer, count: int, out_dir: Path, batch_size: int = 64, seed: int = 0,
                  progress: bool = True, deadline: float | None = None) -> list[Prompt]:
    """Ask the base model for `count` diverse user requests (sampled), cached in DIR/self_instruct.jsonl;
    no batch starts after `deadline` (time.monotonic())."""
    path = Path(out_dir) / INSTRUCTIONS_FILE
    have = _read_instructions(path)
    rng = random.Random(seed + len(have))
    eos, pad_id = stop_and_pad_ids(model, tokenizer)
    bar = tqdm(total=count, initial=min(len(have), count), desc="self-instruct", unit="prompt", disable=not progress)
    seen = set(have)
    attempts = 0
    while len(have) < count and attempts < 4 * count and not _past(deadline):
        metas = [EXAMPLES_PROMPT.format(task=rng.choice(TASKS), topic=rng.choice(TOPICS)) for _ in range(batch_size)]
        ids = [encode_chat(tokenizer, [{"role": "user", "content": m}]) for m in metas]
        outputs = generate_batch(model, ids, 96, eos, pad_id, sample=True, seed=seed + attempts)
        attempts += batch_size
        new = []
        for out in outputs:
            text = _clean_instruction(tokenizer.decode(out, skip_special_tokens=True))
            if text and text not in seen and len(have) + len(new) < count:
                seen.add(text)
                new.append(text)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in new)
        have.extend(new)
        bar.update(len(new))
    bar.close()
    return [Prompt("self-instruct", t) for t in have[:count]]


def read_samples(data_dir: Path) -> list[dict]:
    path = Path(data_dir) / SAMPLES_FILE
    if not path.exists():
        raise CtcspecError(f"{str(data_dir)!r} holds no distilled data ({SAMPLES_FILE}); run ctcspec distill first")
    lines = read_text_file(path, "distilled data file").splitlines()
    samples = []
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            samples.append({"index": int(record["index"]), "prompt_len": int(record["prompt_len"]),
                            "ids": [int(t) for t in record["ids"]], "source": record.get("source", "")})
        except (ValueError, KeyError, TypeError):
            if lineno == len(lines):
                break  # a line cut short by an interrupted run: ignore it, the prompt is redone
            raise CtcspecError(f"{path} line {lineno} is corrupt") from None
    return samples


def _drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline; cut it so appending stays valid."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


DISTILL_ENGINES = ("hf", "vllm", "ctcspec")
AnswerBatch = Callable[[list[list[int]]], list[list[int]]]  # prompt ids -> greedy answers, each cut after its EOS


def hf_answers(model, tokenizer, max_new_tokens: int) -> AnswerBatch:
    """The default engine: HF `generate` on left-padded batches (generate_batch)."""
    eos, pad_id = stop_and_pad_ids(model, tokenizer)
    return lambda prompts: generate_batch(model, prompts, max_new_tokens, eos, pad_id)


def ctcspec_answers(model, tokenizer, max_new_tokens: int, max_batch: int) -> AnswerBatch:
    """ctcspec's own batched engine (batch.py) with prompt lookup, `max_batch` sequences at a time with continuous
    batching: each answer is HF generate's greedy answer to that prompt alone (generate_batch's settings)."""
    eos, pad_id = stop_and_pad_ids(model, tokenizer)
    engine = build_batch_engine(model, "lookup", max_batch=max_batch)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos) or None,
                              pad_token_id=pad_id)
    return lambda prompts: [result.tokens for result in engine.generate(prompts, max_new_tokens,
                                                                        generation_config=config)]


def vllm_answers(engine, model, tokenizer, max_new_tokens: int) -> AnswerBatch:
    """vLLM (a ctcspec.vllm_engine.VllmEngine on the same model directory): its continuous batching over the
    whole batch, stopping at the model's end-of-sequence ids."""
    eos, _ = stop_and_pad_ids(model, tokenizer)
    return lambda prompts: engine.generate(prompts, max_new_tokens, eos).outputs


def distill(model, tokenizer, prompts: Sequence[Prompt], out_dir: Path, max_new_tokens: int = 256,
            batch_size: int = 16, progress: bool = True, deadline: float | None = None,
            answer_batch: AnswerBatch | None = None, engine: str = "hf",
            skip: Collection[tuple[int, ...]] = frozenset()) -> dict:
    """Answer every prompt greedily into DIR/samples.jsonl, `batch_size` prompts per call of `answer_batch` (default:
    hf_answers; `engine` names it in the returned stats); prompts already answered are skipped, and no batch
    starts after `deadline` (time.monotonic(); a later run answers the rest). Batches hold prompts of similar
    lengths, in a shuffled order, so a deadline does not leave out only the longest. Prompts in `skip` (token ids:
    those a data store already holds) are left out. Returns what this call answered: prompts, answer tokens,
    seconds and answer tokens per second."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = drafter_base(model)  # with an fp32 base, its fingerprints rounded to bf16/fp16 too (for the data store)
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        try:
            old = json.loads(read_text_file(meta_path, "distill metadata"))
        except json.JSONDecodeError:
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("base"), dict):
            raise CtcspecError(f"{meta_path} is corrupt; use a new --out")
        if old["base"].get("lm_head_sha256") != base["lm_head_sha256"]:
            raise CtcspecError(f"{str(out_dir)!r} holds data distilled from another base model; use a new --out")
    samples_path = out_dir / SAMPLES_FILE
    if samples_path.exists():
        _drop_partial_last_line(samples_path)
    encoded = [encode_chat(tokenizer, [{"role": "user", "content": p.text}]) for p in prompts]
    done = _answered(read_samples(out_dir), encoded, out_dir) if samples_path.exists() else set()
    meta_path.write_text(json.dumps({"base": base, "prompts": len(prompts), "max_new_tokens": max_new_tokens},
                                    indent=2) + "\n")
    answer_batch = answer_batch or hf_answers(model, tokenizer, max_new_tokens)
    skipped = sum(tuple(ids) in skip for i, ids in enumerate(encoded) if i not in done)
    todo = [(i, ids) for i, ids in enumerate(encoded) if i not in done and tuple(ids) not in skip]
    todo.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    random.Random(len(prompts)).shuffle(batches)
    bar = tqdm(total=len(prompts) - skipped, initial=len(prompts) - skipped - len(todo), desc="distill", unit="prompt",
               disable=not progress)
    started, answer_tokens, answered = time.perf_counter(), 0, 0
    for batch in batches:
        if _past(deadline):
            break
        answers = answer_batch([p for _, p in batch])
        answer_tokens += sum(map(len, answers))
        with samples_path.open("a", encoding="utf-8") as f:
            for (index, prompt_ids), answer in zip(batch, answers, strict=True):
                f.write(json.dumps({"index": index, "source": prompts[index].source, "prompt_len": len(prompt_ids),
                                    "ids": prompt_ids + answer}) + "\n")
        answered += len(batch)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - started
    return {"answered": answered, "left": len(todo) - answered, "skipped": skipped, "answer_tokens": answer_tokens,
            "seconds": round(seconds, 1), "tokens_per_s": round(answer_tokens / seconds, 1) if seconds > 0 else None,
            "engine": engine, "dtype": str(model.dtype), "path": str(samples_path)}


def record_run(out_dir: Path, record: dict) -> None:
    """Append one distill call's record (options, stats, machine) to DIR/runs.jsonl."""
    with (Path(out_dir) / RUNS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_runs(out_dir: Path) -> list[dict]:
    """The records of the distill calls that wrote `out_dir` (none for directories older than the record)."""
    path = Path(out_dir) / RUNS_FILE
    if not path.exists():
        return []
    runs = []
    for line in read_text_file(path, "distill run record").splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: the record is informative only
    return runs


def _answered(samples: list[dict], encoded: list[list[int]], out_dir: Path) -> set[int]:
    """Indices already answered in `out_dir`, checked to be answers to these prompts: a resumed run with other
    prompt options (another --round, --limit or file) would otherwise mix answers under the wrong indices."""
    for sample in samples:
        index = sample["index"]
        if index >= len(encoded) or sample["ids"][:sample["prompt_len"]] != encoded[index]:
            raise CtcspecError(f"{str(out_dir)!r} holds answers to other prompts (its sample {index} is not prompt "
                               f"{index} of these options); resume with the same prompt options, or use a new --out")
    return {sample["index"] for sample in samples}


@torch.inference_mode()
def float32_agreement(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """How far distilled answers (in a lower precision, or by another engine) agree with HF `generate`'s in
    float32, `batch_size` prompts at a time (1: each prompt alone, the oracle): the share of answers identical
    token for token, and of answer tokens before the first difference."""
    eos, pad_id = stop_and_pad_ids(model, tokenizer)
    reference = copy.deepcopy(model).float()
    identical, agreeing, total = 0, 0, 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        answers = generate_batch(reference, [s["ids"][:s["prompt_len"]] for s in batch], max_new_tokens, eos, pad_id)
        for sample, answer in zip(batch, answers, strict=True):
            distilled = sample["ids"][sample["prompt_len"]:]
            shorter = min(len(distilled), len(answer))
            same = next((i for i in range(shorter) if distilled[i] != answer[i]), shorter)
            identical += distilled == answer
            agreeing += same
            total += len(distilled)
    del reference
    return {"answers": len(samples), "identical": identical / len(samples) if samples else None,
            "tokens_before_first_difference": agreeing / total if total else None}
