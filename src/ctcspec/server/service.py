"""One engine serving many requests: a bounded queue, and a worker thread that runs them.

`GenerationService` runs one generation at a time (SpeculativeEngine); `BatchGenerationService` runs up to the
engine's `max_batch` together (BatchEngine, continuous batching: a waiting job joins at the next step after a row
frees up).

Invariant: the model runs on exactly one thread (the worker), jobs start in arrival order; a request's coroutine only
ever sees its job's events, and every job the worker takes up ends with one Finished or Failed (jobs still waiting
when the server stops are dropped, their clients gone). A job that is cancelled (its client went away, or the server
is stopping) ends at the engine's next emitted token through a stopping criterion, so its row is free again within
one step, and a job cancelled while still waiting never reaches the engine. At most `max_queue` jobs are admitted
(waiting or running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ctcspec.batch import BatchEngine
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


class EngineService(ABC):
    """The engine behind the server. Requests are prepared on the event loop — transformers validates their
    settings and builds their processors, no forward runs — so a setting generate refuses is an error before
    anything streams; only the worker thread runs the model. Subclasses say how the worker runs the jobs."""

    def __init__(self, engine: SpeculativeEngine | BatchEngine, tokenizer, max_queue: int, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.max_queue, self.metrics = engine, tokenizer, max_queue, metrics
        self.context, self.context_note = engine.context_limit_of()
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
        self._start(job)
        return job

    @abstractmethod
    def _start(self, job: Job) -> None:
        """Hand an admitted job to the worker."""

    @abstractmethod
    def close(self) -> None:
        """Take no new jobs, cancel the admitted ones (running ones end at their next step, waiting ones are
        dropped); does not wait."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Until the worker has finished its last step."""

    def _done(self, job: Job) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed after a forced exit: nothing to tidy
            job.loop.call_soon_threadsafe(self._jobs.discard, job)

    def _started(self, job: Job) -> float:
        """Count a job the engine takes up; its time in the queue."""
        queue_s = time.perf_counter() - job.admitted
        self.metrics.queue_seconds.observe(queue_s)
        self.metrics.running.inc()
        return queue_s

    def _streamer(self, job: Job, text: ReleasedText) -> Callable[[list[int]], None]:
        """The engine's on_tokens for a job: each step's released text goes to the job."""
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
        return on_tokens

    def _finished(self, job: Job, text: ReleasedText, stats: GenerationStats, queue_s: float) -> Finished:
        """A job's last event, once the engine is done with it (and its figures in the metrics)."""
        self.metrics.record_generation(stats)
        self.metrics.request_seconds.observe(time.perf_counter() - job.admitted)
        finish = "stop" if text.stopped else FINISH_REASONS.get(stats.stop_reason, "stop")
        return Finished(text.finish(), finish, stats.new_tokens, request_stats(stats, self.drafter, queue_s, job.seed))


def failure(exc: Exception) -> Failed:
    """A job's last event when generation raised: the message of a CtcspecError, else one line (the log has the
    traceback)."""
    if isinstance(exc, CtcspecError):
        return Failed(str(exc))
    log.exception("generation failed")
    return Failed(f"internal error during generation ({type(exc).__name__})")


class GenerationService(EngineService):
    """One generation at a time (a SpeculativeEngine), in arrival order, on one worker thread."""

    engine: SpeculativeEngine

    def __init__(self, engine: SpeculativeEngine, tokenizer, max_queue: int, metrics: ServerMetrics):
        super().__init__(engine, tokenizer, max_queue, metrics)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctcspec-engine")

    def _start(self, job: Job) -> None:
        self._worker.submit(self._run, job).add_done_callback(lambda _: self._done(job))

    def _run(self, job: Job) -> None:
        """On the worker thread: one generation; the job always gets a last event, Finished or Failed."""
        self.metrics.waiting.dec()
        try:
            job.put(self._generate(job))
        except Exception as exc:  # never a traceback to the client
            job.put(failure(exc))

    def _generate(self, job: Job) -> Finished | Failed:
        """The generation itself, its text sent to the job as each step ends."""
        if job.cancelled.is_set():
            return Failed("cancelled before it started")
        queue_s = self._started(job)
        text = ReleasedText(self.tokenizer, job.stops)
        try:
            stats = self.engine.generate(job.prompt_ids, job.max_new_tokens, on_tokens=self._streamer(job, text),
                                         decoding=job.decoding).stats
        finally:
            self.metrics.running.dec()
        self.metrics.base_forwards.inc(stats.steps)
        return self._finished(job, text, stats, queue_s)

    def close(self) -> None:
        self._closing = True
        for job in list(self._jobs):
            job.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def wait_closed(self) -> None:
        await asyncio.to_thread(self._worker.shutdown, wait=True)


Running = dict[int, tuple[Job, ReleasedText, float]]  # the batch engine's request id -> (job, its text, queue time)


class BatchGenerationService(EngineService):
    """Up to `engine.max_batch` jobs decode together (a BatchEngine) on one worker thread, which moves waiting jobs
    into free rows at every step, in arrival order, and sends each job its events. A step that raises fails the jobs
    it was running (the others, waiting, go on)."""

    engine: BatchEngine

    def __init__(self, engine: BatchEngine, tokenizer, max_queue: int, metrics: ServerMetrics):
        super().__init__(engine, tokenizer, max_queue, metrics)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()  # None: the service is closing
        self._thread = threading.Thread(target=self._loop, name="ctcspec-batch-engine", daemon=True)
        self._thread.start()

    def _start(self, job: Job) -> None:
        self._inbox.put(job)

    def _loop(self) -> None:
        """On the worker thread: admit, step, answer, until closed and every running job has ended."""
        pending: deque[Job] = deque()
        running: Running = {}
        closing = False
        while not (closing and not running):
            closing = self._take(pending, block=not running and not pending) or closing
            if closing:
                self._drop(pending, "the server is shutting down")
            self._drop_cancelled(pending)
            self._admit(pending, running)
            if running:
                self._step(running)

    def _take(self, pending: deque[Job], block: bool) -> bool:
        """Move the inbox's jobs to `pending` (waiting for the first when `block`); True once closing."""
        try:
            job = self._inbox.get(block=block)
            while True:
                if job is None:
                    return True
                pending.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            return False

    def _end(self, job: Job, event: Finished | Failed) -> None:
        """Send a job its last event."""
        job.put(event)
        self._done(job)

    def _drop(self, pending: deque[Job], message: str) -> None:
        while pending:
            self.metrics.waiting.dec()
            self._end(pending.popleft(), Failed(message))

    def _drop_cancelled(self, pending: deque[Job]) -> None:
        """Waiting jobs whose clients left go now, not when a row frees up (they count against --max-queue)."""
        for job in [job for job in pending if job.cancelled.is_set()]:
            pending.remove(job)
            self.metrics.waiting.dec()
            self._end(job, Failed("cancelled before it started"))

    def _admit(self, pending: deque[Job], running: Running) -> None:
        """Waiting jobs into the engine's free rows, in arrival order."""
        while pending and len(running) < self.engine.max_batch:
            job = pending.popleft()
            self.metrics.waiting.dec()
            queue_s = self._started(job)
            text = ReleasedText(self.tokenizer, job.stops)
            try:
                request = self.engine.submit(job.prompt_ids, job.max_new_tokens, on_tokens=self._streamer(job, text),
                                             decoding=job.decoding)
            except Exception as exc:
                self.metrics.running.dec()
                self._end(job, failure(exc))
                continue
            running[request] = (job, text, queue_s)

    def _step(self, running: Running) -> None:
        """One engine step; finished jobs get their last event. A step that raises (a drafter's error, a job's
        callback) fails every running job and empties the engine."""
        try:
            finished = self.engine.step()
        except Exception as exc:
            self.engine.clear()
            event = failure(exc)
            finished = dict.fromkeys(running, event)
        self.metrics.base_forwards.inc(len(self.engine.last_forwards))
        for sequences, nodes in self.engine.last_forwards:
            self.metrics.batch_sequences.observe(sequences)
            self.metrics.batch_nodes.observe(nodes)
        for request, result in finished.items():
            job, text, queue_s = running.pop(request)
            self.metrics.running.dec()
            try:
                event = result if isinstance(result, Failed) else self._finished(job, text, result.stats, queue_s)
            except Exception as exc:
                event = failure(exc)
            self._end(job, event)

    def close(self) -> None:
        self._closing = True
        for job in list(self._jobs):
            job.cancel()
        self._inbox.put(None)

    async def wait_closed(self) -> None:
        await asyncio.to_thread(self._thread.join)
