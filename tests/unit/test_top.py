"""`lora-workers top`'s arithmetic over two scrapes, on plain exposition text."""

from __future__ import annotations

import pytest

from workers.top import adapter_rows, lag_by_topic, parse, quantile

FIRST = """
lora_workers_results_total{task="c",adapter="clf",version="1",status="ok"} 10
lora_workers_results_total{task="reply",adapter="base",version="",status="ok"} 4
lora_workers_job_latency_seconds_bucket{task="c",adapter="clf",version="1",le="0.5"} 8
lora_workers_job_latency_seconds_bucket{task="c",adapter="clf",version="1",le="1.0"} 10
lora_workers_job_latency_seconds_bucket{task="c",adapter="clf",version="1",le="+Inf"} 10
lora_workers_adapter_cache_total{adapter="clf",event="hit"} 3
lora_workers_adapter_cache_total{adapter="clf",event="miss"} 1
lora_workers_consumer_lag{topic="jobs.classify",partition="0"} 5
lora_workers_consumer_lag{topic="jobs.classify",partition="1"} 7
"""
SECOND = """
lora_workers_results_total{task="c",adapter="clf",version="1",status="ok"} 28
lora_workers_results_total{task="c",adapter="clf",version="1",status="invalid_output"} 2
lora_workers_results_total{task="reply",adapter="base",version="",status="ok"} 4
lora_workers_job_latency_seconds_bucket{task="c",adapter="clf",version="1",le="0.5"} 8
lora_workers_job_latency_seconds_bucket{task="c",adapter="clf",version="1",le="1.0"} 20
lora_workers_job_latency_seconds_bucket{task="c",adapter="clf",version="1",le="+Inf"} 30
lora_workers_adapter_cache_total{adapter="clf",event="hit"} 12
lora_workers_adapter_cache_total{adapter="clf",event="miss"} 1
lora_workers_consumer_lag{topic="jobs.classify",partition="0"} 0
"""


def test_rates_errors_latency_and_cache_over_the_interval() -> None:
    first, second = parse(FIRST, at=100.0), parse(SECOND, at=110.0)
    rows = {row.adapter: row for row in adapter_rows(second, first)}
    classifier = rows["clf@1"]
    assert classifier.jobs_per_s == pytest.approx(2.0)  # 20 results in 10 s
    assert classifier.errors == pytest.approx(0.1)  # 2 of 20 not ok
    # Of the interval's 20 latencies: 0 below 0.5 s, 10 below 1 s, 10 above: p95 is past 1 s.
    assert classifier.p95_s == pytest.approx(1.0)
    assert classifier.cache_hit_rate == pytest.approx(1.0)  # 9 hits, 0 misses
    assert rows["base"].jobs_per_s == 0.0 and rows["base"].p95_s is None
    assert lag_by_topic(first) == {"jobs.classify": 12.0}


def test_the_first_frame_counts_since_start() -> None:
    rows = {row.adapter: row for row in adapter_rows(parse(FIRST, at=5.0), None)}
    assert rows["clf@1"].p95_s == pytest.approx(0.5 + 0.5 * (9.5 - 8) / 2)
    assert rows["clf@1"].cache_hit_rate == pytest.approx(0.75)


def test_quantile_interpolates_within_a_bucket() -> None:
    assert quantile(0.5, {0.1: 0.0, 0.2: 10.0, float("inf"): 10.0}) == pytest.approx(0.15)
    assert quantile(0.5, {}) is None
