"""The server's Prometheus metrics: traffic, queue, and what speculation is doing.

Speculation's own figures: `ctcspec_beta` and `ctcspec_draft_share` over the server's life so far, and for windows
`ctcspec_tokens_per_step` (tokens each base forward emitted: its mean is the paper's beta) and
`rate(ctcspec_draft_seconds_total) / rate(ctcspec_decode_seconds_total)`.
One registry per server, so several apps in one process (tests) never share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ctcspec.engine import GenerationStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ctcspec_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("ctcspec_prompt_tokens", "prompt tokens of admitted requests",
                                     registry=registry)
        self.generation_tokens = Counter("ctcspec_generation_tokens", "tokens generated", registry=registry)
        self.waiting = Gauge("ctcspec_requests_waiting", "admitted requests waiting for the engine", registry=registry)
        self.running = Gauge("ctcspec_requests_running", "requests the engine is generating (at most --max-batch)",
                             registry=registry)
        self.batch_sequences = Histogram("ctcspec_batch_sequences", "sequences per batched base forward "
                                         "(--max-batch)", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                                         registry=registry)
        self.batch_nodes = Histogram("ctcspec_batch_nodes", "nodes per batched base forward: every sequence's root "
                                     "and draft nodes (--max-batch)",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=registry)
        self.base_forwards = Counter("ctcspec_base_forwards", "base-model forwards (prefill included)",
                                     registry=registry)
        self.step_tokens = Histogram("ctcspec_tokens_per_step",
                                     "tokens emitted per base forward: accepted draft tokens + the base model's own",
                                     buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32), registry=registry)
        self.draft_seconds = Counter("ctcspec_draft_seconds", "time spent drafting", registry=registry)
        self.decode_seconds = Counter("ctcspec_decode_seconds", "time spent decoding after prefill (drafting, "
                                      "verification, bookkeeping)", registry=registry)
        self.queue_seconds = Histogram("ctcspec_queue_seconds", "time from admission to the engine starting",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token_seconds = Histogram("ctcspec_time_to_first_token_seconds",
                                             "time from admission to the answer's first text",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.request_seconds = Histogram("ctcspec_request_seconds", "time from admission to the last token",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self._totals = GenerationStats()  # of every finished generation; only the worker thread adds to it
        Gauge("ctcspec_beta", "tokens per base forward over the finished generations (the paper's beta)",
              registry=registry).set_function(lambda: self._totals.beta)
        Gauge("ctcspec_draft_share", "drafting's share of decoding time over the finished generations",
              registry=registry).set_function(lambda: self._totals.draft_s / (self._totals.decode_s or 1.0))

    def record_generation(self, stats: GenerationStats) -> None:
        """A finished generation's figures (its base forwards are counted by the service: a batched forward serves
        several generations)."""
        self.generation_tokens.inc(stats.new_tokens)
        self.draft_seconds.inc(stats.draft_s)
        self.decode_seconds.inc(stats.decode_s)
        totals = self._totals
        totals.new_tokens, totals.steps = totals.new_tokens + stats.new_tokens, totals.steps + stats.steps
        totals.draft_s += stats.draft_s
        totals.verify_s += stats.verify_s
        totals.bookkeeping_s += stats.bookkeeping_s
