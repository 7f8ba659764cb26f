"""The server's Prometheus metrics: request counts and latencies per endpoint, tokens and decode steps
per model, batch sizes, and live gauges (tokens per second, requests in flight, queue, running)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping

__all__ = ["Metrics"]


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        return [*out, f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    """Counters and histograms for ``/metrics``, updated from the event loop and the worker threads."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
    RATE_WINDOW_S = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.generated_tokens: dict[str, int] = {}
        self.steps: dict[str, int] = {}
        self.batch_rows: dict[str, _Histogram] = {}
        self._recent: dict[str, deque[tuple[float, int]]] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, model: str, rows: int, prompt_tokens: int) -> None:
        with self._lock:
            self.batch_rows.setdefault(model, _Histogram(self.BATCH_BUCKETS)).observe(rows)
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens

    def observe_step(self, model: str, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens[model] = self.generated_tokens.get(model, 0) + tokens
            self.steps[model] = self.steps.get(model, 0) + 1
            recent = self._recent.setdefault(model, deque())
            recent.append((now, tokens))
            while recent and recent[0][0] < now - self.RATE_WINDOW_S:
                recent.popleft()

    def tokens_per_second(self, model: str) -> float:
        now = time.monotonic()
        with self._lock:
            return (
                sum(n for t, n in self._recent.get(model, ()) if t >= now - self.RATE_WINDOW_S)
                / self.RATE_WINDOW_S
            )

    def render(self, gauges: Mapping[str, Mapping[str, float]]) -> str:
        """Prometheus text format 0.0.4; ``gauges[metric][model]`` are the live values."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))

        with self._lock:
            head("moeforge_requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (ep, status), n in sorted(self.requests.items()):
                out.append(f'moeforge_requests_total{{endpoint="{_label(ep)}",status="{status}"}} {n}')
            head("moeforge_request_duration_seconds", "histogram", "Request latency (until the last byte).")
            for ep, h in sorted(self.latency.items()):
                out.extend(h.lines("moeforge_request_duration_seconds", f'endpoint="{_label(ep)}"'))
            for name, table, text in (
                ("moeforge_prompt_tokens_total", self.prompt_tokens, "Prompt tokens prefilled."),
                ("moeforge_generated_tokens_total", self.generated_tokens, "Tokens generated."),
                (
                    "moeforge_decode_steps_total",
                    self.steps,
                    "Batched forward passes (prefills and decode steps).",
                ),
            ):
                head(name, "counter", text)
                out.extend(f'{name}{{model="{_label(m)}"}} {v}' for m, v in sorted(table.items()))
            head("moeforge_batch_rows", "histogram", "Requests (choices) per decode batch when it starts.")
            for m, h in sorted(self.batch_rows.items()):
                out.extend(h.lines("moeforge_batch_rows", f'model="{_label(m)}"'))
        for name, per_model in gauges.items():
            head(name, "gauge", _GAUGES[name])
            out.extend(f'{name}{{model="{_label(m)}"}} {v:g}' for m, v in sorted(per_model.items()))
        return "\n".join(out) + "\n"


_GAUGES = {
    "moeforge_tokens_per_second": f"Tokens generated per second over the last {Metrics.RATE_WINDOW_S:g} s.",
    "moeforge_requests_in_flight": "HTTP generation requests admitted and not yet answered.",
    "moeforge_queue_depth": "Choices waiting for a decode slot.",
    "moeforge_running": "Choices being decoded.",
}
