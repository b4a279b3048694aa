"""One engine serving many requests: a bounded queue, one generation at a time on a worker thread.

Invariant: the model runs on exactly one thread (the worker), one generation at a time, in arrival order; a
request's coroutine only ever sees its job's events, and every job the worker takes up ends with one Finished or
Failed (jobs still waiting when the server stops are dropped, their clients gone). A job that is
cancelled (its client went away, or the server is stopping) ends at the engine's next emitted token through a
stopping criterion, so the engine is free again within one step, and a job cancelled while still waiting never
reaches the engine. At most `max_queue` jobs are admitted (waiting or running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ctcspec.decoding import Decoding, decoding_for
from ctcspec.engine import GenerationStats, SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.server.metrics import ServerMetrics
from ctcspec.text import ReleasedText, decode, first_stop

log = logging.getLogger(__name__)

# the engine's stop reasons as OpenAI's finish reasons (a stop string, or a cancelled job, ends in a criterion)
FINISH_REASONS = {"eos": "stop", "stopping_criteria": "stop", "max_new_tokens": "length", "context_limit": "length"}


class QueueFull(Exception):
    """More jobs than the queue admits."""


class ShuttingDown(Exception):
    """The service is draining: it takes no new jobs."""


class EndCriteria(StoppingCriteria):
    """Ends a generation when its job is cancelled or its text holds a stop string (checked per emitted token, as
    generate checks its criteria)."""

    def __init__(self, tokenizer, prompt_len: int, stops: Sequence[str], cancelled: threading.Event):
        self.tokenizer, self.prompt_len, self.stops, self.cancelled = tokenizer, prompt_len, tuple(stops), cancelled

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = self.cancelled.is_set()
        if self.stops and not done:
            text = decode(self.tokenizer, input_ids[0, self.prompt_len:])
            done = first_stop(text, self.stops) >= 0
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class StepText:
    """Text one base forward released: it emitted `step_tokens` tokens (all but the last from the draft)."""
    text: str
    step: int
    step_tokens: int


@dataclass(frozen=True)
class Finished:
    """A job's last event when it ran to its end: the rest of its text, and its figures."""
    text: str                  # the rest of the text
    finish_reason: str         # stop | length
    completion_tokens: int
    stats: dict                # the request's speculation figures (GenerationStats + drafter, queue time, seed)


@dataclass(frozen=True)
class Failed:
    """A job's last event when it could not run (or was cancelled before it started)."""
    message: str


@dataclass(frozen=True, eq=False)
class Job:
    """One admitted request: what to generate, and the channel its events come back on."""
    prompt_ids: list[int]
    max_new_tokens: int
    decoding: Decoding
    stops: tuple[str, ...]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, event) -> None:
        """From the worker thread: hand an event to the request's coroutine (none left once the loop is closed,
        after a forced exit)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def stream(self) -> AsyncIterator[StepText | Finished | Failed]:
        """The job's events, up to and including its Finished or Failed."""
        while True:
            event = await self.events.get()
            yield event
            if not isinstance(event, StepText):
                return


def request_stats(stats: GenerationStats, drafter: str, queue_s: float, seed: int | None) -> dict:
    """The per-request figures every response carries under "ctcspec"."""
    return {"drafter": drafter, "beta": round(stats.beta, 3), "tokens_per_s": round(stats.tokens_per_s, 2),
            "steps": stats.steps, "new_tokens": stats.new_tokens,
            "draft_share": round(stats.draft_s / stats.decode_s, 3) if stats.decode_s else 0.0,
            "stop_reason": stats.stop_reason, "queue_s": round(queue_s, 3), "seed": seed}


class GenerationService:
    """The engine behind the server. Requests are prepared on the event loop — transformers validates their
    settings and builds their processors, no forward runs — so a setting generate refuses is an error before
    anything streams; only the worker thread runs the model."""

    def __init__(self, engine: SpeculativeEngine, tokenizer, max_queue: int, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.max_queue, self.metrics = engine, tokenizer, max_queue, metrics
        self.context, self.context_note = engine.backend.context_limit(engine.max_context)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctcspec-engine")
        self._jobs: set[Job] = set()   # admitted, not yet done; only touched on the event loop
        self._closing = False
        self.started = time.time()

    @property
    def drafter(self) -> str:
        return self.engine.drafter.name

    def room(self, prompt_ids: Sequence[int]) -> int:
        """Tokens the context leaves for generation after this prompt."""
        return self.context - len(prompt_ids)

    def submit(self, prompt_ids: list[int], max_new_tokens: int, settings: dict, seed: int | None,
               stops: Sequence[str]) -> Job:
        """Admit a request (CtcspecError for settings generate refuses; QueueFull; ShuttingDown) and queue it.
        Sampling without a seed gets a fresh one, reported with the response so the output can be reproduced."""
        if self._closing:
            raise ShuttingDown
        if len(self._jobs) >= self.max_queue:
            raise QueueFull
        if settings.get("do_sample") and seed is None:
            seed = secrets.randbelow(2**31)
        cancelled = threading.Event()
        end = EndCriteria(self.tokenizer, len(prompt_ids), stops, cancelled)
        decoding = decoding_for(self.engine.model, prompt_ids, seed=seed, max_new_tokens=max_new_tokens,
                                stopping_criteria=StoppingCriteriaList([end]), **settings)
        job = Job(prompt_ids, max_new_tokens, decoding, tuple(stops), seed, asyncio.get_running_loop(), cancelled)
        self._jobs.add(job)
        self.metrics.waiting.inc()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._worker.submit(self._run, job).add_done_callback(lambda _: self._done(job))
        return job

    def _done(self, job: Job) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed after a forced exit: nothing to tidy
            job.loop.call_soon_threadsafe(self._jobs.discard, job)

    def _run(self, job: Job) -> None:
        """On the worker thread: one generation; the job always gets a last event, Finished or Failed."""
        self.metrics.waiting.dec()
        try:
            job.put(self._generate(job))
        except CtcspecError as exc:
            job.put(Failed(str(exc)))
        except Exception as exc:  # never a traceback to the client; the log has it
            log.exception("generation failed")
            job.put(Failed(f"internal error during generation ({type(exc).__name__})"))

    def _generate(self, job: Job) -> Finished | Failed:
        """The generation itself, its text sent to the job as each step ends."""
        if job.cancelled.is_set():
            return Failed("cancelled before it started")
        queue_s = time.perf_counter() - job.admitted
        self.metrics.queue_seconds.observe(queue_s)
        text = ReleasedText(self.tokenizer, job.stops)
        steps = 0

        def on_tokens(tokens: list[int]) -> None:
            nonlocal steps
            steps += 1
            self.metrics.step_tokens.observe(len(tokens))
            nothing_yet = text.released == 0
            released = text.add(tokens)
            if nothing_yet and released:
                self.metrics.first_token_seconds.observe(time.perf_counter() - job.admitted)
            job.put(StepText(released, steps, len(tokens)))

        self.metrics.running.inc()
        try:
            stats = self.engine.generate(job.prompt_ids, job.max_new_tokens, on_tokens=on_tokens,
                                         decoding=job.decoding).stats
        finally:
            self.metrics.running.dec()
        self.metrics.record_generation(stats)
        self.metrics.request_seconds.observe(time.perf_counter() - job.admitted)
        finish = "stop" if text.stopped else FINISH_REASONS.get(stats.stop_reason, "stop")
        return Finished(text.finish(), finish, stats.new_tokens, request_stats(stats, self.drafter, queue_s, job.seed))

    def close(self) -> None:
        """Take no new jobs, cancel the admitted ones (the running one ends at its next step, the waiting ones are
        dropped); does not wait."""
        self._closing = True
        for job in list(self._jobs):
            job.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def wait_closed(self) -> None:
        """Until the worker has finished its last step."""
        await asyncio.to_thread(self._worker.shutdown, wait=True)
