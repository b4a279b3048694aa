"""ctcspec generate: one prompt, streamed, with statistics."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from ctcspec.bench.summary import describe_settings
from ctcspec.cli.args import add_decoding_args, add_engine_args, generation_settings, positive_int
from ctcspec.cli.common import engine_from_args
from ctcspec.decoding import settings_in_effect
from ctcspec.errors import read_text_file
from ctcspec.prompts import encode, require_prompt
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
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
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
