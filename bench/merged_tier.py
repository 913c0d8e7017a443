"""Benchmark: the merged tier. Bulk runs of the same jobs under `--merge never`, `always` and
`auto`, whole commands timed and after engine start-up, with the agreement check's rate:

1. 4,096 classify jobs (one adapter), never / always / auto;
2. 16,384 classify jobs, never / always;
3. the nightly example file (`ops/nightly-jobs.jsonl`, four tasks), never / always / auto.

`always` runs first on an empty merged cache (it pays for merging), `auto` last (it plans from
the costs the earlier runs stored). Each command is a fresh process, as a nightly run is.

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


def measure(jobs: int, large_jobs: int, scratch: Path) -> list[tuple[str, list[BulkRun]]]:
    env = {
        **worker_env(ZOO / "tiny-llama", ZOO / "adapters", scratch),
        "LORA_WORKERS_MERGE__CACHE_DIR": str(scratch / "merged-cache"),
    }
    sets = []
    for name, rows, modes in (
        (f"{jobs} classify jobs", classify_jobs(jobs, seed=11), ("never", "always", "auto")),
        (f"{large_jobs} classify jobs", classify_jobs(large_jobs, seed=12), ("never", "always")),
        ("nightly example", None, ("never", "always", "auto")),
    ):
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-merged-") as scratch:
        table = report(measure(args.jobs, args.large_jobs, Path(scratch)))
        # What the runs measured and stored for the planner: the defaults' source.
        costs = Path(scratch) / "merged-cache" / "costs.json"
        (args.out / "merged-costs.json").write_text(costs.read_text())
    print(table)
    (args.out / "merged.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
