"""Benchmark: pipeline efficiency, Kafka → worker → result topic vs raw `generate`.

    .venv/bin/python bench/pipeline.py [--jobs 1024]

Publishes the jobs first, then starts one `lora-workers run` on ops/kafka-local and measures the
worker from the first job it received to the last result it completed (engine start-up
excluded). Then, with the worker gone, runs the very same prompts, adapters, token budgets and
output schemas through the engine in one `generate` call. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROMPT, ROOT, TASK_OF, zoo_inputs

from tests.broker import kafka_broker
from tests.integration.harness import job_record, produce
from workers.config import Settings, load_pipelines
from workers.engine import AdapterHandle, GenerationRequest, VllmEngine
from workers.logs import configure_logging
from workers.topics import read_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    configure_logging("WARNING")

    pairs = zoo_inputs(args.jobs, seed=4)
    jobs = [
        {
            "job_id": f"p{i}",
            "task": TASK_OF[source],
            "input": text,
            "adapter": source,
            "params": {"max_tokens": args.tokens},
        }
        for i, (source, text) in enumerate(pairs)
    ]
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    # The tests' broker: $KAFKA_BOOTSTRAP_SERVERS, a container, or ops/kafka-local.
    with kafka_broker(scratch / "kafka") as (bootstrap, _):
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
        cli = [sys.executable, "-m", "workers"]
        subprocess.run([*cli, "topics", "create"], env=env, check=True, capture_output=True)
        produce(bootstrap, [job_record(f"jobs.{j['task']}", j) for j in jobs])
        subprocess.run(
            [*cli, "run", "--max-jobs", str(args.jobs), "--idle-exit", "120"],
            env=env,
            check=True,
            capture_output=True,
        )
        results = [
            json.loads(m.value())
            for m in read_to_end(bootstrap, [f"results.{t}" for t in set(TASK_OF.values())])
        ]
    assert len(results) == args.jobs, f"{len(results)} results for {args.jobs} jobs"
    span_s = (
        max(r["timings"]["completed_at_ms"] for r in results)
        - min(r["timings"]["received_at_ms"] for r in results)
    ) / 1000
    pipeline_tokens = sum(r["usage"]["completion_tokens"] for r in results)

    pipelines = load_pipelines(ROOT / "pipelines", ROOT / "schemas")
    engine = VllmEngine(Settings().engine)  # the worker's own engine settings
    try:
        handles = {
            source: AdapterHandle(source, "1", str(ROOT / "models" / "adapters" / source), i + 1)
            for i, source in enumerate(TASK_OF)
        }
        for handle in handles.values():
            engine.register_adapter(handle)
        requests = [
            GenerationRequest(
                engine.tokenize(PROMPT.format(task=TASK_OF[source], text=text)),
                handles[source],
                args.tokens,
                0.0,
                None,
                json_schema=pipelines[TASK_OF[source]].output_schema,
            )
            for source, text in pairs
        ]
        engine.generate(requests[:16])  # warm-up, like the worker's first batch
        started = time.perf_counter()
        raw_tokens = sum(g.completion_tokens for g in engine.generate(requests))
        raw_s = time.perf_counter() - started
    finally:
        engine.close()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{args.jobs} jobs over 4 adapters, {args.tokens} max tokens, same prompts\n")
    print("| path | seconds | jobs/s | output tok/s |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| Kafka → worker → result topic | {span_s:.2f} | {args.jobs / span_s:,.1f} "
        f"| {pipeline_tokens / span_s:,.0f} |"
    )
    print(
        f"| raw `generate`, one call | {raw_s:.2f} | {args.jobs / raw_s:,.1f} "
        f"| {raw_tokens / raw_s:,.0f} |"
    )
    print(
        f"\npipeline / raw: {raw_s / span_s:.2f}x jobs/s, "
        f"{(pipeline_tokens / span_s) / (raw_tokens / raw_s):.2f}x output tok/s"
    )


if __name__ == "__main__":
    main()
