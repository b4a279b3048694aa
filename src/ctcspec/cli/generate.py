"""ctcspec generate: one prompt, streamed, with statistics; or a file of prompts, decoded in batches."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ctcspec.bench.summary import describe_settings
from ctcspec.cli.args import add_decoding_args, add_engine_args, generation_settings, positive_int
from ctcspec.cli.common import batch_engine_from_args, engine_from_args
from ctcspec.decoding import settings_in_effect
from ctcspec.errors import CtcspecError, read_text_file
from ctcspec.prompts import encode, read_prompts_file, require_prompt
from ctcspec.text import ReleasedText, decode


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from one prompt, streaming, with statistics",
                         description="Generate from one prompt: greedy by default, token for token what "
                                     "model.generate(do_sample=False) gives; sampling (--temperature, --sample) has "
                                     "the distribution of model.generate(do_sample=True).")
    add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    src.add_argument("--prompts-file", type=Path,
                     help="generate for every prompt of this file (one per line; .jsonl: objects with a \"prompt\" "
                          "string), --batch-size of them decoded together; results print as they finish")
    gen.add_argument("--batch-size", type=positive_int, default=None,
                     help="with --prompts-file: sequences decoded together, joining as others finish (default 8)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object instead of streaming text (--prompts-file: one line per prompt)")
    add_decoding_args(gen)


def _read_prompt(args) -> str:
    return args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "prompt file")


def print_tokens(tokenizer) -> Callable[[list[int]], None]:
    """An on_tokens callback printing the text of the tokens as it becomes final."""
    released = ReleasedText(tokenizer)

    def write(tokens: list[int]) -> None:
        sys.stdout.write(released.add(tokens))
        sys.stdout.flush()
    return write


def cmd_generate(args) -> int:
    if args.prompts_file is not None:
        return generate_batch(args)
    if args.batch_size is not None:
        raise CtcspecError("--batch-size needs --prompts-file (one --prompt is one sequence)")
    text = require_prompt(_read_prompt(args))  # before the model loads: fail fast
    settings = generation_settings(args)
    seed = args.seed if args.seed is not None or not settings["do_sample"] else secrets.randbelow(2**31)
    loaded, engine = engine_from_args(args)
    drafter, name = engine.drafter, engine.drafter.name
    prompt_ids = encode(loaded.tokenizer, text, chat=args.chat)
    in_effect = settings_in_effect(loaded.model, settings)
    streamer = None if args.json else print_tokens(loaded.tokenizer)
    result = engine.generate(prompt_ids, args.max_new_tokens, on_tokens=streamer, seed=seed, **settings)
    stats = result.stats
    if args.json:
        print(json.dumps({"prompt": text, "model": str(loaded.path), "drafter": name,
                          "settings": drafter.settings(), "settings_in_effect": in_effect, "seed": seed,
                          "output": decode(loaded.tokenizer, result.tokens),
                          "output_ids": result.tokens, "stats": stats.to_dict()}))
    else:
        print(file=sys.stdout)
        print(f"[{name}] {stats.new_tokens} tokens in {stats.steps} steps (beta {stats.beta:.2f}), "
              f"{stats.tokens_per_s:.1f} tok/s; time: draft {stats.draft_s:.2f}s, verify {stats.verify_s:.2f}s, "
              f"bookkeeping {stats.bookkeeping_s:.2f}s, prefill {stats.prefill_s:.2f}s; stop: {stats.stop_reason}; "
              f"{describe_settings(in_effect, seed)}", file=sys.stderr)
    return 0


def generate_batch(args) -> int:
    """Every prompt of --prompts-file, --batch-size at a time; each result printed as it finishes (with --json: one
    line with its index, prompt, output, output_ids and stats), then the totals on stderr."""
    texts = read_prompts_file(args.prompts_file)  # before the model loads: fail fast
    settings = generation_settings(args)
    base_seed = args.seed if args.seed is not None or not settings["do_sample"] else secrets.randbelow(2**31)
    loaded, engine = batch_engine_from_args(args, args.batch_size or 8)
    in_effect = settings_in_effect(loaded.model, settings)
    start = time.perf_counter()
    requests = {}
    for index, text in enumerate(texts):
        seed = None if base_seed is None else base_seed + index
        request = engine.submit(encode(loaded.tokenizer, text, chat=args.chat), args.max_new_tokens, seed=seed,
                                **settings)
        requests[request] = (index, text, seed)
    new_tokens = 0
    while engine.busy:
        for request, result in engine.step().items():
            index, text, seed = requests[request]
            new_tokens += len(result.tokens)
            output = decode(loaded.tokenizer, result.tokens)
            if args.json:
                print(json.dumps({"index": index, "prompt": text, "drafter": engine.drafter.name, "seed": seed,
                                  "output": output, "output_ids": result.tokens, "stats": result.stats.to_dict()}),
                      flush=True)
            else:
                print(f"[{index}] {output}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"[{engine.drafter.name}] {len(texts)} prompts, {new_tokens} tokens in {elapsed:.1f}s: "
          f"{new_tokens / elapsed:.1f} tok/s in all, batches of up to {engine.max_batch} "
          f"({engine.forwards} forwards); {describe_settings(in_effect, base_seed)}", file=sys.stderr)
    return 0
