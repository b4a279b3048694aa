"""The vLLM side of ctcspec's vLLM engine (ctcspec/vllm_engine.py): a script run by the vLLM environment's Python,
which holds vLLM and its pinned dependencies apart from ctcspec's own. It imports the standard library and vLLM
only, never ctcspec.

Protocol, one JSON object per line:
- argv[1]: the settings {"model", "dtype", "speculative_config", "kv_cache_bytes", "max_model_len"} (the
  CPUs to run on come in VLLM_CPU_OMP_THREADS_BIND);
- on its result channel (the stdout it was started with; vLLM's own prints go to stderr) the worker first writes
  {"ready": true, "vllm": VERSION, "max_model_len": N}, or {"error": MESSAGE} and exits;
- then, for each request line on stdin, {"prompts": [[ids], ...], "max_new_tokens": N, "stop_ids": [ids]}, it
  answers {"outputs": [[ids], ...], "steps": S, "seconds": T}: every prompt decoded greedily together (vLLM's
  continuous batching), each answer ending at its first stop id (kept) or after N tokens (the tokenizer's own
  end-of-sequence token ends nothing unless it is a stop id); S is the number of
  engine steps (base forwards, prefill included) and T the seconds from the first request added to the last
  output. A request it cannot run gets {"error": MESSAGE} and the worker goes on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def result_channel():
    """The stdout this process was started with, kept for results; fd 1 then points at stderr, so that what vLLM
    and its engine processes print never mixes with the protocol."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def send(channel, message: dict) -> None:
    """One protocol message, one line."""
    channel.write(json.dumps(message) + "\n")


def load(settings: dict):
    """vLLM's offline engine on the settings' model, eager (no compilation: ctcspec's runs are short)."""
    from vllm import LLM

    return LLM(settings["model"], dtype=settings["dtype"], enforce_eager=True, seed=0,
               speculative_config=settings.get("speculative_config"),
               kv_cache_memory_bytes=settings["kv_cache_bytes"], max_model_len=settings.get("max_model_len"),
               disable_log_stats=True)


def run(llm, request: dict, serial: int) -> dict:
    """Decode every prompt of `request` greedily, side by side, counting engine steps."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=int(request["max_new_tokens"]), detokenize=False,
                            ignore_eos=True, stop_token_ids=[int(t) for t in request["stop_ids"]])
    engine = llm.llm_engine
    prompts = request["prompts"]
    outputs: list[list[int] | None] = [None] * len(prompts)
    steps = 0
    start = time.perf_counter()
    ids = [f"{serial}:{index}" for index in range(len(prompts))]
    try:
        for request_id, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=[int(t) for t in prompt]), params)
        while engine.has_unfinished_requests():
            finished = engine.step()
            steps += 1
            for output in finished:
                if output.finished:
                    outputs[ids.index(output.request_id)] = list(output.outputs[0].token_ids)
    except BaseException:
        engine.abort_request(ids)  # a failed request leaves nothing behind for the next one
        raise
    seconds = time.perf_counter() - start
    return {"outputs": outputs, "steps": steps, "seconds": seconds}


def main() -> None:
    """Load, say ready (or why not), then answer request lines until stdin ends."""
    channel = result_channel()
    # SIGTERM exits through Python, so that vLLM shuts its engine process down (killed outright, the worker would
    # leave that process behind).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        settings = json.loads(sys.argv[1])
        llm = load(settings)
        import vllm

        send(channel, {"ready": True, "vllm": vllm.__version__,
                       "max_model_len": llm.llm_engine.model_config.max_model_len})
    except Exception as exc:  # noqa: BLE001 - whatever vLLM raised, the client reports it in one line
        send(channel, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return
    for serial, line in enumerate(sys.stdin):
        try:
            send(channel, run(llm, json.loads(line), serial))
        except Exception as exc:  # noqa: BLE001
            send(channel, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})


if __name__ == "__main__":
    main()
