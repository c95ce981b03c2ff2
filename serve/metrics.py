"""Request counts by route and status, and latency percentiles over a bounded window of recent requests.

Kept in process memory (no dependency): served as JSON, or in Prometheus' text format when the client asks for
text/plain (as Prometheus' scraper does).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict, deque

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Metrics:
    """Thread-safe counters; each route keeps the latencies of its last `window` requests."""

    def __init__(self, window: int = 1024) -> None:
        self.window = window
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._latencies: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=self.window))
        self._latency_sums: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter()

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        with self._lock:
            self._counts[(route, status)] += 1
            self._latencies[route].append(seconds)
            self._latency_sums[route] += seconds

    def add_tokens(self, prompt: int, completion: int) -> None:
        """Record the tokens of one generation."""
        with self._lock:
            self._tokens["prompt"] += prompt
            self._tokens["completion"] += completion

    def snapshot(self, pending: int, generations: dict[str, int] | None = None) -> dict:
        """Everything as one JSON-ready dict; `pending` is the number of generations queued or running,
        `generations` the model worker's count of generations by outcome (completed, cancelled_timeout, ...)."""
        with self._lock:
            counts = dict(self._counts)
            latencies = {route: sorted(values) for route, values in self._latencies.items()}
            sums = dict(self._latency_sums)
            tokens = dict(self._tokens)
        requests: dict[str, dict[str, int]] = defaultdict(dict)
        for (route, status), count in sorted(counts.items()):
            requests[route][str(status)] = count
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": dict(requests),
            "latency_s": {route: {"window": len(values),
                                  **{f"p{q}": round(percentile(values, q), 6) for q in PERCENTILES},
                                  "total_s": round(sums[route], 6),
                                  "count": sum(c for (r, _), c in counts.items() if r == route)}
                          for route, values in latencies.items() if values},
            "tokens": {"prompt": tokens.get("prompt", 0), "completion": tokens.get("completion", 0)},
            "pending_generations": pending,
            "generations": dict(generations or {}),
        }

    def prometheus(self, pending: int, generations: dict[str, int] | None = None) -> str:
        """The same numbers in Prometheus' text exposition format (window quantiles, all-time sum and count)."""
        snap = self.snapshot(pending, generations)
        lines = ["# HELP molmocap_requests_total HTTP requests answered, by route and status.",
                 "# TYPE molmocap_requests_total counter"]
        for route, statuses in snap["requests"].items():
            for status, count in statuses.items():
                lines.append(f'molmocap_requests_total{{route="{route}",status="{status}"}} {count}')
        lines += ["# HELP molmocap_request_latency_seconds Request latency over the most recent requests.",
                  "# TYPE molmocap_request_latency_seconds summary"]
        for route, stats in snap["latency_s"].items():
            for q in PERCENTILES:
                lines.append(f'molmocap_request_latency_seconds{{route="{route}",quantile="{q / 100}"}} '
                             f'{stats[f"p{q}"]}')
            lines.append(f'molmocap_request_latency_seconds_sum{{route="{route}"}} {stats["total_s"]}')
            lines.append(f'molmocap_request_latency_seconds_count{{route="{route}"}} {stats["count"]}')
        lines += ["# HELP molmocap_tokens_total Tokens processed, by kind.",
                  "# TYPE molmocap_tokens_total counter"]
        lines += [f'molmocap_tokens_total{{kind="{kind}"}} {count}' for kind, count in snap["tokens"].items()]
        lines += ["# HELP molmocap_generations_total Generations by outcome (completed, failed, bad_image, rejected, "
                  "cancelled_<reason>, skipped_<reason>).",
                  "# TYPE molmocap_generations_total counter"]
        lines += [f'molmocap_generations_total{{outcome="{outcome}"}} {count}'
                  for outcome, count in snap["generations"].items()]
        lines += ["# HELP molmocap_pending_generations Generations queued on or running on the model.",
                  "# TYPE molmocap_pending_generations gauge",
                  f"molmocap_pending_generations {pending}",
                  "# HELP molmocap_uptime_seconds Seconds since the server started.",
                  "# TYPE molmocap_uptime_seconds gauge",
                  f"molmocap_uptime_seconds {snap['uptime_s']}"]
        return "\n".join(lines) + "\n"
