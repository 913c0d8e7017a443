"""`lora-workers top`: a refreshing table of what one worker is doing, read from its metrics
endpoint: per adapter version jobs/s, p95 latency, errors and cache hit rate over the last
interval, and consumer lag per topic."""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Snapshot:
    at: float  # monotonic seconds
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def matching(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (n, labels), v in self.samples.items() if n == name]


def parse(text: str, at: float) -> Snapshot:
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Snapshot(at, samples)


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse(response.read().decode(), time.monotonic())


@dataclass
class AdapterRow:
    adapter: str  # name@version, or "base"
    jobs_per_s: float
    errors: float  # share of results not ok over the interval
    p95_s: float | None
    cache_hit_rate: float | None


def _delta(current: Snapshot, previous: Snapshot | None, name: str) -> dict[Labels, float]:
    before = {} if previous is None else previous.samples
    return {
        labels: value - before.get((n, labels), 0.0)
        for (n, labels), value in current.samples.items()
        if n == name
    }


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (upper bound: count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            share = (rank - below) / (count - below) if count > below else 0.0
            return lower + (bound - lower) * share
        lower, below = bound, count
    return lower


def adapter_rows(current: Snapshot, previous: Snapshot | None) -> list[AdapterRow]:
    seconds = None if previous is None else max(current.at - previous.at, 1e-9)
    jobs: defaultdict[str, float] = defaultdict(float)
    failed: defaultdict[str, float] = defaultdict(float)
    for labels, value in _delta(current, previous, "lora_workers_results_total").items():
        found = dict(labels)
        key = _adapter_key(found)
        jobs[key] += value
        if found.get("status") != "ok":
            failed[key] += value
    latency: defaultdict[str, defaultdict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in _delta(
        current, previous, "lora_workers_job_latency_seconds_bucket"
    ).items():
        found = dict(labels)
        latency[_adapter_key(found)][float(found["le"])] += value
    hits: defaultdict[str, float] = defaultdict(float)
    lookups: defaultdict[str, float] = defaultdict(float)
    for labels, value in _delta(current, previous, "lora_workers_adapter_cache_total").items():
        found = dict(labels)
        if found.get("event") in ("hit", "miss"):
            lookups[found["adapter"]] += value
            hits[found["adapter"]] += value if found["event"] == "hit" else 0.0
    rows = []
    for key in sorted(jobs):
        name = key.split("@")[0]
        rows.append(
            AdapterRow(
                adapter=key,
                jobs_per_s=jobs[key] / seconds if seconds else 0.0,
                errors=failed[key] / jobs[key] if jobs[key] else 0.0,
                p95_s=quantile(0.95, latency[key]),
                cache_hit_rate=hits[name] / lookups[name] if lookups.get(name) else None,
            )
        )
    return rows


def _adapter_key(labels: dict[str, str]) -> str:
    version = labels.get("version", "")
    return labels.get("adapter", "?") + (f"@{version}" if version else "")


def lag_by_topic(current: Snapshot) -> dict[str, float]:
    lag: defaultdict[str, float] = defaultdict(float)
    for labels, value in current.matching("lora_workers_consumer_lag"):
        lag[labels["topic"]] += value
    return dict(sorted(lag.items()))


def render(current: Snapshot, previous: Snapshot | None) -> Group:
    over = "since start" if previous is None else f"last {current.at - previous.at:.0f} s"
    adapters = Table(title=f"Adapters ({over})")
    for column in ("adapter", "jobs/s", "p95 latency", "not ok", "cache hits"):
        adapters.add_column(column, justify="left" if column == "adapter" else "right")
    for row in adapter_rows(current, previous):
        adapters.add_row(
            row.adapter,
            "-" if previous is None else f"{row.jobs_per_s:,.1f}",
            "-" if row.p95_s is None else f"{row.p95_s:.2f} s",
            f"{row.errors:.1%}",
            "-" if row.cache_hit_rate is None else f"{row.cache_hit_rate:.0%}",
        )
    lag = Table(title="Consumer lag")
    lag.add_column("topic")
    lag.add_column("messages", justify="right")
    for topic, behind in lag_by_topic(current).items():
        lag.add_row(topic, f"{behind:,.0f}")
    ready = current.samples.get(("lora_workers_ready", frozenset()), 0.0)
    restarts = sum(v for _, v in current.matching("lora_workers_engine_restarts_total"))
    status = Table.grid()
    status.add_row(f"ready: {'yes' if ready else 'no'}   engine restarts: {restarts:.0f}")
    return Group(status, adapters, lag)


def run_top(url: str, interval_s: float, once: bool, console: Console | None = None) -> None:
    console = console or Console()
    previous = None if once else scrape(url)
    if once:
        console.print(render(scrape(url), None))
        return
    with Live(render(previous, None), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval_s)
            current = scrape(url)
            live.update(render(current, previous))
            previous = current
