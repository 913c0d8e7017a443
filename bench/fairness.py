"""Benchmark: tenant fairness through the real pipeline, Kafka → worker → result topic.

    .venv/bin/python bench/fairness.py --capacity 140 [--seconds 20] [--policies switch_aware
        arrival switch_aware:64] [--baseline-ref 12ee1fe]

One topic (the classify task's; its pipeline routes every tenant to the `classifier` adapter),
jobs carrying `"tenant": "tenant-a"` or `"tenant": "tenant-b"`, on each worker in turn:
1. B alone at r_B = 0.1 x capacity for `seconds`: B's publish → read_committed result p95.
2. A alone at 10 x r_B (about the capacity): A's throughput, first publish to last result.
3. A at 10 x r_B and B at r_B, interleaved on the same topic, for `seconds`: B's p95, A's p95
   and A's throughput.
The figures: B's p95 in 3 ÷ in 1 (the target: at most 2.0), and A's throughput in 3 ÷ in 2
(the target: at least 0.9). Each policy ("POLICY[:DEPTH[:DELIVERY]]") is a worker; with a
baseline (another commit's worker, compare.py --baseline-ref), it runs the same phases.
`capacity` is the pipeline's jobs/s (bench/pipeline.py; bench/compare.py passes the one it just
measured). The workers' `max_in_flight` is raised so the whole backlog is admitted (fetching
never pauses behind A's jobs).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import ZOO, percentile, zoo_inputs
from pipeline import RunningWorker, WorkerVariant, baseline_checkout, publish_steadily

from tests.broker import kafka_broker
from workers.logs import configure_logging

TASK = "classify"
TENANT_A, TENANT_B = "tenant-a", "tenant-b"
FLOOD_FACTOR = 10  # A's rate over B's
MAX_IN_FLIGHT = 100_000


@dataclass
class Flood:
    """One worker's figures: B alone, A alone, then A flooding beside B."""

    alone_b: list[float]  # B's latencies (ms), B alone
    alone_a_rate: float  # A's throughput alone (jobs/s, first publish to last result)
    b: list[float]  # B's latencies, A flooding
    a: list[float]  # A's latencies, beside B
    a_rate: float  # A's throughput beside B

    @property
    def ratio(self) -> float:
        """B's p95 with A flooding over B's p95 alone."""
        return percentile(self.b, 0.95) / percentile(self.alone_b, 0.95)

    @property
    def a_share(self) -> float:
        """A's throughput beside B over A's alone."""
        return self.a_rate / self.alone_a_rate


@dataclass
class FairnessFigures:
    capacity: float  # jobs/s the rates derive from
    rate_b: float
    broker: str
    by_worker: dict[str, Flood] = field(default_factory=dict)  # worker label → its figures
    dead_letters: int = 0


def tenant_jobs(count: int, tenant: str, tokens: int, seed: int, prefix: str) -> list[dict]:
    """Classify jobs of one tenant (no adapter named: the pipeline routes them)."""
    return [
        {
            "job_id": f"{prefix}{i}",
            "task": TASK,
            "input": text,
            "tenant": tenant,
            "params": {"max_tokens": tokens},
        }
        for i, (_, text) in enumerate(zoo_inputs(count, seed=seed))
    ]


def _schedule(a_jobs: list[dict], b_jobs: list[dict]) -> list[dict]:
    """B's jobs spread evenly among A's: one B job per FLOOD_FACTOR A jobs."""
    merged: list[dict] = []
    remaining_b = list(b_jobs)
    for i, job in enumerate(a_jobs):
        if i % FLOOD_FACTOR == 0 and remaining_b:
            merged.append(remaining_b.pop(0))
        merged.append(job)
    return merged + remaining_b


def _publish(worker: RunningWorker, jobs: list[dict], rate: float) -> tuple[dict, dict]:
    """Publish `jobs` steadily at `rate`; each job's publish → result latency in ms, and its
    publish time."""
    published = publish_steadily(worker.bootstrap, jobs, rate, worker.topic_of)
    worker.collector.wait_for(list(published), worker.process)
    results = worker.collector.results
    ms = {j: (results[j][0] - at) * 1000 for j, at in published.items() if j in results}
    return ms, published


def _rate(worker: RunningWorker, jobs: list[dict], published: dict[str, float]) -> float:
    """`jobs`' throughput: answered jobs over first publish to last result read."""
    results = worker.collector.results
    done = [j["job_id"] for j in jobs if j["job_id"] in results]
    span = max(results[j][0] for j in done) - min(published[j["job_id"]] for j in jobs)
    return len(done) / span


def _measure(worker: RunningWorker, rate_b: float, seconds: float, tokens: int) -> Flood:
    run = uuid.uuid4().hex[:6]
    count_b = max(1, round(rate_b * seconds))
    alone_b, _ = _publish(worker, tenant_jobs(count_b, TENANT_B, tokens, 20, f"b-{run}-"), rate_b)
    alone_a = tenant_jobs(count_b * FLOOD_FACTOR, TENANT_A, tokens, 23, f"a-{run}-")
    _, published = _publish(worker, alone_a, rate_b * FLOOD_FACTOR)
    alone_a_rate = _rate(worker, alone_a, published)
    b_jobs = tenant_jobs(count_b, TENANT_B, tokens, seed=21, prefix=f"fb-{run}-")
    a_jobs = tenant_jobs(count_b * FLOOD_FACTOR, TENANT_A, tokens, seed=22, prefix=f"fa-{run}-")
    ms, published = _publish(worker, _schedule(a_jobs, b_jobs), rate_b * (FLOOD_FACTOR + 1))
    return Flood(
        alone_b=list(alone_b.values()),
        alone_a_rate=alone_a_rate,
        b=[ms[j["job_id"]] for j in b_jobs if j["job_id"] in ms],
        a=[ms[j["job_id"]] for j in a_jobs if j["job_id"] in ms],
        a_rate=_rate(worker, a_jobs, published),
    )


def measure_fairness(
    model: Path,
    adapters_dir: Path,
    capacity: float,
    seconds: float = 20.0,
    tokens: int = 32,
    policies: tuple[str, ...] = ("switch_aware",),
    baseline: WorkerVariant | None = None,
) -> FairnessFigures:
    """Each policy's worker in turn (and `baseline`'s, e.g. an earlier commit, with its
    default settings): B alone, A alone, then A flooding beside B; workers run one at a time,
    on their own topics and groups."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    warm = zoo_inputs(16, seed=20)
    variants = [_variant(policy) for policy in policies]
    if baseline is not None:
        variants.append(_variant("switch_aware", baseline))
    try:
        with kafka_broker(scratch / "kafka") as (bootstrap, broker):
            figures = FairnessFigures(capacity, capacity / FLOOD_FACTOR, broker)
            for variant in variants:
                worker = RunningWorker(bootstrap, scratch, model, adapters_dir, variant)
                try:
                    worker.warm_up(warm, tokens)
                    figures.by_worker[variant.label] = _measure(
                        worker, figures.rate_b, seconds, tokens
                    )
                    figures.dead_letters += len(worker.collector.dead)
                except BaseException:
                    print(f"--- {variant.label} worker log ---\n{worker.log_tail()}")
                    raise
                finally:
                    worker.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def _variant(policy: str, base: WorkerVariant | None = None) -> WorkerVariant:
    """ "POLICY[:DEPTH[:DELIVERY]]": admission policy, requests kept in the engine, delivery
    mode; on `base` (another commit's worker), labelled by it."""
    name, depth, delivery = [*policy.split(":"), "", ""][:3]
    settings = {
        "LORA_WORKERS_ADMISSION__POLICY": name,
        "LORA_WORKERS_ADMISSION__MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
    }
    if depth:
        settings["LORA_WORKERS_ADMISSION__ENGINE_DEPTH"] = depth
    if delivery:
        settings["LORA_WORKERS_DELIVERY__MODE"] = delivery
    if base is None:
        return WorkerVariant(policy, settings)
    return WorkerVariant(base.label, {**base.env, **settings}, base.cwd)


def summary_lines(f: FairnessFigures) -> list[str]:
    lines = []
    for label, w in f.by_worker.items():
        lines.append(
            f"- {label}: B alone at {f.rate_b:.1f} jobs/s p95 {percentile(w.alone_b, 0.95):,.0f}"
            f" ms; A at {f.rate_b * FLOOD_FACTOR:.0f} jobs/s + B: B p95 "
            f"{percentile(w.b, 0.95):,.0f} ms ({w.ratio:.2f}x alone), A p95 "
            f"{percentile(w.a, 0.95):,.0f} ms, A {w.a_rate:.1f} jobs/s ({w.a_share:.2f}x of A "
            f"alone, {w.alone_a_rate:.1f}); {len(w.b)} + {len(w.a)} jobs"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, required=True, help="pipeline jobs/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--policies", nargs="+", default=["switch_aware"])
    parser.add_argument("--baseline-ref", default="none", help="also run this commit's worker")
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters", type=Path, default=ZOO / "adapters")
    args = parser.parse_args()
    configure_logging("WARNING")
    with baseline_checkout(args.baseline_ref) as baseline:
        figures = measure_fairness(
            args.model,
            args.adapters,
            args.capacity,
            args.seconds,
            args.tokens,
            tuple(args.policies),
            baseline,
        )
    print(f"\ncapacity {figures.capacity:.0f} jobs/s, {args.seconds:.0f} s per phase\n")
    print("\n".join(summary_lines(figures)))
    print(f"- dead letters: {figures.dead_letters}")


if __name__ == "__main__":
    main()
