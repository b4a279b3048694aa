"""ctcspec serve and ctcspec chat: the engine behind the OpenAI-compatible server, or a terminal conversation."""

from __future__ import annotations

import logging
import os
import sys

from ctcspec.chat import Conversation, run_chat
from ctcspec.cli.args import (
    add_decoding_args,
    add_engine_args,
    bounded_float,
    generation_settings,
    port_number,
    positive_int,
)
from ctcspec.cli.common import batch_engine_from_args, engine_from_args
from ctcspec.server.metrics import ServerMetrics
from ctcspec.server.service import BatchGenerationService, GenerationService


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with streaming, metrics and a chat page",
                           description="Serve the model with speculative decoding over the OpenAI API: "
                                       "/v1/chat/completions and /v1/completions (streaming or not), /v1/models, "
                                       "/health, /metrics (Prometheus) and a chat page at /. Requests queue for "
                                       "the engine: one generation at a time, or --max-batch together. Greedy "
                                       "unless a request sets temperature above 0 (docs/serving.md).")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
                            "interface)")
    serve.add_argument("--port", type=port_number, default=8000, help="(default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("CTCSPEC_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $CTCSPEC_API_KEY; unset: no key)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients name (default: --model as given)")
    serve.add_argument("--max-queue", type=positive_int, default=64,
                       help="requests admitted at once, waiting or running; beyond it a request gets 429 "
                            "(default: 64)")
    serve.add_argument("--max-batch", type=positive_int, default=1,
                       help="requests decoded together, each joining as soon as a row is free (continuous batching; "
                            "default: 1, one at a time on the fastest one-sequence backend)")
    serve.add_argument("--drain-timeout", type=bounded_float(lambda v: v >= 0, "at least 0"), default=60.0,
                       metavar="S", help="on Ctrl-C or SIGTERM, seconds open requests get to finish before they "
                                     "are cancelled (default: 60)")


def add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="a conversation in the terminal, streamed",
                          description="Chat with the model in the terminal: answers stream as tokens are accepted, "
                                      "the conversation goes through the model's chat template. /reset, /stats "
                                      "(beta and speed of the last answer), /quit; Ctrl-C stops an answer. With "
                                      "stdin not a terminal, each line is answered and the command exits.")
    add_engine_args(chat)
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    chat.add_argument("--max-new-tokens", type=positive_int, default=512, help="per answer (default: 512)")
    add_decoding_args(chat)


def cmd_serve(args) -> int:
    # The serving stack (FastAPI, uvicorn) loads for `serve` alone, so distill, train and eval run where torch,
    # transformers and accelerate are all there is (a GPU training machine: scripts/gpu_round.sh).
    from ctcspec.server.app import check_address, create_app, run_server

    check_address(args.host, args.port)  # before the model loads: fail fast
    if args.max_batch > 1:
        loaded, engine = batch_engine_from_args(args, args.max_batch)
        service = BatchGenerationService(engine, loaded.tokenizer, args.max_queue, ServerMetrics())
    else:
        loaded, engine = engine_from_args(args)
        service = GenerationService(engine, loaded.tokenizer, args.max_queue, ServerMetrics())
    app = create_app(service, args.served_model_name or args.model, args.api_key)
    logging.getLogger("ctcspec").info("serving %s with the %s drafter, %d at a time, at http://%s:%d (chat page at /, "
                                      "API at /v1)", args.model, engine.drafter.name, args.max_batch, args.host,
                                      args.port)
    run_server(app, args.host, args.port, args.drain_timeout)
    return 0


def cmd_chat(args) -> int:
    settings = generation_settings(args)
    loaded, engine = engine_from_args(args)
    conversation = Conversation(engine, loaded.tokenizer, args.max_new_tokens, settings, system=args.system)
    conversation.prompt_ids("hello")  # a model without a chat template is refused before the first line
    return run_chat(conversation, sys.stdin, sys.stdout, sys.stderr, sys.stdin.isatty(), seed=args.seed)
