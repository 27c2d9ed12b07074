"""`GET /metrics`: the server's counters and latencies in Prometheus' text format (prometheus-client).

The names are vLLM's with `gptforge:` in place of `vllm:` (docs/serve.md lists each one's vLLM twin), so a
dashboard made for vLLM needs only the prefix changed. Each server has a registry of its own, never the global
one. The engine's thread reports each sequence's start, tokens and end (`started`, `token`, `finished`); the
running and waiting counts and the prefix cache's totals are read from the engine when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "gptforge:"
_FAST = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_SLOW = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServeMetrics:
    """The instruments of one server, in a registry of their own; `engine` is read at each scrape."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = None
        labels, values = ["model_name"], [model_name]
        self.label = model_name

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets).labels(*values)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Seconds from a request's arrival to its first token", _FAST
        )
        self.itl = histogram("inter_token_latency_seconds", "Seconds between a sequence's successive tokens", _FAST)
        self.e2e = histogram("e2e_request_latency_seconds", "Seconds from a sequence's arrival to its end", _SLOW)
        self.queue = histogram("request_queue_time_seconds", "Seconds a sequence waited before its prefill", _SLOW)
        self.generated = Counter(
            PREFIX + "generation_tokens", "Tokens generated", labels, registry=self.registry
        ).labels(*values)
        self.prompt = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", labels, registry=self.registry)
        self.prompt = self.prompt.labels(*values)
        self.success = Counter(
            PREFIX + "request_success",
            "Sequences that ended, by finish reason",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- reported by the engine's thread ---------------------------------------------------------------------
    def started(self, s) -> None:
        self.queue.observe(time.monotonic() - s.times[0])
        self.prompt.inc(len(s.prompt))

    def token(self, s) -> None:
        now = time.monotonic()
        if len(s.times) == 1:
            self.ttft.observe(now - s.times[0])
            s.times.append(now)
        else:
            self.itl.observe(now - s.times[-1])
            s.times[-1] = now
        self.generated.inc()

    def finished(self, s, reason: str) -> None:
        self.e2e.observe(time.monotonic() - s.times[0])
        self.success.labels(self.label, reason).inc()


class _EngineCollector:
    """What the engine knows at scrape time: running and waiting sequences, cancellations, the prefix cache."""

    def __init__(self, metrics: ServeMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        engine = self.metrics.engine
        if engine is None:
            return
        stats, label = engine.stats(), [self.metrics.label]

        def family(kind, name: str, doc: str, value: float):
            f = kind(PREFIX + name, doc, labels=["model_name"])
            f.add_metric(label, value)
            return f

        yield family(GaugeMetricFamily, "num_requests_running", "Sequences being decoded", stats["running"])
        yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to start", stats["waiting"])
        yield family(CounterMetricFamily, "num_requests_cancelled", "Sequences whose client left", stats["cancelled"])
        cache = stats["prefix_cache"] or {"queries": 0, "hits": 0, "bytes": 0}
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up", cache["queries"])
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the cache", cache["hits"])
        yield family(GaugeMetricFamily, "prefix_cache_bytes", "Memory the prefix cache holds", cache["bytes"])
