"""Benchmark: where lora-workers stands, measured side by side in one run.

    .venv/bin/python bench/compare.py [--model DIR --adapters DIR ...] [--out bench/out]

On the tiny zoo by default. Sections, each a ratio of two things measured in the same run:
1. LoRA cost: mixed-adapter vs base-model throughput of raw `LLM.generate` on the same prompts.
2. The naive approach: per-request PEFT `set_adapter` + Hugging Face `generate` vs mixed vLLM.
3. Bulk mode vs vLLM's own batch runner (`run_batch --enable-lora --lora-modules`), same jobs,
   whole commands timed (both start an engine).
4. Memory: engine RSS (all processes) with 1, 10, 100 and 1,000 adapters registered, against
   the adapters' file sizes.
Writes `results.md` and `compare.png` to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from common import PROMPT, ROOT, TASK_OF, copy_adapters, zoo_inputs

from workers.config import EngineSettings
from workers.engine import AdapterHandle, GenerationRequest, VllmEngine
from workers.logs import configure_logging


@dataclass
class Row:
    section: str
    subject: str
    value: float
    unit: str
    note: str = ""


def tok_per_s(engine: VllmEngine, requests: list[GenerationRequest]) -> float:
    started = time.perf_counter()
    tokens = sum(g.completion_tokens for g in engine.generate(requests))
    return tokens / (time.perf_counter() - started)


def lora_cost(args: argparse.Namespace, scratch: Path) -> tuple[list[Row], float]:
    adapters = copy_adapters(args.lora_adapters, scratch / "lora-cost", args.adapters)
    engine = VllmEngine(
        EngineSettings(
            model=args.model,
            max_loras=2,
            max_cpu_loras=args.lora_adapters,
            base_via_identity_adapter=False,
            max_num_seqs=256,
        )
    )
    try:
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
    finally:
        engine.close()
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
    ], mixed_tps


def peft_naive(args: argparse.Namespace, mixed_tps: float) -> list[Row]:
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
    for source, text in zoo_inputs(args.peft_requests, seed=2):
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
    tps = tokens / (time.perf_counter() - started)
    return [
        Row(
            "naive",
            "per-request PEFT set_adapter + HF generate",
            tps,
            "tok/s",
            f"lora-workers engine is {mixed_tps / tps:.0f}x faster",
        )
    ]


def bulk_vs_run_batch(args: argparse.Namespace, scratch: Path) -> list[Row]:
    pairs = zoo_inputs(args.batch_jobs, seed=3)
    jobs = scratch / "jobs.jsonl"
    batch = scratch / "batch.jsonl"
    with jobs.open("w") as ours, batch.open("w") as theirs:
        for i, (source, text) in enumerate(pairs):
            task = TASK_OF[source]
            ours.write(
                json.dumps(
                    {
                        "job_id": f"j{i}",
                        "task": task,
                        "input": text,
                        "adapter": source,
                        "params": {"max_tokens": args.tokens},
                    }
                )
                + "\n"
            )
            body = {
                "model": source,
                "max_tokens": args.tokens,
                "temperature": 0.0,
                "messages": [{"role": "user", "content": PROMPT.format(task=task, text=text)}],
            }
            theirs.write(
                json.dumps(
                    {
                        "custom_id": f"j{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )
    # The zoo has no chat template; this one renders the prompt exactly as the pipelines do.
    template = scratch / "template.jinja"
    template.write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "workers",
            "bulk",
            "--input",
            str(jobs),
            "--output",
            str(scratch / "bulk-out"),
            "--rows-per-file",
            "100000",
        ],
        check=True,
        capture_output=True,
        env={**env, "LORA_WORKERS_ENGINE__MAX_LORAS": "5"},
    )
    bulk_s = time.perf_counter() - started
    lora_modules = [f"{s}={args.adapters / s}" for s in TASK_OF]
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(batch),
            "-o",
            str(scratch / "run-batch-out.jsonl"),
            "--model",
            str(args.model),
            "--enable-lora",
            "--lora-modules",
            *lora_modules,
            "--max-loras",
            "5",
            "--max-lora-rank",
            "8",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--kv-cache-memory-bytes",
            str(2**30),
            "--chat-template",
            str(template),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    run_batch_s = time.perf_counter() - started
    return [
        Row(
            "bulk",
            f"lora-workers bulk, {args.batch_jobs} jobs",
            args.batch_jobs / bulk_s,
            "jobs/s",
            f"{bulk_s:.1f} s whole command",
        ),
        Row(
            "bulk",
            f"vLLM run_batch, {args.batch_jobs} jobs",
            args.batch_jobs / run_batch_s,
            "jobs/s",
            f"{run_batch_s:.1f} s; bulk is {run_batch_s / bulk_s:.2f}x",
        ),
    ]


def tree_rss() -> int:
    me = psutil.Process()
    return me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))


def memory(args: argparse.Namespace, scratch: Path) -> list[Row]:
    adapters = copy_adapters(1000, scratch / "memory", args.adapters)
    sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for _, p, _ in adapters]
    engine = VllmEngine(EngineSettings(model=args.model, max_loras=2, max_cpu_loras=1000))
    rows = []
    try:
        registered = 0
        baseline = tree_rss()
        for target in (1, 10, 100, 1000):
            for i in range(registered, target):
                name, path, _ = adapters[i]
                engine.register_adapter(AdapterHandle(name, "1", str(path), i + 1))
            registered = target
            growth = tree_rss() - baseline
            files = sum(sizes[:target])
            rows.append(
                Row(
                    "memory",
                    f"{target} adapters registered",
                    growth / 2**20,
                    "MiB RSS growth",
                    f"{growth / files:.2f}x of {files / 2**20:.1f} MiB adapter files",
                )
            )
    finally:
        engine.close()
    return rows


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [r for r in rows if r.unit == "tok/s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh([r.subject for r in throughput], [r.value for r in throughput], color="#4c72b0")
    left.set_xlabel("output tokens / s")
    left.set_title("Throughput on the same prompts")
    mem = [r for r in rows if r.section == "memory"]
    right.plot([int(r.subject.split()[0]) for r in mem], [r.value for r in mem], marker="o")
    right.set_xscale("log")
    right.set_xlabel("adapters registered")
    right.set_ylabel("RSS growth (MiB)")
    right.set_title("Memory by adapters registered")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--lora-adapters", type=int, default=8)
    parser.add_argument("--peft-requests", type=int, default=48)
    parser.add_argument("--batch-jobs", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_logging("WARNING")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        rows, mixed_tps = lora_cost(args, scratch)
        rows += peft_naive(args, mixed_tps)
        rows += bulk_vs_run_batch(args, scratch)
        rows += memory(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = ["| section | subject | value | unit | note |", "| --- | --- | ---: | --- | --- |"]
    lines += [f"| {r.section} | {r.subject} | {r.value:,.1f} | {r.unit} | {r.note} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    chart(rows, args.out / "compare.png")
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'compare.png'}")


if __name__ == "__main__":
    main()
