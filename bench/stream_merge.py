"""Benchmark: merged turns in a live stream (`merge.streaming`), Kafka → worker → result topic.

    .venv/bin/python bench/stream_merge.py [--jobs 4096] [--share 0.9] [--load 0.8]
        [--seconds 20] [--repeats 2] [--others-max-wait-ms 2000]

Two workers on one broker, side by side: one with `LORA_WORKERS_MERGE__STREAMING=true`, one
without (the LoRA path). `share` of the jobs are the classifier adapter's; the rest are spread
over the other three adapters and the base model.
1. Throughput: `jobs` jobs published at once to each worker in turn (alternating, `repeats`
   times): first job received to last result committed; merged turns ÷ LoRA path, medians.
2. Latency: the same mix published steadily for `seconds` at `load` x the LoRA path's
   capacity, to each worker: p50/p99 publish → read_committed result of the dominant adapter's
   jobs and of the others', and the others' wait before entering the engine (`queue_ms`), p99,
   against `merge.streaming_others_max_wait_ms`.
The merged-turns worker checks the classifier's merged answers against its LoRA answers before
its first merged turn (inside the first throughput run: its cost counts).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import TASK_OF, ZOO, percentile, zoo_inputs, zoo_jobs
from pipeline import RunningWorker, WorkerVariant, publish_steadily

from tests.broker import kafka_broker
from workers.core.config import Settings
from workers.logs import configure_logging

DOMINANT = "classifier"
OTHERS = [source for source in TASK_OF if source != DOMINANT]


def mixed_jobs(count: int, share: float, tokens: int, prefix: str, seed: int) -> list[dict]:
    """`share` of `count` jobs for the dominant adapter, the rest over the others and the base
    model in turn; interleaved evenly."""
    inputs = {source: [] for source in TASK_OF}
    for source, text in zoo_inputs(count * len(TASK_OF), seed):
        inputs[source].append(text)
    pairs: list[tuple[str, str]] = []
    minority = 0
    for i in range(count):
        if (i + 1) * (1 - share) >= minority + 1:
            source = [*OTHERS, "base"][minority % (len(OTHERS) + 1)]
            minority += 1
        else:
            source = DOMINANT
        text_source = "customer-tone" if source == "base" else source
        pairs.append((source, inputs[text_source][i]))
    jobs = zoo_jobs([(s if s != "base" else "customer-tone", t) for s, t in pairs], tokens, prefix)
    for job, (source, _) in zip(jobs, pairs, strict=True):
        if source == "base":
            job["task"] = "reply"
            del job["adapter"]
    return jobs


@dataclass
class WorkerFigures:
    runs: list[tuple[float, int]] = field(default_factory=list)  # (seconds, jobs)
    merged_answers: int = 0  # answers served_by merged
    # (dominant adapter's latencies, others' latencies, others' queue_ms), ms
    latency: tuple[list[float], list[float], list[float]] = field(
        default_factory=lambda: ([], [], [])
    )

    @property
    def jobs_s(self) -> float:
        return statistics.median(jobs / seconds for seconds, jobs in self.runs)


def _throughput(worker: RunningWorker, jobs: list[dict], figures: WorkerFigures) -> None:
    worker.publish(jobs)
    ids = [j["job_id"] for j in jobs]
    worker.collector.wait_for(ids, worker.process)
    done = [worker.collector.results[j] for j in ids if j in worker.collector.results]
    first = min(r["timings"]["received_at_ms"] for _, r in done) / 1000
    figures.runs.append((max(at for at, _ in done) - first, len(done)))
    figures.merged_answers += sum(r.get("served_by") == "merged" for _, r in done)


def _latency(worker: RunningWorker, jobs: list[dict], rate: float, figures: WorkerFigures) -> None:
    published = publish_steadily(worker.bootstrap, jobs, rate, worker.topic_of)
    worker.collector.wait_for(list(published), worker.process)
    results = worker.collector.results
    dominant, others, queued = [], [], []
    for job in jobs:
        if job["job_id"] not in results:
            continue
        read_at, result = results[job["job_id"]]
        ms = (read_at - published[job["job_id"]]) * 1000
        if job.get("adapter") == DOMINANT:
            dominant.append(ms)
        else:
            others.append(ms)
            queued.append(result["timings"]["queue_ms"])
    figures.latency = (dominant, others, queued)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4096)
    parser.add_argument("--share", type=float, default=0.9)
    parser.add_argument("--load", type=float, default=0.8, help="x the LoRA path's capacity")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--others-max-wait-ms",
        type=int,
        default=None,
        help="merge.streaming_others_max_wait_ms of the merged-turns worker (default: its own)",
    )
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters", type=Path, default=ZOO / "adapters")
    args = parser.parse_args()
    configure_logging("WARNING")
    max_wait_ms = args.others_max_wait_ms or Settings().merge.streaming_others_max_wait_ms
    merged_env = {
        "LORA_WORKERS_MERGE__STREAMING": "true",
        "LORA_WORKERS_MERGE__STREAMING_OTHERS_MAX_WAIT_MS": str(max_wait_ms),
    }
    variants = {
        "LoRA path": WorkerVariant("LoRA path"),
        "merged turns": WorkerVariant("merged turns", merged_env),
    }
    figures = {label: WorkerFigures() for label in variants}
    scratch = Path(tempfile.mkdtemp(prefix="bench-stream-merge-"))
    warm = zoo_inputs(16, seed=30)
    workers: dict[str, RunningWorker] = {}
    try:
        with kafka_broker(scratch / "kafka") as (bootstrap, broker):
            try:
                for label, variant in variants.items():
                    workers[label] = RunningWorker(
                        bootstrap, scratch, args.model, args.adapters, variant
                    )
                for worker in workers.values():
                    worker.warm_up(warm, args.tokens)
                for run in range(args.repeats):
                    for label, worker in workers.items():
                        prefix = f"t{run}-{uuid.uuid4().hex[:6]}-"
                        jobs = mixed_jobs(args.jobs, args.share, args.tokens, prefix, seed=run)
                        _throughput(worker, jobs, figures[label])
                rate = args.load * figures["LoRA path"].jobs_s
                for label, worker in workers.items():
                    count = max(1, round(rate * args.seconds))
                    jobs = mixed_jobs(count, args.share, args.tokens, f"l-{label[0]}-", seed=9)
                    _latency(worker, jobs, rate, figures[label])
            except BaseException:
                for label, worker in workers.items():
                    print(f"--- {label} worker log ---\n{worker.log_tail()}")
                raise
            finally:
                for worker in workers.values():
                    worker.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lora, merged = figures["LoRA path"], figures["merged turns"]
    print(f"\n{args.jobs} jobs, {args.share:.0%} {DOMINANT}, {args.tokens} max tokens ({broker})\n")
    print(
        "| worker | jobs/s (median) | answers served merged | dominant p50 / p99 | others p50 / "
        "p99 | others' wait to enter, p99 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, f in figures.items():
        dominant, others, queued = f.latency
        print(
            f"| {label} | {f.jobs_s:,.1f} | {f.merged_answers:,} | "
            f"{percentile(dominant, 0.5):,.0f} / {percentile(dominant, 0.99):,.0f} ms | "
            f"{percentile(others, 0.5):,.0f} / {percentile(others, 0.99):,.0f} ms | "
            f"{percentile(queued, 0.99):,.0f} ms |"
        )
    print(
        f"\nmerged turns / LoRA path: {merged.jobs_s / lora.jobs_s:.2f}x jobs/s; latency at "
        f"{rate:,.0f} jobs/s ({args.load:.0%} of the LoRA path's capacity); the others' wait "
        f"bound {max_wait_ms} ms"
    )


if __name__ == "__main__":
    main()
