"""Benchmark: the merged tier, in place on one engine (`VllmEngine.merge` / `unmerge`).

In this process, on one engine, the same classify prompts:
- the tier switch (merge, unmerge) against an engine restart;
- raw `generate` throughput: the LoRA path, the adapter merged in place (LoRA bypassed), the
  base model through the identity adapter (what vLLM's LoRA kernels cost with no adapter), and
  a separate engine started on a PEFT-merged checkpoint (the tier before in-place merging).

Then bulk runs of the same jobs under `--merge never`, `always` and `auto`, whole commands
timed and after engine start-up, with the agreement check's rate:
1. 4,096 classify jobs (one adapter), never / always / auto;
2. 16,384 classify jobs, never / always (`--large-jobs 0`: skipped);
3. the nightly example file (`ops/nightly-jobs.jsonl`, four tasks), never / always / auto.
`auto` runs last (it plans from the costs the earlier runs stored). Each command is a fresh
process, as a nightly run is.

    .venv/bin/python bench/merged_tier.py [--jobs 4096] [--large-jobs 16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, ZOO, worker_env


@dataclass
class BulkRun:
    mode: str
    jobs: int
    seconds: float  # whole command
    summary: dict

    @property
    def after_start_s(self) -> float:
        return sum(p["serve_s"] for p in self.summary["phases"])

    @property
    def agreement(self) -> str:
        rates = [
            f"text {p['agreement']['identical_text']:.1%}"
            + (
                ""
                if p["agreement"]["identical_output"] is None
                else f", parsed {p['agreement']['identical_output']:.1%}"
            )
            + f" of {p['agreement']['jobs']}"
            for p in self.summary["phases"]
            if p["agreement"]
        ]
        return "; ".join(rates) or "-"


def classify_jobs(count: int, seed: int) -> list[dict]:
    from tests.integration.harness import load_zoo_generators

    zoo = load_zoo_generators()
    rng = random.Random(seed)
    return [
        {"job_id": f"c{i}", "task": "classify", "input": zoo.make_message(rng)[0]}
        for i in range(count)
    ]


def bulk(mode: str, jobs_file: Path, scratch: Path, env: dict[str, str]) -> BulkRun:
    out = scratch / f"out-{jobs_file.stem}-{mode}"
    summary_path = scratch / f"summary-{jobs_file.stem}-{mode}.json"
    started = time.perf_counter()
    subprocess.run(
        [
            *(sys.executable, "-m", "workers", "bulk", "--merge", mode),
            *("--input", str(jobs_file), "--output", str(out)),
            *("--rows-per-file", "100000", "--summary-json", str(summary_path)),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    seconds = time.perf_counter() - started
    summary = json.loads(summary_path.read_text())
    return BulkRun(mode, summary["rows"], seconds, summary)


@dataclass
class Raw:
    """One engine's raw `generate` over the same prompts."""

    path: str
    seconds: float
    tokens: int
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def classify_prompts(count: int, seed: int) -> list[str]:
    from workers.core.config.pipelines import load_pipelines

    pipeline = load_pipelines(ROOT / "pipelines")["classify"]
    return [pipeline.render_prompt(job["input"]) for job in classify_jobs(count, seed)]


def in_place(prompts: int, scratch: Path) -> tuple[dict[str, list[float]], list[Raw]]:
    """Switch times (merge, unmerge, restart) and raw generate on each path, side by side."""
    from workers.adapters.checks import AdapterRequirements, adapter_digest
    from workers.adapters.merged import MergedCheckpoints
    from workers.core.config import LLAMA_LORA_MODULES, EngineSettings, MergeSettings
    from workers.core.engine_api import AdapterHandle, GenerationRequest
    from workers.engine.model import engine_values
    from workers.engine.vllm_engine import VllmEngine

    model, adapters = ZOO / "tiny-llama", ZOO / "adapters"
    classifier = AdapterHandle(
        "classifier", "1", str(adapters / "classifier"), 1, adapter_digest(adapters / "classifier")
    )
    values = engine_values(EngineSettings(model=model, max_num_seqs=512), {"classifier": 8})
    engine = VllmEngine(values)
    texts = classify_prompts(prompts, seed=31)
    tokens = [engine.tokenize(t) for t in texts]

    def run(path: str, on: VllmEngine, adapter: AdapterHandle | None) -> Raw:
        requests = [GenerationRequest(t, adapter, 32, 0.0, None) for t in tokens]
        on.generate(requests[:64])  # warm
        started = time.perf_counter()
        out = on.generate(requests)
        seconds = time.perf_counter() - started
        return Raw(path, seconds, sum(g.completion_tokens for g in out), [g.text for g in out])

    switches: dict[str, list[float]] = {"merge": [], "unmerge": [], "engine restart": []}
    raws: list[Raw] = []
    try:
        engine.register_adapter(classifier)
        raws.append(run("LoRA path", engine, classifier))
        raws.append(run("base model (identity adapter)", engine, None))
        for _ in range(5):
            switches["merge"].append(engine.merge(classifier))
            switches["unmerge"].append(engine.unmerge())
        engine.merge(classifier)
        raws.append(run("merged in place", engine, classifier))
        engine.unmerge()
        for _ in range(2):
            started = time.perf_counter()
            engine.restart()
            switches["engine restart"].append(time.perf_counter() - started)
        raws.append(run("LoRA path, again after the switches", engine, classifier))
    finally:
        engine.close()
    checkpoints = MergedCheckpoints(
        MergeSettings(cache_dir=scratch / "checkpoints"),
        model,
        AdapterRequirements("tiny-llama", 8, LLAMA_LORA_MODULES, (adapters,)),
        values.dtype,
    )
    separate = VllmEngine(values, merged=checkpoints.get(classifier))
    try:
        raws.append(run("separate merged engine (PEFT checkpoint)", separate, classifier))
    finally:
        separate.close()
    return switches, raws


def in_place_report(switches: dict[str, list[float]], raws: list[Raw]) -> str:
    lines = ["| tier switch | median | runs |", "|---|---|---|"]
    for name, times in switches.items():
        median = sorted(times)[len(times) // 2]
        lines.append(f"| {name} | {median * 1000:,.1f} ms | {len(times)} |")
    lora = raws[0]
    lines += [
        "",
        f"| raw generate, {len(lora.texts)} classify prompts, 32 tokens, greedy | seconds "
        "| tok/s | tok/s vs LoRA | identical text to LoRA |",
        "|---|---|---|---|---|",
    ]
    for raw in raws:
        same = sum(a == b for a, b in zip(raw.texts, lora.texts, strict=True))
        lines.append(
            f"| {raw.path} | {raw.seconds:.2f} | {raw.tokens_per_s:,.0f} "
            f"| {raw.tokens_per_s / lora.tokens_per_s:.2f}x | {same / len(lora.texts):.1%} |"
        )
    return "\n".join(lines)


def measure(jobs: int, large_jobs: int, scratch: Path) -> list[tuple[str, list[BulkRun]]]:
    env = {
        **worker_env(ZOO / "tiny-llama", ZOO / "adapters", scratch),
        "LORA_WORKERS_MERGE__CACHE_DIR": str(scratch / "merged-cache"),
    }
    sets = []
    runs_of: list[tuple[str, list[dict] | None, tuple[str, ...]]] = [
        (f"{jobs} classify jobs", classify_jobs(jobs, seed=11), ("never", "always", "auto")),
    ]
    if large_jobs:
        runs_of.append(
            (f"{large_jobs} classify jobs", classify_jobs(large_jobs, seed=12), ("never", "always"))
        )
    runs_of.append(("nightly example", None, ("never", "always", "auto")))
    for name, rows, modes in runs_of:
        if rows is None:
            jobs_file = ROOT / "ops" / "nightly-jobs.jsonl"
        else:
            jobs_file = scratch / f"{name.replace(' ', '-')}.jsonl"
            jobs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs = [bulk(mode, jobs_file, scratch, env) for mode in modes]
        sets.append((name, runs))
        for run in runs:
            print(
                f"{name}: --merge {run.mode}: {run.seconds:.1f} s whole, "
                f"{run.after_start_s:.1f} s after start-up, merged {run.summary['plan']['merged']}",
                file=sys.stderr,
                flush=True,
            )
    return sets


def targets(sets: list[tuple[str, list[BulkRun]]]) -> list[tuple[str, float, float, bool]]:
    """(target, required, measured, at_most) for the issue's figures."""
    found = []
    for name, runs in sets:
        by_mode = {run.mode: run for run in runs}
        never, always = by_mode["never"], by_mode["always"]
        if name.endswith("classify jobs"):
            jobs = never.jobs
            found.append(
                (
                    f"{name}: always / never, whole command",
                    2.0 if jobs >= 16384 else 1.5,
                    never.seconds / always.seconds,
                    False,
                )
            )
            if jobs < 16384:
                found.append(
                    (
                        f"{name}: always / never, after start-up",
                        3.0,
                        never.after_start_s / always.after_start_s,
                        False,
                    )
                )
            rates = [
                p["agreement"]["identical_text"] for p in always.summary["phases"] if p["agreement"]
            ]
            if rates:
                found.append((f"{name}: agreement, identical text", 0.97, min(rates), False))
        if "auto" in by_mode:
            best = min(never.seconds, always.seconds)
            found.append(
                (
                    f"{name}: auto / the better of never and always, whole command",
                    1.1,
                    by_mode["auto"].seconds / best,
                    True,
                )
            )
            found.append(
                (
                    f"{name}: auto / never, whole command (never slower)",
                    1.0,
                    by_mode["auto"].seconds / never.seconds,
                    True,
                )
            )
    return found


def report(sets: list[tuple[str, list[BulkRun]]]) -> str:
    lines = [
        "| jobs | --merge | whole command | after start-up | vs never (whole / after) "
        "| merged | agreement with LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in sets:
        never = runs[0]
        for run in runs:
            lines.append(
                f"| {name} | {run.mode} | {run.seconds:.1f} s | {run.after_start_s:.1f} s "
                f"| {never.seconds / run.seconds:.2f}x / "
                f"{never.after_start_s / max(run.after_start_s, 1e-9):.2f}x "
                f"| {', '.join(run.summary['plan']['merged']) or '-'} | {run.agreement} |"
            )
    lines += ["", "| target | required | measured | met |", "|---|---|---|---|"]
    for target, required, measured, at_most in targets(sets):
        met = measured <= required if at_most else measured >= required
        bound = "at most" if at_most else "at least"
        lines.append(
            f"| {target} | {bound} {required:g} | {measured:.3f} | {'yes' if met else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4096)
    parser.add_argument("--large-jobs", type=int, default=16384)
    parser.add_argument("--prompts", type=int, default=1024, help="raw generate prompts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-merged-") as scratch:
        switches, raws = in_place(args.prompts, Path(scratch))
        print(in_place_report(switches, raws), file=sys.stderr, flush=True)
        table = in_place_report(switches, raws) + "\n\n"
        table += report(measure(args.jobs, args.large_jobs, Path(scratch)))
        # What the runs measured and stored for the planner: the defaults' source.
        costs = Path(scratch) / "merged-cache" / "costs.json"
        (args.out / "merged-costs.json").write_text(costs.read_text())
    print(table)
    (args.out / "merged.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
