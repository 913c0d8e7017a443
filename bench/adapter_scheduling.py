"""Benchmark: adapter load latency and switch-aware admission vs arrival order.

    .venv/bin/python bench/adapter_scheduling.py [--adapters 16] [--jobs 1024] [--max-loras 2]
        [--model DIR] [--adapters-dir DIR]

Runs the worker's own engine loop (`workers.engine.loop.EngineLoop`: admission, continuous
`add_request`/`step`, output checks), adapter cache and vLLM engine (no Kafka) on the same jobs
under both admission policies, interleaved in one run because this machine is noisy, and prints a
Markdown table: output tok/s, jobs/s and adapter loads per 1,000 jobs, for uniform and Zipf(1.1)
traffic. Every job is submitted up front; a run ends when the last outcome is out. `N` adapters
are copies of the zoo's four under distinct names (distinct LoRA ids), so vLLM treats them as N
adapters. bench/compare.py runs `compare_policies` for its switching section.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import PROMPT, TASK_OF, ZOO, copy_adapters, zoo_inputs

from workers.adapters.cache import AdapterCache
from workers.core.admission import Admission, AdmissionPolicy
from workers.core.config import AdmissionSettings, EngineSettings, PipelineConfig
from workers.core.contracts import Job
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.core.messages import SourceMessage
from workers.core.prepare import PreparedJob
from workers.core.processing import Answered, OutputChecker
from workers.core.routing import Router
from workers.engine.loop import EngineLoop, LoopLimits
from workers.engine.model import engine_values
from workers.engine.vllm_engine import VllmEngine
from workers.logs import configure_logging

ENGINE_DEPTH = 256  # the worker's default (engine.max_num_seqs)
RUN_TIMEOUT_S = 900.0
# A task without an output schema: the prompt is the job's input as is (already rendered).
BENCH_PIPELINE = PipelineConfig(task="bench", prompt_template="{input}")


@dataclass
class RunResult:
    seconds: float
    output_tokens: int
    jobs: int
    loads: int
    unserved: int
    steps: int


@dataclass(frozen=True)
class PolicyFigures:
    """Medians over the interleaved runs of one policy."""

    tok_s: float
    jobs_s: float
    loads_per_1000: float
    steps: int  # engine steps of the first run
    unserved: int  # jobs not answered, over all runs (should be 0)


def bench_engine(model: Path, max_loras: int, max_cpu_loras: int) -> VllmEngine:
    # Every job names an adapter, so no identity adapter is needed to take a slot; 256 sequences
    # as the worker's default, which the loop keeps filled.
    settings = EngineSettings(
        model=model,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        base_via_identity_adapter=False,
        max_num_seqs=ENGINE_DEPTH,
    )
    return VllmEngine(engine_values(settings, {}))  # zoo adapters: rank 8, the default


def traffic(count: int, adapters: int, distribution: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    if distribution == "uniform":
        return [rng.randrange(adapters) for _ in range(count)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(adapters)]
    return rng.choices(range(adapters), weights=weights, k=count)


def bench_job(order: int, text: str, request: GenerationRequest) -> PreparedJob:
    """A job as the worker's preparer would hand it to the loop (no Kafka message behind it)."""
    now_ms = int(time.time() * 1000)
    return PreparedJob(
        job=Job(job_id=f"b{order}", task=BENCH_PIPELINE.task, input=text),
        pipeline=BENCH_PIPELINE,
        source=SourceMessage("bench", 0, order, None, None, [], now_ms),
        request=request,
        arrived_at=time.monotonic(),
        received_at_ms=now_ms,
    )


def no_resolver(name: str, _job: Job) -> AdapterHandle:
    raise LookupError(f"bench jobs come routed; nothing resolves {name!r}")


def run_policy(
    engine: VllmEngine,
    adapters: list[tuple[str, Path, str]],
    picks: list[int],
    policy: AdmissionPolicy,
    max_loras: int,
    next_id: list[int],
    max_tokens: int,
    max_wait_s: float = AdmissionSettings().max_wait_ms / 1000,
) -> RunResult:
    """One run of a fresh `EngineLoop` on `engine`: every job submitted at once, timed until the
    last outcome is out. The loop is stopped and the run's adapters unregistered afterwards."""
    # Fresh LoRA ids for every run: each run starts with a cold cache, like a fresh worker.
    handles = []
    for name, path, _ in adapters:
        next_id[0] += 1
        handles.append(AdapterHandle(name, str(next_id[0]), str(path), next_id[0]))
    cache = AdapterCache(engine)
    unavailable: list[str] = []

    def restart_engine() -> None:
        engine.restart()
        cache.refresh()

    loop = EngineLoop(
        engine,
        cache,
        OutputChecker(
            {BENCH_PIPELINE.task: BENCH_PIPELINE}, engine.max_model_len, Router(no_resolver)
        ),
        Admission[PreparedJob](
            policy=policy,
            max_adapters=max_loras,
            max_wait_s=max_wait_s,
            is_resident=cache.is_resident,
        ),
        LoopLimits(engine_depth=ENGINE_DEPTH, crash_attempts=2, stall_warning_s=5),
        restart_engine=restart_engine,
        on_unavailable=lambda handle, reason: unavailable.append(f"{handle.name}: {reason}"),
    )
    texts = {
        source: PROMPT.format(task=TASK_OF[source], text=text)
        for source, text in zoo_inputs(len(TASK_OF), seed=5)
    }
    prompts = {source: engine.tokenize(text) for source, text in texts.items()}
    jobs = []
    for order, pick in enumerate(picks):
        source = adapters[pick][2]
        request = GenerationRequest(prompts[source], handles[pick], max_tokens, 0.0, None)
        jobs.append(bench_job(order, texts[source], request))
    tokens = answered = unserved = 0
    try:
        started = time.perf_counter()
        loop.start()
        loop.submit(jobs)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while answered + unserved < len(jobs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(jobs) - answered - unserved} jobs still out")
            outcomes = loop.outcomes()
            if not outcomes:
                time.sleep(0.002)
            for outcome in outcomes:
                if isinstance(outcome, Answered):
                    answered += 1
                    tokens += outcome.result.usage.completion_tokens
                else:
                    unserved += 1
        seconds = time.perf_counter() - started
    finally:
        loop.stop(timeout_s=60)
        for handle in handles:
            engine.unregister_adapter(handle)
    if unavailable:
        print(f"adapters unavailable: {unavailable[:3]}")
    return RunResult(seconds, tokens, len(jobs), cache.stats.loads, unserved, loop.stats.steps)


def compare_policies(
    engine: VllmEngine,
    adapters: list[tuple[str, Path, str]],
    picks: list[int],
    max_loras: int,
    max_tokens: int,
    repeats: int,
    next_id: list[int],
) -> dict[AdmissionPolicy, PolicyFigures]:
    """Both policies on the same picks, interleaved so drift hits them alike."""
    runs: dict[AdmissionPolicy, list[RunResult]] = {p: [] for p in AdmissionPolicy}
    for _ in range(repeats):
        for policy in (AdmissionPolicy.ARRIVAL, AdmissionPolicy.SWITCH_AWARE):
            runs[policy].append(
                run_policy(engine, adapters, picks, policy, max_loras, next_id, max_tokens)
            )
    return {
        policy: PolicyFigures(
            tok_s=statistics.median(r.output_tokens / r.seconds for r in results),
            jobs_s=statistics.median(r.jobs / r.seconds for r in results),
            loads_per_1000=statistics.median(r.loads * 1000 / r.jobs for r in results),
            steps=results[0].steps,
            unserved=sum(r.unserved for r in results),
        )
        for policy, results in runs.items()
    }


def load_latencies(engine: VllmEngine, adapters: list, next_id: list[int]) -> dict[str, float]:
    """Cold load (add_lora of an adapter not in the cache) vs a resident switch (one 1-token
    request on another resident adapter) vs no switch, in milliseconds (p50)."""
    source = adapters[0][2]
    (_, text), *_ = zoo_inputs(1, seed=5)  # the first source is adapters[0]'s
    prompt = engine.tokenize(PROMPT.format(task=TASK_OF[source], text=text))
    cold, switch, same = [], [], []
    resident = []
    for name, path, _ in adapters[:2]:
        next_id[0] += 1
        handle = AdapterHandle(name, "warm", str(path), next_id[0])
        engine.register_adapter(handle)
        resident.append(handle)
    for i in range(20):
        next_id[0] += 1
        handle = AdapterHandle(f"cold-{i}", "1", str(adapters[i % len(adapters)][1]), next_id[0])
        started = time.perf_counter()
        engine.register_adapter(handle)
        cold.append((time.perf_counter() - started) * 1000)
        engine.unregister_adapter(handle)
        for target, bucket in ((resident[i % 2], switch), (resident[i % 2], same)):
            started = time.perf_counter()
            engine.generate([GenerationRequest(prompt, target, 1, 0.0, None)])
            bucket.append((time.perf_counter() - started) * 1000)
    return {
        "cold load (add_lora) ms p50": statistics.median(cold),
        "cold load ms p95": statistics.quantiles(cold, n=20)[-1],
        "1-token request after switching adapter ms p50": statistics.median(switch),
        "1-token request, same adapter ms p50": statistics.median(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1024)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", type=Path, default=ZOO / "tiny-llama")
    parser.add_argument("--adapters-dir", type=Path, default=ZOO / "adapters")
    args = parser.parse_args()
    configure_logging("WARNING")

    scratch = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    adapters = copy_adapters(args.adapters, scratch, args.adapters_dir)
    engine = bench_engine(args.model, args.max_loras, args.max_cpu_loras)
    next_id = [1000]
    try:
        latencies = load_latencies(engine, adapters, next_id)
        figures = {
            distribution: compare_policies(
                engine,
                adapters,
                traffic(args.jobs, args.adapters, distribution, seed=11),
                args.max_loras,
                args.max_tokens,
                args.repeats,
                next_id,
            )
            for distribution in ("uniform", "zipf")
        }
    finally:
        engine.close()
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\n{args.adapters} adapters, max_loras={args.max_loras}, "
        f"max_cpu_loras={args.max_cpu_loras}, {args.jobs} jobs, {args.max_tokens} tokens each, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print("| traffic | policy | output tok/s | jobs/s | adapter loads / 1,000 jobs | steps |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for distribution, by_policy in figures.items():
        for policy, f in by_policy.items():
            cells = [distribution, policy.value, f"{f.tok_s:,.0f}", f"{f.jobs_s:,.1f}"]
            print("| " + " | ".join([*cells, f"{f.loads_per_1000:.1f}", str(f.steps)]) + " |")
    for distribution, by_policy in figures.items():
        aware, arrival = by_policy[AdmissionPolicy.SWITCH_AWARE], by_policy[AdmissionPolicy.ARRIVAL]
        ratio = aware.tok_s / arrival.tok_s
        print(f"\n{distribution}: switch-aware / arrival output tok/s = {ratio:.2f}x")
    print()
    for label, value in latencies.items():
        print(f"- {label}: {value:.1f}")


if __name__ == "__main__":
    main()
