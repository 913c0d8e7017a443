"""Benchmark: where lora-workers stands, every section of the benchmarks issue in one run.

    .venv/bin/python bench/compare.py [--model DIR --adapters DIR ...] [--out bench/out]
        [--sections pipeline,naive,lora-cost,switching,fairness,bulk,memory]
        [--baseline-ref 12ee1fe | none]

On the tiny zoo by default. Each figure is a ratio of two things measured side by side in this
run, because the machine is noisy:
1. Pipeline: the same jobs (four adapters + base) through Kafka → worker → committed result vs
   one raw `LLM.generate` call (bench/pipeline.py), output tok/s and jobs/s. With
   --baseline-ref (default: main before the latency work, 12ee1fe), that commit's worker
   runs beside this one (a temporary git worktree), its runs alternating with ours.
2. Latency: publish → result p50/p95/p99 at 50% and 90% of the capacity measured in 1, for each
   worker.
3. LoRA cost: mixed-adapter vs base-model throughput of raw `generate` on the same prompts.
4. Switching: 16 and 64 adapters, max_loras 2 and 4, uniform and Zipf(1.1) traffic,
   switch-aware vs arrival admission on the engine loop (bench/adapter_scheduling.py): tok/s,
   adapter loads per 1,000 jobs.
5. The naive approach: per-request PEFT `set_adapter` + Hugging Face `generate` on the
   pipeline's jobs vs the pipeline, run between the pipeline's first run and its raw run.
6. Fairness: tenant B's p95 on one topic alone vs with tenant A flooding at capacity
   (bench/fairness.py), switch-aware (tenant fair queueing) and arrival admission.
7. Bulk mode vs vLLM's own batch runner (`run_batch --enable-lora --lora-modules`), same jobs and
   output schemas, whole commands timed (both start an engine) and after start-up.
8. Memory: engine RSS (all processes) with 1, 10, 100 and 1,000 adapters registered, against
   the adapters' file sizes: with a host cache of 16 (not all resident; the target), then with
   every adapter resident (what one costs in the cache).
Prints the table and the targets, writes `results.md` and `compare.png` to --out. Kafka
sections share one broker ($KAFKA_BOOTSTRAP_SERVERS, a container, or ops/kafka-local).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import psutil
from adapter_scheduling import bench_engine, compare_policies, traffic
from common import (
    PROMPT,
    ROOT,
    TASK_OF,
    copy_adapters,
    percentile,
    worker_env,
    zoo_inputs,
    zoo_jobs,
)
from fairness import FairnessFigures, measure_fairness
from pipeline import (
    BASELINE_REF,
    PipelineFigures,
    baseline_checkout,
    measure_pipeline,
    stage_line,
)

from tests.broker import kafka_broker
from workers.core.admission import AdmissionPolicy
from workers.core.config import EngineSettings, Settings, load_pipelines
from workers.core.engine_api import AdapterHandle, GenerationRequest
from workers.engine.model import engine_values
from workers.engine.vllm_engine import VllmEngine
from workers.logs import configure_logging

T = TypeVar("T")


def section(name: str, run: Callable[[], T]) -> T:
    """Run one section, reporting its wall time on stderr (the table goes to stdout)."""
    began = time.perf_counter()
    result = run()
    print(f"[{name}: {time.perf_counter() - began:.0f} s]", file=sys.stderr, flush=True)
    return result


@dataclass
class Row:
    section: str
    subject: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Target:
    name: str
    required: float  # a ratio (or in `unit`); `at_most` flips the comparison
    measured: float
    at_most: bool = False
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured <= self.required if self.at_most else self.measured >= self.required


def pipeline_rows(
    f: PipelineFigures, worker: str = "", versus: PipelineFigures | None = None
) -> list[Row]:
    """Rows of one worker's pipeline and latency figures; `worker` names it in the section
    (e.g. " (12ee1fe worker)"), `versus` adds this worker's ratio to another's."""
    than = ""
    if versus is not None:
        than = f"; new ÷ old {f.capacity / versus.capacity:.2f}x jobs/s"
    rows = [
        Row(
            f"pipeline{worker}",
            f"Kafka → worker → committed result, {f.jobs} jobs, 4 adapters + base",
            f.tok_s(f.pipeline_runs),
            "tok/s",
            f"{f.capacity:,.1f} jobs/s; {f.tok_ratio:.2f}x tok/s, "
            f"{f.jobs_ratio:.2f}x jobs/s of raw{than}",
        ),
    ]
    if not worker:
        rows.append(
            Row(
                "pipeline",
                "raw `generate`, one call, same jobs",
                f.tok_s(f.raw_runs),
                "tok/s",
                f"{f.jobs_s(f.raw_runs):,.1f} jobs/s; median of {len(f.raw_runs)} runs, "
                "alternating with the pipeline's",
            )
        )
    for load, (rate, ms) in f.latency.items():
        p50, p95, p99 = (percentile(ms, q) for q in (0.5, 0.95, 0.99))
        note = f"p95 {p95:,.0f} ms, p99 {p99:,.0f} ms, publish → read_committed result"
        if load in f.stages:
            note += f"; medians: {stage_line(f.stages[load])}"
        if versus is not None and load in versus.latency:
            theirs = versus.latency[load][1]
            note += (
                f"; new ÷ old p50 {p50 / percentile(theirs, 0.5):.2f}x, p99 "
                f"{p99 / percentile(theirs, 0.99):.2f}x"
            )
        rows.append(
            Row(
                f"latency{worker}",
                f"{load:.0%} of capacity ({rate:,.0f} jobs/s for {len(ms):,} jobs), p50",
                p50,
                "ms",
                note,
            )
        )
    return rows


def fairness_rows(f: FairnessFigures) -> list[Row]:
    rows = []
    for label, w in f.by_worker.items():
        rows += [
            Row(
                f"fairness, {label}",
                f"tenant B alone at {f.rate_b:,.1f} jobs/s (0.1 x capacity), p95",
                percentile(w.alone_b, 0.95),
                "ms",
                f"{len(w.alone_b)} jobs on one topic (classify), publish → read_committed result",
            ),
            Row(
                f"fairness, {label}",
                f"B with A flooding at {f.rate_b * 10:,.0f} jobs/s, B p95",
                percentile(w.b, 0.95),
                "ms",
                f"{w.ratio:.2f}x B alone; A p95 {percentile(w.a, 0.95):,.0f} ms; "
                f"{len(w.b)} B + {len(w.a)} A jobs",
            ),
            Row(
                f"fairness, {label}",
                "A's throughput beside B",
                w.a_rate,
                "jobs/s",
                f"{w.a_share:.2f}x A alone ({w.alone_a_rate:,.1f} jobs/s)",
            ),
        ]
    return rows


def fairness_targets(f: FairnessFigures, label: str) -> list[Target]:
    if label not in f.by_worker:
        return []
    w = f.by_worker[label]
    return [
        Target(f"fairness: B p95 with A flooding / B p95 alone ({label})", 2.0, w.ratio, True),
        Target(f"fairness: A's throughput beside B / A alone ({label})", 0.9, w.a_share),
    ]


def tok_per_s(engine: VllmEngine, requests: list[GenerationRequest]) -> float:
    started = time.perf_counter()
    tokens = sum(g.completion_tokens for g in engine.generate(requests))
    return tokens / (time.perf_counter() - started)


def lora_cost(args: argparse.Namespace, engine: VllmEngine, scratch: Path) -> list[Row]:
    adapters = copy_adapters(args.lora_adapters, scratch / "lora-cost", args.adapters)
    handles = [AdapterHandle(n, "1", str(p), i + 1) for i, (n, p, _) in enumerate(adapters)]
    for handle in handles:
        engine.register_adapter(handle)
    pairs = zoo_inputs(args.prompts, seed=1)
    prompts = [engine.tokenize(PROMPT.format(task=TASK_OF[s], text=t)) for s, t in pairs]
    base = [GenerationRequest(p, None, args.tokens, 0.0, None) for p in prompts]
    mixed = [
        GenerationRequest(p, handles[i % len(handles)], args.tokens, 0.0, None)
        for i, p in enumerate(prompts)
    ]
    tok_per_s(engine, base[:32])  # warm-up
    base_runs, mixed_runs = [], []
    for _ in range(args.repeats):  # interleaved against drift
        base_runs.append(tok_per_s(engine, base))
        mixed_runs.append(tok_per_s(engine, mixed))
    for handle in handles:  # the switching section starts from an empty adapter cache
        engine.unregister_adapter(handle)
    base_tps, mixed_tps = statistics.median(base_runs), statistics.median(mixed_runs)
    return [
        Row("LoRA cost", "base model, raw generate", base_tps, "tok/s"),
        Row(
            "LoRA cost",
            f"{args.lora_adapters} adapters mixed, max_loras=2",
            mixed_tps,
            "tok/s",
            f"{mixed_tps / base_tps:.2f}x of base",
        ),
    ]


def switching(
    args: argparse.Namespace, engine: VllmEngine, max_loras: int, scratch: Path
) -> tuple[list[Row], dict[tuple[int, int, str], float]]:
    """Rows, and switch-aware / arrival tok/s by (adapters, max_loras, traffic)."""
    every = copy_adapters(max(args.switch_adapters), scratch / "switching", args.adapters)
    rows, ratios = [], {}
    next_id = [1000]
    for count in args.switch_adapters:
        for distribution in ("uniform", "zipf"):
            picks = traffic(args.switch_jobs, count, distribution, seed=11)
            figures = compare_policies(
                engine,
                every[:count],
                picks,
                max_loras,
                args.tokens,
                args.switch_repeats,
                next_id,
            )
            aware = figures[AdmissionPolicy.SWITCH_AWARE]
            arrival = figures[AdmissionPolicy.ARRIVAL]
            ratio = aware.tok_s / arrival.tok_s
            ratios[(count, max_loras, distribution)] = ratio
            rows.append(
                Row(
                    "switching",
                    f"{count} adapters, max_loras={max_loras}, "
                    f"{'Zipf(1.1)' if distribution == 'zipf' else 'uniform'}: switch-aware",
                    aware.tok_s,
                    "tok/s",
                    f"{ratio:.2f}x arrival ({arrival.tok_s:,.0f} tok/s); loads / 1,000 jobs "
                    f"{aware.loads_per_1000:.0f} vs {arrival.loads_per_1000:.0f}",
                )
            )
    return rows, ratios


def peft_naive(args: argparse.Namespace) -> tuple[int, float]:
    """Output tokens and seconds of the pipeline's first jobs (same seed: same inputs, adapters
    and token budget), one request at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    sources = list(TASK_OF)
    model = PeftModel.from_pretrained(model, args.adapters / sources[0], adapter_name=sources[0])
    for source in sources[1:]:
        model.load_adapter(args.adapters / source, adapter_name=source)
    model.eval()
    tokens = 0
    started = time.perf_counter()
    for source, text in zoo_inputs(args.peft_requests, seed=4):
        model.set_adapter(source)  # the per-request switch of the FastAPI demo pattern
        inputs = tokenizer(PROMPT.format(task=TASK_OF[source], text=text), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return tokens, time.perf_counter() - started


def peft_row(args: argparse.Namespace, pipeline: PipelineFigures) -> tuple[Row, float]:
    """Row, and the pipeline's output tok/s over the naive approach's."""
    tokens, seconds = pipeline.alongside
    tps = tokens / seconds
    ratio = pipeline.tok_s(pipeline.pipeline_runs) / tps
    jobs_ratio = pipeline.capacity / (args.peft_requests / seconds)
    row = Row(
        "naive",
        f"per-request PEFT set_adapter + HF generate, {args.peft_requests} jobs",
        tps,
        "tok/s",
        f"{args.peft_requests / seconds:.1f} jobs/s, {tokens / args.peft_requests:.1f} tok/job; "
        f"the pipeline is {ratio:.1f}x tok/s, {jobs_ratio:.1f}x jobs/s (run between them)",
    )
    return row, ratio


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Whole-command seconds, and stderr then stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - started, done.stderr + done.stdout


def last_figure(output: str, pattern: str) -> float:
    """The last match of `pattern` in a command's output: (minutes or "", number) → number."""
    found = re.findall(pattern, output)
    if not found:
        return float("nan")
    minutes, seconds = found[-1]
    return float(minutes or 0) * 60 + float(seconds.replace(",", ""))


def bulk_vs_run_batch(
    args: argparse.Namespace, scratch: Path
) -> tuple[list[Row], tuple[float, float]]:
    """Rows, and run_batch's time over bulk's: whole commands, and after engine start-up."""
    jobs = zoo_jobs(zoo_inputs(args.batch_jobs, seed=3), args.tokens, prefix="j")
    schemas = {
        task: p.output_schema for task, p in load_pipelines(Settings().pipelines_dir).items()
    }
    ours, theirs = scratch / "jobs.jsonl", scratch / "batch.jsonl"
    ours.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    lines = []
    for job in jobs:
        body = {
            "model": job["adapter"],
            "max_tokens": args.tokens,
            "temperature": 0.0,
            "messages": [
                {"role": "user", "content": PROMPT.format(task=job["task"], text=job["input"])}
            ],
        }
        if schemas.get(job["task"]) is not None:  # the same output contract as bulk's
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": job["task"], "schema": schemas[job["task"]]},
            }
        request = {"custom_id": job["job_id"], "method": "POST", "url": "/v1/chat/completions"}
        lines.append(json.dumps({**request, "body": body}) + "\n")
    theirs.write_text("".join(lines))
    # The zoo has no chat template; this one renders the prompt exactly as the pipelines do.
    template = scratch / "template.jinja"
    template.write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    env = worker_env(args.model, args.adapters, scratch)
    bulk_s, summary = timed(
        [
            *(sys.executable, "-m", "workers", "bulk"),
            *("--input", str(ours), "--output", str(scratch / "bulk-out")),
            # The LoRA engine against run_batch's; the merged tier has its own section.
            *("--rows-per-file", "100000", "--merge", "never"),
            *("--summary-json", str(scratch / "bulk-summary.json")),
        ],
        {**env, "LORA_WORKERS_ENGINE__MAX_LORAS": "5"},
    )
    phases = json.loads((scratch / "bulk-summary.json").read_text())["phases"]
    bulk_work_s = sum(phase["serve_s"] for phase in phases)
    # The values our worker's engine starts with, for vLLM's run_batch too.
    values = engine_values(EngineSettings(model=args.model), {})
    settings = values.settings
    run_batch_s, log = timed(
        [
            *(sys.executable, "-m", "vllm.entrypoints.openai.run_batch"),
            *("-i", str(theirs), "-o", str(scratch / "run-batch-out.jsonl")),
            *("--model", str(args.model), "--enable-lora", "--max-loras", "5"),
            *("--lora-modules", *[f"{s}={args.adapters / s}" for s in TASK_OF]),
            *("--max-lora-rank", str(values.max_lora_rank), "--dtype", values.dtype),
            *("--enforce-eager", "--max-model-len", str(values.max_model_len)),
            *("--kv-cache-memory-bytes", str(int(settings.kv_cache_gib * 2**30))),
            *("--chat-template", str(template)),
        ],
        env,
    )
    # run_batch's progress bar (1 s resolution) starts once every request is submitted.
    run_batch_work_s = last_figure(log, r"Running batch: 100% Completed.*?\[(\d+):(\d+)<")
    # Output tokens: bulk retries truncated or invalid outputs with a larger budget, run_batch not.
    bulk_tokens = last_figure(summary, r"output tokens\W*()([\d,]+)")
    lines = (scratch / "run-batch-out.jsonl").read_text().splitlines()
    run_batch_tokens = sum(
        (json.loads(line)["response"]["body"] or {}).get("usage", {}).get("completion_tokens", 0)
        for line in lines
    )
    return [
        Row(
            "bulk",
            f"lora-workers bulk, {args.batch_jobs} jobs",
            args.batch_jobs / bulk_s,
            "jobs/s",
            f"{bulk_s:.1f} s whole command, {bulk_work_s:.1f} s after engine start-up; "
            f"{bulk_tokens:,.0f} output tokens",
        ),
        Row(
            "bulk",
            f"vLLM run_batch, {args.batch_jobs} jobs, same schemas",
            args.batch_jobs / run_batch_s,
            "jobs/s",
            f"{run_batch_s:.1f} s whole command, {run_batch_work_s:.0f} s after start-up; bulk is "
            f"{run_batch_s / bulk_s:.2f}x whole, {run_batch_work_s / bulk_work_s:.2f}x after; "
            f"{run_batch_tokens:,} output tokens",
        ),
    ], (run_batch_s / bulk_s, run_batch_work_s / bulk_work_s)


def tree_rss() -> int:
    me = psutil.Process()
    return me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))


def memory(args: argparse.Namespace, scratch: Path) -> tuple[list[Row], float]:
    """Rows, and RSS growth over adapter file sizes at the largest count with the host cache of
    --memory-host-cache (registered, not all resident). A second pass keeps every adapter
    resident, which measures what each one costs in the cache."""
    top = max(args.memory_adapters)
    adapters = copy_adapters(top, scratch / "memory", args.adapters)
    sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for _, p, _ in adapters]
    rows: list[Row] = []
    ratios: list[float] = []
    for host_cache in (args.memory_host_cache, max(top, 2)):
        settings = EngineSettings(model=args.model, max_loras=2, max_cpu_loras=host_cache)
        engine = VllmEngine(engine_values(settings, {}))  # zoo adapters: rank 8, the default
        cache = "all resident" if host_cache >= top else f"host cache of {host_cache}"
        try:
            registered = 0
            baseline = tree_rss()
            for target in sorted(args.memory_adapters):
                for i in range(registered, target):
                    name, path, _ = adapters[i]
                    engine.register_adapter(AdapterHandle(name, "1", str(path), i + 1))
                registered = target
                growth = tree_rss() - baseline
                files = sum(sizes[:target])
                rows.append(
                    Row(
                        "memory",
                        f"{target} adapters registered, {cache}",
                        growth / 2**20,
                        "MiB RSS growth",
                        f"{growth / files:.2f}x of {files / 2**20:.1f} MiB adapter files",
                    )
                )
            ratios.append(growth / files)
        finally:
            engine.close()
    return rows, ratios[0]


def chart(rows: list[Row], targets: list[Target], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(20, 10))
    (throughput, goals, switches), (latency, mem, spare) = axes
    spare.axis("off")
    tok = [r for r in rows if r.unit == "tok/s" and r.section != "switching"]
    throughput.barh([r.subject[:42] for r in tok], [r.value for r in tok], color="#4c72b0")
    throughput.set_xlabel("output tokens / s")
    throughput.set_title("Throughput on the same prompts")
    # Each target as measured / required, so 1.0 is the line to reach (inverted for "at most").
    shares = [t.required / t.measured if t.at_most else t.measured / t.required for t in targets]
    colours = ["#55a868" if t.met else "#c44e52" for t in targets]
    # Bars stop at 2 so one far-met target does not flatten the rest; the labels say the value.
    goals.barh([t.name for t in targets], [min(v, 2.0) for v in shares], color=colours)
    for row, value in enumerate(shares):
        goals.text(min(value, 2.0) + 0.03, row, f"{value:.2f}", va="center", fontsize=8)
    goals.set_xlim(0, 2.3)
    goals.axvline(1.0, color="black", linewidth=1)
    goals.set_title("Targets: measured / required (≥ 1 is met)")
    sw = [r for r in rows if r.section == "switching"]
    ratios = [float(r.note.split("x arrival")[0]) for r in sw]
    switches.barh([r.subject.removesuffix(": switch-aware") for r in sw], ratios, color="#8172b2")
    switches.axvline(1.0, color="black", linewidth=1)
    switches.set_title("Switch-aware / arrival, output tok/s")
    lat = [r for r in rows if r.section.startswith("latency")]
    for offset, r in enumerate(lat):
        p95, p99 = (float(x.split()[1].replace(",", "")) for x in r.note.split(", ")[:2])
        latency.bar(
            [offset * 4 + i for i in range(3)],
            [r.value, p95, p99],
            label=r.section.removeprefix("latency").strip(" ()") + " " + r.subject.split(" (")[0],
        )
    latency.set_xticks([o * 4 + i for o in range(len(lat)) for i in range(3)])
    latency.set_xticklabels(["p50", "p95", "p99"] * len(lat))
    latency.set_ylabel("publish → result (ms)")
    latency.set_title("End-to-end latency through Kafka")
    latency.legend(fontsize=8)
    memory_rows = [r for r in rows if r.section == "memory"]
    for cache in dict.fromkeys(r.subject.split(", ", 1)[1] for r in memory_rows):
        line = [r for r in memory_rows if r.subject.endswith(cache)]
        mem.plot(
            [int(r.subject.split()[0]) for r in line], [r.value for r in line], "o-", label=cache
        )
    if memory_rows:
        mem.legend(fontsize=8)
    mem.set_xscale("log")
    mem.set_xlabel("adapters registered")
    mem.set_ylabel("RSS growth (MiB)")
    mem.set_title("Memory by adapters registered")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(rows: list[Row], targets: list[Target], seconds: float) -> str:
    lines = ["| section | subject | value | unit | note |", "| --- | --- | ---: | --- | --- |"]
    lines += [f"| {r.section} | {r.subject} | {r.value:,.1f} | {r.unit} | {r.note} |" for r in rows]
    lines += ["", "| target | required | measured | |", "| --- | ---: | ---: | --- |"]
    for t in targets:
        sign = "≤" if t.at_most else "≥"
        verdict = "met" if t.met else "missed"
        measured = f"{t.measured:.2f}{t.unit}"
        lines.append(f"| {t.name} | {sign} {t.required:g}{t.unit} | {measured} | {verdict} |")
    lines.append(f"\nWhole run: {seconds / 60:.1f} min.")
    return "\n".join(lines)


SECTIONS = ("pipeline", "naive", "lora-cost", "switching", "fairness", "bulk", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama")
    parser.add_argument(
        "--adapters",
        type=Path,
        default=ROOT / "models" / "adapters",
        help="a directory holding classifier, customer-tone, partner-tone, summarizer",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma list of {', '.join(SECTIONS)} (pipeline includes latency; naive and the "
        "baseline worker run inside pipeline)",
    )
    parser.add_argument("--tokens", type=int, default=32, help="max output tokens per job")
    parser.add_argument("--pipeline-jobs", type=int, default=2048)
    parser.add_argument("--pipeline-repeats", type=int, default=2)
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="per offered load")
    parser.add_argument(
        "--baseline-ref",
        default=BASELINE_REF,
        help="a commit whose worker is measured beside this one in the pipeline and fairness "
        "sections (a temporary git worktree); default: main before the latency work; none: skip",
    )
    parser.add_argument("--prompts", type=int, default=256, help="LoRA cost prompts")
    parser.add_argument("--lora-adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="LoRA cost runs")
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    parser.add_argument("--switch-adapters", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--switch-max-loras", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--switch-jobs", type=int, default=512)
    parser.add_argument("--switch-repeats", type=int, default=2)
    parser.add_argument("--fairness-seconds", type=float, default=20.0, help="per phase")
    parser.add_argument(
        "--fairness-capacity",
        type=float,
        help="jobs/s the fairness rates derive from; default: the pipeline section's capacity",
    )
    parser.add_argument(
        "--fairness-policies",
        nargs="+",
        default=["switch_aware"],
        help="a worker each: POLICY or POLICY:ENGINE_DEPTH (the first one's are the targets)",
    )
    parser.add_argument("--peft-requests", type=int, default=48)
    parser.add_argument("--batch-jobs", type=int, default=1024)
    parser.add_argument("--memory-adapters", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--memory-host-cache", type=int, default=16, help="max_cpu_loras")
    args = parser.parse_args()
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(sections - set(SECTIONS))}; from {SECTIONS}")
    if "naive" in sections and "pipeline" not in sections:
        parser.error("naive runs inside the pipeline section: add pipeline")
    if "fairness" in sections and "pipeline" not in sections and not args.fairness_capacity:
        parser.error("fairness without pipeline needs --fairness-capacity")
    if args.lora_adapters > args.max_cpu_loras:
        parser.error("--lora-adapters must fit in --max-cpu-loras (no evictions in LoRA cost)")
    configure_logging("WARNING")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    started = time.perf_counter()
    rows: list[Row] = []
    targets: list[Target] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        if {"pipeline", "fairness"} & sections and not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            # One broker for every Kafka section (each uses its own topics and groups).
            bootstrap, how = stack.enter_context(kafka_broker(scratch / "kafka"))
            stack.enter_context(_environ(KAFKA_BOOTSTRAP_SERVERS=bootstrap))
            print(f"[broker: {how}]", file=sys.stderr, flush=True)
        pipe: PipelineFigures | None = None
        wanted = args.baseline_ref if {"pipeline", "fairness"} & sections else "none"
        baseline = stack.enter_context(baseline_checkout(wanted))
        if "pipeline" in sections:
            pipe = section(
                "pipeline + latency",
                partial(
                    measure_pipeline,
                    args.model,
                    args.adapters,
                    args.pipeline_jobs,
                    args.tokens,
                    (0.5, 0.9),
                    args.latency_seconds,
                    args.pipeline_repeats,
                    # between the pipeline's first run and the raw one: side by side
                    partial(peft_naive, args) if "naive" in sections else None,
                    baseline=baseline,
                ),
            )
            rows += pipeline_rows(pipe, versus=pipe.baseline)
            if pipe.baseline is not None:
                rows += pipeline_rows(pipe.baseline, f" ({args.baseline_ref} worker)")
            targets += pipeline_targets(pipe)
            if "naive" in sections:
                peft, peft_ratio = peft_row(args, pipe)
                rows.append(peft)
                targets.append(Target("pipeline / per-request PEFT, tok/s", 20, peft_ratio))
        if {"lora-cost", "switching"} & sections:
            ratios: dict[tuple[int, int, str], float] = {}
            for max_loras in args.switch_max_loras:
                if "switching" not in sections and max_loras != 2:
                    continue
                engine = bench_engine(args.model, max_loras, args.max_cpu_loras)
                try:
                    if max_loras == 2 and "lora-cost" in sections:  # one start-up less
                        rows += section("LoRA cost", partial(lora_cost, args, engine, scratch))
                    if "switching" in sections:
                        more, by_config = section(
                            f"switching max_loras={max_loras}",
                            partial(switching, args, engine, max_loras, scratch),
                        )
                        rows += more
                        ratios.update(by_config)
                finally:
                    engine.close()
            if "switching" in sections:
                zipf_key = (max(args.switch_adapters), min(args.switch_max_loras), "zipf")
                targets.append(
                    Target(
                        f"switch-aware / arrival admission, {zipf_key[0]} adapters Zipf "
                        f"max_loras={zipf_key[1]}, tok/s",
                        1.3,
                        ratios.get(zipf_key, float("nan")),
                    )
                )
        if "fairness" in sections:
            capacity = args.fairness_capacity or (pipe.capacity if pipe else float("nan"))
            fair = section(
                "fairness",
                partial(
                    measure_fairness,
                    args.model,
                    args.adapters,
                    capacity,
                    args.fairness_seconds,
                    args.tokens,
                    tuple(args.fairness_policies),
                    baseline,
                ),
            )
            rows += fairness_rows(fair)
            targets += fairness_targets(fair, args.fairness_policies[0])
        if "bulk" in sections:
            bulk_rows, (whole, after) = section("bulk", partial(bulk_vs_run_batch, args, scratch))
            rows += bulk_rows
            targets += [
                Target("bulk / vLLM run_batch, after engine start-up", 1.05, after),
                Target("bulk / vLLM run_batch, whole commands", 1.0, whole),
            ]
        if "memory" in sections:
            mem_rows, mem_ratio = section("memory", partial(memory, args, scratch))
            rows += mem_rows
            targets.append(
                Target(
                    f"memory growth / adapter files, {max(args.memory_adapters)} adapters "
                    "registered",
                    1.2,
                    mem_ratio,
                    at_most=True,
                )
            )
    table = markdown(rows, targets, time.perf_counter() - started)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    chart(rows, targets, args.out / "compare.png")
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'compare.png'}")


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pipeline_targets(f: PipelineFigures) -> list[Target]:
    """The issue's pipeline and latency targets (latency in seconds)."""
    targets = [
        Target(
            f"pipeline / raw generate, first to last committed result, {f.jobs} jobs, jobs/s",
            1.0,
            f.jobs_ratio,
        )
    ]
    limits = {0.5: ((0.5, 0.5), (0.99, 1.5)), 0.9: ((0.99, 2.5),)}
    for load, checks in limits.items():
        if load not in f.latency:
            continue
        ms = f.latency[load][1]
        for q, limit_s in checks:
            targets.append(
                Target(
                    f"latency at {load:.0%} of capacity, p{round(q * 100)}",
                    limit_s,
                    percentile(ms, q) / 1000,
                    at_most=True,
                    unit=" s",
                )
            )
    return targets


if __name__ == "__main__":
    main()
