"""Benchmark: adapter load latency and switch-aware scheduling vs arrival order.

    .venv/bin/python bench/adapter_scheduling.py [--adapters 16] [--jobs 1024] [--max-loras 2]
        [--model DIR] [--adapters-dir DIR]

Runs the worker's own batcher, adapter cache and vLLM engine (no Kafka) on the same jobs under
both policies, interleaved in one run because this machine is noisy, and prints a Markdown table:
output tok/s, jobs/s and adapter loads per 1,000 jobs, for uniform and Zipf(1.1) traffic.
`N` adapters are copies of the zoo's four under distinct names (distinct LoRA ids), so vLLM
treats them as N adapters. bench/compare.py runs `compare_policies` for its switching section.
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
from workers.core.batching import AdapterBatcher, BatchPolicy
from workers.core.config import EngineSettings
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.engine.vllm_engine import VllmEngine
from workers.logs import configure_logging


@dataclass(frozen=True)
class BenchJob:
    request: GenerationRequest
    arrived_at: float

    @property
    def adapter_key(self) -> int | None:
        return None if self.request.adapter is None else self.request.adapter.lora_id


@dataclass
class RunResult:
    seconds: float
    output_tokens: int
    jobs: int
    loads: int
    batches: int


@dataclass(frozen=True)
class PolicyFigures:
    """Medians over the interleaved runs of one policy."""

    tok_s: float
    jobs_s: float
    loads_per_1000: float
    batches: int


def bench_engine(model: Path, max_loras: int, max_cpu_loras: int) -> VllmEngine:
    # Every job names an adapter, so no identity adapter is needed to take a slot; 256 sequences
    # as the worker's default, so one 128-job batch never waits on the scheduler.
    return VllmEngine(
        EngineSettings(
            model=model,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            base_via_identity_adapter=False,
            max_num_seqs=256,
        )
    )


def traffic(count: int, adapters: int, distribution: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    if distribution == "uniform":
        return [rng.randrange(adapters) for _ in range(count)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(adapters)]
    return rng.choices(range(adapters), weights=weights, k=count)


def run_policy(
    engine: VllmEngine,
    adapters: list[tuple[str, Path, str]],
    picks: list[int],
    policy: BatchPolicy,
    max_loras: int,
    next_id: list[int],
    max_tokens: int,
) -> RunResult:
    # Fresh LoRA ids for every run: each run starts with a cold cache, like a fresh worker.
    handles = []
    for name, path, _ in adapters:
        next_id[0] += 1
        handles.append(AdapterHandle(name, str(next_id[0]), str(path), next_id[0]))
    cache = AdapterCache(engine)
    batcher: AdapterBatcher[BenchJob] = AdapterBatcher(
        max_batch_size=128,
        linger_s=0.0,
        policy=policy,
        max_adapters=max_loras,
        max_wait_s=60.0,
        is_resident=cache.is_resident,
    )
    prompts = {
        source: engine.tokenize(PROMPT.format(task=TASK_OF[source], text=text))
        for source, text in zoo_inputs(len(TASK_OF), seed=5)
    }
    for order, pick in enumerate(picks):
        handle = handles[pick]
        request = GenerationRequest(prompts[adapters[pick][2]], handle, max_tokens, 0.0, None)
        batcher.add(BenchJob(request, float(order)))
    tokens = batches = 0
    started = time.perf_counter()
    while batch := batcher.next_batch(now=float(len(picks)), flush=True):
        cache.ensure_loaded(job.request.adapter for job in batch)
        tokens += sum(g.completion_tokens for g in engine.generate([j.request for j in batch]))
        batches += 1
    seconds = time.perf_counter() - started
    for handle in handles:
        engine.unregister_adapter(handle)
    return RunResult(seconds, tokens, len(picks), cache.stats.loads, batches)


def compare_policies(
    engine: VllmEngine,
    adapters: list[tuple[str, Path, str]],
    picks: list[int],
    max_loras: int,
    max_tokens: int,
    repeats: int,
    next_id: list[int],
) -> dict[BatchPolicy, PolicyFigures]:
    """Both policies on the same picks, interleaved so drift hits them alike."""
    runs: dict[BatchPolicy, list[RunResult]] = {p: [] for p in BatchPolicy}
    for _ in range(repeats):
        for policy in (BatchPolicy.ARRIVAL, BatchPolicy.SWITCH_AWARE):
            runs[policy].append(
                run_policy(engine, adapters, picks, policy, max_loras, next_id, max_tokens)
            )
    return {
        policy: PolicyFigures(
            tok_s=statistics.median(r.output_tokens / r.seconds for r in results),
            jobs_s=statistics.median(r.jobs / r.seconds for r in results),
            loads_per_1000=statistics.median(r.loads * 1000 / r.jobs for r in results),
            batches=results[0].batches,
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
    print("| traffic | policy | output tok/s | jobs/s | adapter loads / 1,000 jobs | batches |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for distribution, by_policy in figures.items():
        for policy, f in by_policy.items():
            cells = [distribution, policy.value, f"{f.tok_s:,.0f}", f"{f.jobs_s:,.1f}"]
            print("| " + " | ".join([*cells, f"{f.loads_per_1000:.1f}", str(f.batches)]) + " |")
    for distribution, by_policy in figures.items():
        ratio = by_policy[BatchPolicy.SWITCH_AWARE].tok_s / by_policy[BatchPolicy.ARRIVAL].tok_s
        print(f"\n{distribution}: switch-aware / arrival output tok/s = {ratio:.2f}x")
    print()
    for label, value in latencies.items():
        print(f"- {label}: {value:.1f}")


if __name__ == "__main__":
    main()
