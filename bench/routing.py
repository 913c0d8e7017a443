"""Benchmark: what routing beyond rules and shadow evaluation cost, through Kafka.

    .venv/bin/python bench/routing.py [--jobs 480] [--repeats 2]

One warm `lora-workers run` serves the shipped routing pipelines (`pipelines/routing/`) on the
tests' broker. The same support tickets (the zoo's generator, a third per category) go through
it in four ways, each phase timed from publishing its jobs to its last result:

- rule: each job names its category's reply adapter (`adapter` in the job): one engine pass;
- classifier: the `support` pipeline picks the adapter by the classifier's label: two passes;
- embedding: the `triage` pipeline picks it by example embeddings (all-MiniLM-L6-v2 on the
  consuming thread, batched per consumed batch), one engine pass;
- rule + 20% shadow: as rule, on copies of the reply adapters that each have a shadow version
  taking 20% of their jobs; also timed to its last evaluation.

Phases alternate over the repeats (this machine is noisy); the figures are medians and ratios to
rule routing taken in the same run. Output: a table, and bench/out/routing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, ZOO

from tests.broker import kafka_broker
from tests.integration.harness import (
    Deployment,
    TopicWatcher,
    deploy,
    job_record,
    load_zoo_generators,
    produce,
)

REPLY_ADAPTERS = {
    "billing": "billing-reply",
    "technical": "technical-reply",
    "account": "account-reply",
}
SHADOWED = "-shadowed"  # copies of the reply adapters that carry a shadow version
PHASES = ("rule", "classifier", "embedding", "shadow")
WAIT_S = 900


def tickets(count: int, seed: int) -> list[tuple[str, str]]:
    """(label, text) support tickets, the labels in turn."""
    zoo = load_zoo_generators()
    rng = random.Random(seed)
    found: list[tuple[str, str]] = []
    labels = list(REPLY_ADAPTERS)
    while len(found) < count:
        text, label, _ = zoo.make_message(rng)
        if label == labels[len(found) % len(labels)]:
            found.append((label, text))
    return found


def phase_jobs(phase: str, pairs: list[tuple[str, str]], prefix: str) -> list[dict]:
    jobs = []
    for i, (label, text) in enumerate(pairs):
        job: dict = {"job_id": f"{prefix}-{i}", "task": "support", "input": text}
        if phase == "embedding":
            job["task"] = "triage"
        elif phase == "rule":
            job["adapter"] = REPLY_ADAPTERS[label]
        elif phase == "shadow":
            job["adapter"] = REPLY_ADAPTERS[label] + SHADOWED
        jobs.append(job)
    return jobs


def publish_shadowed_adapters(deployment: Deployment) -> None:
    """Copies of the reply adapters under new names (version 1), each with a shadow version 2
    (the same weights under another version) on 20% of its jobs."""
    for adapter in REPLY_ADAPTERS.values():
        for version in ("1", "2"):
            target = deployment.adapter_root / f"{adapter}{SHADOWED}-v{version}"
            shutil.copytree(ZOO / "adapters" / adapter, target)
            share = ("--shadow", "0.2") if version == "2" else ()
            done = deployment.cli(
                *("adapters", "publish", adapter + SHADOWED, "--version", version),
                *("--path", str(target), *share),
            )
            assert done.returncode == 0, done.stderr


def run_phase(
    deployment: Deployment,
    results: TopicWatcher,
    evaluations: TopicWatcher,
    jobs: list[dict],
) -> dict[str, float]:
    pipelines = deployment.pipelines
    wanted = {job["job_id"] for job in jobs}
    evaluated_before = len(evaluations.messages)
    started, started_wall = time.monotonic(), time.time()
    produce(deployment.bootstrap, [job_record(pipelines[j["task"]].input_topic, j) for j in jobs])
    results.wait_for(
        lambda _: wanted <= {r["job_id"] for r in results.json_values()}, timeout_s=WAIT_S
    )
    seconds = time.monotonic() - started
    figures = {"seconds": seconds, "jobs_per_s": len(jobs) / seconds}
    if any("-shadowed" in str(job.get("adapter")) for job in jobs):
        quiet_since, count = time.monotonic(), len(evaluations.messages)
        while time.monotonic() - quiet_since < 5:
            with contextlib.suppress(TimeoutError):
                evaluations.wait_for(lambda m, seen=count: len(m) > seen, timeout_s=1)
            if len(evaluations.messages) != count:
                quiet_since, count = time.monotonic(), len(evaluations.messages)
        fresh = evaluations.json_values()[evaluated_before:]
        last_ms = max(e["at_ms"] for e in fresh)
        figures["evaluations"] = len(fresh)
        figures["to_last_evaluation_s"] = last_ms / 1000 - started_wall
    return figures


def measure(jobs_per_phase: int, repeats: int, scratch: Path, bootstrap: str) -> dict:
    deployment = deploy(bootstrap, scratch, ROOT / "pipelines" / "routing")
    publish_shadowed_adapters(deployment)
    pipelines = deployment.pipelines
    results = TopicWatcher(bootstrap, [p.result_topic for p in pipelines.values()])
    evaluations = TopicWatcher(bootstrap, [deployment.evaluations_topic])
    log_path = scratch / "worker.log"
    worker = deployment.start_worker("--idle-exit", "900", log_path=log_path)
    runs: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
    try:
        warm = [job for phase in PHASES for job in phase_jobs(phase, tickets(24, 0), f"w-{phase}")]
        run_phase(deployment, results, evaluations, warm)  # engine up, adapters loaded
        for repeat in range(repeats):
            for phase in PHASES:
                pairs = tickets(jobs_per_phase, seed=100 + repeat)
                jobs = phase_jobs(phase, pairs, f"{phase}-{repeat}")
                runs[phase].append(run_phase(deployment, results, evaluations, jobs))
                print(phase, repeat, json.dumps(runs[phase][-1]), flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=120)
        results.close()
        evaluations.close()
    embedding_batches = [
        json.loads(line) for line in log_path.read_text().splitlines() if '"embedding_' in line
    ]
    return {"jobs_per_phase": jobs_per_phase, "runs": runs, "log_events": embedding_batches}


def summarize(measured: dict) -> dict[str, dict[str, float]]:
    rule = statistics.median(r["jobs_per_s"] for r in measured["runs"]["rule"])
    table = {}
    for phase, runs in measured["runs"].items():
        rate = statistics.median(r["jobs_per_s"] for r in runs)
        row = {"jobs_per_s": round(rate, 1), "vs_rule": round(rate / rule, 2)}
        if phase == "shadow":
            row["evaluations"] = statistics.median(r["evaluations"] for r in runs)
            row["to_last_evaluation_s"] = round(
                statistics.median(r["to_last_evaluation_s"] for r in runs), 1
            )
            row["seconds"] = round(statistics.median(r["seconds"] for r in runs), 1)
        table[phase] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=480, help="jobs per phase")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    try:
        with kafka_broker(scratch / "broker") as (bootstrap, how):
            print(f"broker: {how}", flush=True)
            (scratch / "run").mkdir()
            measured = measure(args.jobs, args.repeats, scratch / "run", bootstrap)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = summarize(measured)
    print(f"\n{args.jobs} jobs per phase, medians of {args.repeats} runs")
    for phase, row in table.items():
        print(f"{phase:>11}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    out = ROOT / "bench" / "out" / "routing.json"
    out.write_text(json.dumps({"table": table, **measured}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
