"""Prometheus metrics of the model server, per model version, in the text exposition format.

Small and dependency-free: counters and one latency histogram, labelled by model
version, plus ``parse`` so the deploy watch window reads the same numbers a
Prometheus server would scrape.

Two views of the same traffic:

- ``gitops_ml_requests_total`` and friends count every request (dashboards, alerts).
- ``gitops_ml_watch_*`` is what the deploy watch window judges. Each client (the
  peer address; the address a *trusted* proxy reports, see ``server``) adds at most
  ``WATCH_REQUESTS_PER_CLIENT`` requests per serving period of a version (a period
  starts when the server switches to that version), and ``gitops_ml_watch_clients``
  says how many distinct clients were seen in the period. So one client, however
  many requests it sends, moves the judged numbers by at most that many requests,
  and the watch window (``deploy.min_clients``) decides nothing until enough
  distinct clients were seen. At most ``MAX_WATCHED_CLIENTS`` clients are tracked
  per period (memory bound); later ones count in the totals only.
- ``gitops_ml_error_responses_total`` counts every 4xx/5xx the app answered, by
  route and status.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict

__all__ = [
    "LATENCY_BUCKETS",
    "LOW_CONFIDENCE",
    "MAX_WATCHED_CLIENTS",
    "WATCH_REQUESTS_PER_CLIENT",
    "ServerMetrics",
    "parse",
    "version_stats",
]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOW_CONFIDENCE = 0.5
WATCH_REQUESTS_PER_CLIENT = 10
MAX_WATCHED_CLIENTS = 100_000


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (version, outcome) -> count
        self.predictions: dict[str, int] = defaultdict(int)
        self.low_confidence: dict[str, int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.batch_sizes: dict[str, int] = defaultdict(int)
        self.batches: dict[str, int] = defaultdict(int)
        self.info: dict[str, str] = {}
        # the watch window's view: per-client capped, per serving period of a version
        self.watch_tally: dict[str, dict[str, int]] = {}  # version -> client -> judged requests
        self.watch_requests: dict[tuple[str, str], int] = defaultdict(int)
        self.watch_predictions: dict[str, int] = defaultdict(int)
        self.watch_low_confidence: dict[str, int] = defaultdict(int)
        self.watch_latency_sum: dict[str, float] = defaultdict(float)
        self.watch_latency_count: dict[str, int] = defaultdict(int)
        self.error_responses: dict[tuple[str, int], int] = defaultdict(int)  # (route, status) -> count

    def start_period(self, version: str) -> None:
        """The server now serves ``version``: every client may again add up to the cap to its judged numbers."""
        with self._lock:
            self.watch_tally = {version: {}}

    def observe_request(
        self, version: str, outcome: str, seconds: float, client: str | None = None, top_probabilities=()
    ) -> None:
        """One answered ``/predict`` request of ``version`` (``top_probabilities``: one per classified image)."""
        low = int(sum(1 for p in top_probabilities if p < LOW_CONFIDENCE))
        with self._lock:
            self.requests[(version, outcome)] += 1
            self.latency_sum[version] += seconds
            self.latency_count[version] += 1
            buckets = self.latency_buckets[version]
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.predictions[version] += len(top_probabilities)
            self.low_confidence[version] += low
            if client is None:
                return
            tally = self.watch_tally.setdefault(version, {})
            seen = tally.get(client)
            if seen is None:
                if len(tally) >= MAX_WATCHED_CLIENTS:
                    return
                seen = 0
            if seen >= WATCH_REQUESTS_PER_CLIENT:
                return
            tally[client] = seen + 1
            self.watch_requests[(version, outcome)] += 1
            self.watch_latency_sum[version] += seconds
            self.watch_latency_count[version] += 1
            self.watch_predictions[version] += len(top_probabilities)
            self.watch_low_confidence[version] += low

    def observe_predictions(self, version: str, top_probabilities) -> None:
        """Predictions outside a request (kept for callers that count images alone; not judged)."""
        with self._lock:
            self.predictions[version] += len(top_probabilities)
            self.low_confidence[version] += int(sum(1 for p in top_probabilities if p < LOW_CONFIDENCE))

    def observe_error(self, route: str, status: int) -> None:
        with self._lock:
            self.error_responses[(route, status)] += 1

    def observe_batch(self, version: str, size: int) -> None:
        with self._lock:
            self.batches[version] += 1
            self.batch_sizes[version] += size

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP gitops_ml_requests_total Prediction requests by model version and outcome.",
                "# TYPE gitops_ml_requests_total counter",
            ]
            lines += [
                f'gitops_ml_requests_total{{model_version="{v}",outcome="{o}"}} {n}'
                for (v, o), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP gitops_ml_request_latency_seconds Latency of prediction requests.",
                "# TYPE gitops_ml_request_latency_seconds histogram",
            ]
            for version in sorted(self.latency_count):
                for bound, count in zip(LATENCY_BUCKETS, self.latency_buckets[version], strict=True):
                    lines.append(
                        f'gitops_ml_request_latency_seconds_bucket{{model_version="{version}",le="{bound}"}} {count}'
                    )
                lines.append(
                    f'gitops_ml_request_latency_seconds_bucket{{model_version="{version}",le="+Inf"}} '
                    f"{self.latency_count[version]}"
                )
                lines.append(
                    f'gitops_ml_request_latency_seconds_sum{{model_version="{version}"}} '
                    f"{self.latency_sum[version]:.6f}"
                )
                lines.append(
                    f'gitops_ml_request_latency_seconds_count{{model_version="{version}"}} '
                    f"{self.latency_count[version]}"
                )
            for name, values, text in (
                ("gitops_ml_predictions_total", self.predictions, "Images classified."),
                (
                    "gitops_ml_low_confidence_predictions_total",
                    self.low_confidence,
                    f"Predictions whose top probability is below {LOW_CONFIDENCE}.",
                ),
                ("gitops_ml_batches_total", self.batches, "Compiled model calls."),
                ("gitops_ml_batched_images_total", self.batch_sizes, "Images sent through compiled calls."),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
                lines += [f'{name}{{model_version="{v}"}} {n}' for v, n in sorted(values.items())]
            lines += [
                "# HELP gitops_ml_watch_requests_total Requests judged by the deploy watch window "
                f"(at most {WATCH_REQUESTS_PER_CLIENT} per client per serving period).",
                "# TYPE gitops_ml_watch_requests_total counter",
            ]
            lines += [
                f'gitops_ml_watch_requests_total{{model_version="{v}",outcome="{o}"}} {n}'
                for (v, o), n in sorted(self.watch_requests.items())
            ]
            for name, series, text, kind in (
                ("gitops_ml_watch_predictions_total", self.watch_predictions, "Images of judged requests.", "counter"),
                (
                    "gitops_ml_watch_low_confidence_predictions_total",
                    self.watch_low_confidence,
                    "Low-confidence predictions of judged requests.",
                    "counter",
                ),
                (
                    "gitops_ml_watch_latency_seconds_sum",
                    self.watch_latency_sum,
                    "Latency of judged requests.",
                    "counter",
                ),
                (
                    "gitops_ml_watch_latency_seconds_count",
                    self.watch_latency_count,
                    "Judged requests timed.",
                    "counter",
                ),
                (
                    "gitops_ml_watch_clients",
                    {v: len(t) for v, t in self.watch_tally.items()},
                    "Distinct clients of the version's current serving period.",
                    "gauge",
                ),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                lines += [
                    f'{name}{{model_version="{v}"}} {n:.6f}'
                    if isinstance(n, float)
                    else f'{name}{{model_version="{v}"}} {n}'
                    for v, n in sorted(series.items())
                ]
            lines += [
                "# HELP gitops_ml_error_responses_total Error responses (4xx/5xx) by route and status.",
                "# TYPE gitops_ml_error_responses_total counter",
            ]
            lines += [
                f'gitops_ml_error_responses_total{{route="{r}",status="{c}"}} {n}'
                for (r, c), n in sorted(self.error_responses.items())
            ]
            lines += [
                "# HELP gitops_ml_model_info The model version being served (value 1).",
                "# TYPE gitops_ml_model_info gauge",
            ]
            if self.info:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(self.info.items()))
                lines.append(f"gitops_ml_model_info{{{labels}}} 1")
            return "\n".join(lines) + "\n"


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: ``[(name, labels, value), ...]``."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group("labels") or ""))
            samples.append((match.group("name"), labels, float(match.group("value"))))
    return samples


def version_stats(samples, version: str) -> dict[str, float]:
    """What the watch window judges of one model version: the per-client capped ``gitops_ml_watch_*`` numbers.

    ``errors`` are model failures (outcome ``error``); bad requests and server bugs
    (``server_error``) are requests but not errors of the model.
    """

    def total(name: str, **match: str) -> float:
        return sum(
            v
            for n, labels, v in samples
            if n == name
            and labels.get("model_version") == version
            and all(labels.get(k) == val for k, val in match.items())
        )

    return {
        "requests": total("gitops_ml_watch_requests_total"),
        "errors": total("gitops_ml_watch_requests_total", outcome="error"),
        "predictions": total("gitops_ml_watch_predictions_total"),
        "low_confidence": total("gitops_ml_watch_low_confidence_predictions_total"),
        "latency_sum": total("gitops_ml_watch_latency_seconds_sum"),
        "latency_count": total("gitops_ml_watch_latency_seconds_count"),
        "clients": total("gitops_ml_watch_clients"),
    }
