"""Load generator for `ctcspec serve` (or any OpenAI-compatible chat completions server).

Start a server, then point this script at it:

    .venv/bin/ctcspec serve --port 8000 &
    .venv/bin/python scripts/load.py --base-url http://127.0.0.1:8000/v1 --clients 1,4,16 --duration 60

For each N in --clients (one level after another) N concurrent clients run for --duration seconds. Each client
loops: it sends one streaming chat completion (stream=True, stream_options.include_usage, temperature 0,
max_tokens=--max-tokens), reads the stream to the end, and sends the next one. Prompts are the first turn of each
question in the package's demo_questions.jsonl (or the lines of --prompts), cycled; client i starts at prompt i.

Measured per request:
  - TTFT: seconds from sending the request to the first chunk with non-empty content;
  - latency: seconds from sending the request to the end of the stream;
  - completion tokens: taken from the final usage chunk (a stream without one counts as an error);
  - β: tokens per base-model forward over the level (completion tokens / forwards), from the per-request figures
    ctcspec serve puts in its usage chunk ("ctcspec": {"steps", ...}; "-" for other servers);
  - errors: any exception or error status (connection errors, 4xx/5xx, timeouts). Errors are counted, never fatal;
    the first message of each kind is printed. A client pauses 0.1 s after an error so a refusing server is not
    hammered in a tight loop.

Requests still running when the duration ends are allowed to finish and are counted. Hence a level lasts a little
longer than --duration, and requests/s and output tok/s divide by the level's real wall time (start to last
request finished), not by --duration. "requests" counts successful requests; failed ones are only in "errors".
TTFT and latency percentiles are over successful requests. Clients use max_retries=0, so a 429 is an error, not a
silent retry.

Output: a markdown table (times in seconds), one row per level, under a header line naming the model (from
/v1/models unless --model is given), max tokens, duration and server URL. --json OUT also writes the rows and the
settings, and every prompt's answer: the table's "answers" column is "same" when every request for a prompt got the
same text (greedy: whatever else the server was running), else how many prompts got several. --same-as OTHER.json
also compares each prompt's answer with the one OTHER (an earlier run's --json) recorded, e.g. of a one-at-a-time
server. Exit status: 0 when no request failed and every prompt got one answer (the --same-as one), 1 otherwise, 2
when the server cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openai import APIConnectionError, APIStatusError, AsyncOpenAI

ERROR_PAUSE_S = 0.1


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    steps: int | None = None   # base-model forwards, from ctcspec's figures in the usage chunk (other servers: None)
    prompt: str = ""
    text: str = ""
    error_kind: str | None = None
    error_message: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Load generator for an OpenAI-compatible server (ctcspec serve).")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="server URL including /v1")
    parser.add_argument("--api-key", default=None, help="API key (needed when the server runs with --api-key)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels, run one after another")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--prompts", type=Path, default=None, help="text file, one prompt per line")
    parser.add_argument("--json", type=Path, default=None, dest="json_out", help="write rows and settings here")
    parser.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--same-as", type=Path, default=None,
                        help="an earlier run's --json: every prompt's answer must equal the one it recorded")
    args = parser.parse_args(argv)
    try:
        args.client_levels = [int(n) for n in args.clients.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not args.client_levels or min(args.client_levels) < 1:
        parser.error("--clients needs at least one level, each >= 1")
    return args


def demo_questions_path() -> Path:
    """Path of ctcspec/data/demo_questions.jsonl, found without importing ctcspec (that would import torch)."""
    spec = importlib.util.find_spec("ctcspec")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package ctcspec is not installed; pass --prompts FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "demo_questions.jsonl"


def load_prompts(prompts_file: Path | None) -> list[str]:
    if prompts_file is not None:
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    else:
        lines = demo_questions_path().read_text().splitlines()
        prompts = [json.loads(line)["turns"][0] for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompts found")
    return prompts


def describe_error(exc: Exception) -> tuple[str, str]:
    """(kind, message) of an exception; kinds group errors for the summary."""
    if isinstance(exc, APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"HTTP {exc.status_code}", str(body.get("message") or exc.message)
    return type(exc).__name__, str(exc) or repr(exc)


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> RequestResult:
    start = time.perf_counter()
    ttft = None
    usage, figures, text = None, {}, []
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
                figures = (chunk.model_extra or {}).get("ctcspec") or {}
    except Exception as exc:  # every failure is counted, none is fatal
        kind, message = describe_error(exc)
        return RequestResult(ok=False, error_kind=kind, error_message=message)
    latency = time.perf_counter() - start
    if usage is None:
        return RequestResult(ok=False, error_kind="MissingUsage", error_message="stream ended without a usage chunk")
    return RequestResult(ok=True, ttft=ttft, latency=latency, completion_tokens=usage.completion_tokens,
                         steps=figures.get("steps"), prompt=prompt, text="".join(text))


async def client_loop(client: AsyncOpenAI, model: str, prompts: list[str], offset: int, max_tokens: int,
                      deadline: float) -> list[RequestResult]:
    """Send requests back to back until the deadline; the request running at the deadline is finished."""
    results = []
    index = offset
    while time.perf_counter() < deadline:
        result = await one_request(client, model, prompts[index % len(prompts)], max_tokens)
        results.append(result)
        index += 1
        if not result.ok:
            await asyncio.sleep(ERROR_PAUSE_S)
    return results


async def run_level(client: AsyncOpenAI, model: str, prompts: list[str], n_clients: int, duration: float,
                    max_tokens: int) -> tuple[list[RequestResult], float]:
    """Run n_clients concurrent clients; return all results and the wall time of the level."""
    start = time.perf_counter()
    deadline = start + duration
    loops = [client_loop(client, model, prompts, i, max_tokens, deadline) for i in range(n_clients)]
    per_client = await asyncio.gather(*loops)
    elapsed = time.perf_counter() - start
    return [result for results in per_client for result in results], elapsed


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def answers_of(results: list[RequestResult]) -> dict[str, set[str]]:
    """Every text each prompt got."""
    answers: dict[str, set[str]] = {}
    for result in results:
        if result.ok:
            answers.setdefault(result.prompt, set()).add(result.text)
    return answers


def summarize(n_clients: int, results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    latencies = [r.latency for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    counted = [r for r in ok if r.steps]
    beta = sum(r.completion_tokens for r in counted) / sum(r.steps for r in counted) if counted else None
    return {
        "clients": n_clients,
        "requests": len(ok),
        "requests_per_s": len(ok) / elapsed,
        "output_tok_per_s": tokens / elapsed,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "errors": len(results) - len(ok),
        "beta": beta,
        "prompts_with_several_answers": sum(len(texts) > 1 for texts in answers_of(results).values()),
        "completion_tokens": tokens,
        "wall_s": elapsed,
    }


def report_new_errors(results: list[RequestResult], seen: set[str]) -> None:
    """Print the first message of each error kind not printed before."""
    for result in results:
        if not result.ok and result.error_kind not in seen:
            seen.add(result.error_kind)
            print(f"error ({result.error_kind}): {result.error_message}", file=sys.stderr)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| clients | requests | requests/s | output tok/s | β | TTFT p50 | TTFT p95 | latency p50 | latency p95 "
        "| errors | answers |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['requests']} | {row['requests_per_s']:.2f} | {row['output_tok_per_s']:.1f} "
            f"| {'-' if row['beta'] is None else format(row['beta'], '.2f')} "
            f"| {fmt(row['ttft_p50'])} | {fmt(row['ttft_p95'])} | {fmt(row['latency_p50'])} "
            f"| {fmt(row['latency_p95'])} | {row['errors']} "
            f"| {row['prompts_with_several_answers'] or 'same'} |"
        )
    return "\n".join(lines)


async def pick_model(client: AsyncOpenAI, requested: str | None) -> str:
    """Query /v1/models (this also checks that the server is up); return the requested or the first model."""
    models = await client.models.list()
    if requested is not None:
        return requested
    if not models.data:
        raise RuntimeError("/v1/models lists no model; pass --model")
    return models.data[0].id


async def run(args: argparse.Namespace, prompts: list[str]) -> int:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0, timeout=args.timeout)
    try:
        model = await pick_model(client, args.model)
    except APIConnectionError:
        print(f"error: cannot reach the server at {args.base_url}", file=sys.stderr)
        return 2
    except Exception as exc:  # a server that cannot list its models is not usable
        kind, message = describe_error(exc)
        print(f"error: GET {args.base_url}/models failed ({kind}): {message}", file=sys.stderr)
        return 2
    print(f"model: {model} | max tokens: {args.max_tokens} | duration: {args.duration:g} s per level "
          f"| server: {args.base_url}\n")
    rows, everything = [], []
    seen_errors: set[str] = set()
    for n_clients in args.client_levels:
        results, elapsed = await run_level(client, model, prompts, n_clients, args.duration, args.max_tokens)
        report_new_errors(results, seen_errors)
        rows.append(summarize(n_clients, results, elapsed))
        everything.extend(results)
    await client.close()
    print(markdown_table(rows))
    answers = answers_of(everything)
    several = sorted(prompt for prompt, texts in answers.items() if len(texts) > 1)
    differ = compare_answers(answers, args.same_as) if args.same_as else 0
    print(f"\nanswers: {len(answers)} prompts, {len(several)} with several answers"
          + (f", {differ} differing from {args.same_as}" if args.same_as else ""))
    if args.json_out is not None:
        settings = {"base_url": args.base_url, "model": model, "max_tokens": args.max_tokens,
                    "duration_s": args.duration, "clients": args.client_levels, "n_prompts": len(prompts),
                    "prompts_file": str(args.prompts) if args.prompts else None}
        record = {"settings": settings, "rows": rows, "answers": {p: sorted(t) for p, t in answers.items()},
                  **({"differing_from": str(args.same_as), "differing": differ} if args.same_as else {})}
        args.json_out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(row["errors"] == 0 for row in rows) and not several and not differ else 1


def compare_answers(answers: dict[str, set[str]], other: Path) -> int:
    """Prompts whose answer is not the one run `other` recorded (prompts it did not run are not counted)."""
    recorded = json.loads(other.read_text())["answers"]
    return sum(texts != set(recorded[prompt]) for prompt, texts in answers.items() if prompt in recorded)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompts = load_prompts(args.prompts)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"error: cannot load prompts: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(args, prompts))


if __name__ == "__main__":
    sys.exit(main())
