"""Benchmark: the worker's own per-job ceiling, with an engine that answers at once.

    .venv/bin/python bench/overhead.py [--jobs 20000] [--repeats 3] [--baseline-ref 3f089d1]
                                       [--profile DIR]

The real Kafka worker (`workers.runtime.run_worker`: consumer group, pipelines, schemas, the
exactly-once sink and its transactions) runs in one process on the tests' broker
(/tmp/lw/bootstrap's KAFKA_BOOTSTRAP_SERVERS, else `tests.broker.kafka_broker`) against
`bench/instant_engine.py`, whose every request finishes in the next step with a canned,
schema-valid output. The jobs (four adapters + base, in equal shares) are all published first;
jobs/s counts results from the first committed one to the last (read_committed, the result
records' timestamps), leaving out the first transaction's. Each worker runs `--repeats` times,
alternating with the baseline's runs; the median is reported, with the process's CPU per job
and the garbage collector's share of it (thread CPU time inside its passes).

Then one more run of as many jobs runs under cProfile, every Python thread with its own
profiler on its CPU time (`time.thread_time`, so waiting and GIL contention are not counted),
and sums the CPU per stage. cProfile's cost per call inflates the functions called most, so
its shares are what to read, not its µs. `--profile DIR` writes the raw stats (one .pstats
per worker, all threads merged). With `--baseline-ref`, the same is measured on a `git
worktree` of that commit (its `workers` package, this checkout's bench and zoo), side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP_FILE = Path("/tmp/lw/bootstrap")
BASE_EVERY = 5  # one job in five has no adapter: the base model serves it

# Stages as (label, [(file suffix, function)]): the CPU of a stage is the cumulative time of
# its entry functions (never nested in one another). "rest" rows are computed from thread
# totals.
STAGES: list[tuple[str, list[tuple[str, str]]]] = [
    ("consume (Kafka poll, detach)", [("workers/stream/intake.py", "consume")]),
    (
        "decode + job validation",
        [("workers/core/prepare.py", "decode_job")],
    ),
    (
        "tokenize",
        [
            ("bench/instant_engine.py", "tokenize"),
            ("bench/instant_engine.py", "tokenize_many"),
            ("bench/instant_engine.py", "render_chat"),
        ],
    ),
    ("output validation", [("workers/core/validation.py", "check")]),
    ("result encoding", [("workers/kafka/sinks.py", "result_record")]),
    ("commit: produce + transaction", [("workers/stream/commits.py", "commit_if_due")]),
    ("engine double (step, canned answers)", [("bench/instant_engine.py", "step")]),
]
# Containers whose remainder is its own row: (label, entry functions, stages inside them).
REMAINDERS: list[tuple[str, list[tuple[str, str]], list[str]]] = [
    (
        "prepare + route + submit (rest)",
        [("workers/stream/intake.py", "accept")],
        ["decode + job validation", "tokenize"],
    ),
    (
        "result building (rest of output check)",
        [("workers/core/processing.py", "check")],
        ["output validation"],
    ),
    (
        "answers bookkeeping (rest)",
        [("workers/worker.py", "_collect")],
        ["result encoding"],
    ),
]
MAIN_THREAD = "MainThread"
LOOP_THREAD = "engine-loop"


def bootstrap_servers(stack: contextlib.ExitStack) -> str:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    if BOOTSTRAP_FILE.is_file():
        for line in BOOTSTRAP_FILE.read_text().split():
            name, _, value = line.partition("=")
            if name == "KAFKA_BOOTSTRAP_SERVERS":
                return value
    from tests.broker import kafka_broker

    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kafka-")))
    bootstrap, _ = stack.enter_context(kafka_broker(scratch))
    return bootstrap


# --- the child: one worker run, in this process ------------------------------------------------


class ThreadProfiles:
    """A cProfile per Python thread started while installed (and one for the caller's),
    on each thread's own CPU time."""

    def __init__(self) -> None:
        self.by_thread: list[tuple[str, cProfile.Profile]] = []
        self._original = threading.Thread.run
        self._lock = threading.Lock()

    def _new(self, name: str) -> cProfile.Profile:
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self.by_thread.append((name, profile))
        return profile

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = self._original
        profiles = self

        def run(thread: threading.Thread) -> None:
            profile = profiles._new(thread.name)
            profile.enable()
            try:
                original(thread)
            finally:
                profile.disable()

        threading.Thread.run = run  # type: ignore[method-assign]
        main = self._new(MAIN_THREAD)
        main.enable()
        try:
            yield
        finally:
            main.disable()
            threading.Thread.run = original  # type: ignore[method-assign]


class GcTime:
    """CPU time spent in the cyclic garbage collector's passes (all generations)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.runs = [0, 0, 0]
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._began
            self.runs[info["generation"]] += 1

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)


def _stats_of(profile: cProfile.Profile) -> dict[tuple[str, int, str], tuple[Any, ...]]:
    profile.create_stats()
    return profile.stats  # type: ignore[attr-defined,no-any-return]


def _matches(key: tuple[str, int, str], entries: list[tuple[str, str]]) -> bool:
    filename, _, function = key
    return any(filename.endswith(suffix) and function == name for suffix, name in entries)


def stage_table(profiles: ThreadProfiles) -> dict[str, float]:
    """CPU seconds per stage, summed over threads; "total" is every thread's CPU."""
    seconds: dict[str, float] = {}
    thread_totals: dict[str, float] = {}
    entries = {label: stage for label, stage in STAGES}
    entries |= {label: stage for label, stage, _ in REMAINDERS}
    for name, profile in profiles.by_thread:
        stats = _stats_of(profile)
        kind = name if name in (MAIN_THREAD, LOOP_THREAD) else "other threads"
        thread_totals[kind] = thread_totals.get(kind, 0.0) + sum(s[2] for s in stats.values())
        for label, wanted in entries.items():
            seconds[label] = seconds.get(label, 0.0) + sum(
                s[3] for key, s in stats.items() if _matches(key, wanted)
            )
    for label, _, inside in REMAINDERS:
        seconds[label] -= sum(seconds[part] for part in inside)
    in_loop = ("output validation", "result building (rest of output check)")
    in_loop += ("engine double (step, canned answers)",)
    seconds["admission + engine loop (rest of its thread)"] = thread_totals.get(
        LOOP_THREAD, 0.0
    ) - sum(seconds[label] for label in in_loop)
    on_main = [label for label in seconds if label not in in_loop and "engine loop" not in label]
    seconds["worker loop, other (rest of main thread)"] = thread_totals.get(MAIN_THREAD, 0.0) - sum(
        seconds[label] for label in on_main
    )
    seconds["other Python threads"] = thread_totals.get("other threads", 0.0)
    seconds["total"] = sum(thread_totals.values())
    return seconds


def top_functions(profiles: ThreadProfiles, count: int, out: Path | None) -> str:
    merged = pstats.Stats(profiles.by_thread[0][1])
    for _, profile in profiles.by_thread[1:]:
        merged.add(profile)
    if out is not None:
        merged.dump_stats(str(out))
    text = io.StringIO()
    merged.stream = text  # type: ignore[attr-defined]
    merged.sort_stats("tottime").print_stats(count)
    return text.getvalue()


def child(args: argparse.Namespace) -> None:
    """One worker run in this process (whatever `workers` package the path gives)."""
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    from common import zoo_inputs, zoo_jobs
    from instant_engine import InstantEngine

    from tests.integration.harness import deploy, job_record, produce
    from workers.core.config import Settings, load_catalog
    from workers.engine.model import engine_values
    from workers.kafka.topics import read_to_end
    from workers.logs import configure_logging
    from workers.runtime import run_worker

    configure_logging("INFO")  # as the CLI runs the worker
    scratch = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        deployment = deploy(args.bootstrap, scratch)
        pairs = zoo_inputs(args.jobs, seed=7)
        jobs = zoo_jobs(pairs, max_tokens=16, prefix=f"{deployment.suffix}-")
        for i, job in enumerate(jobs):
            if i % BASE_EVERY == BASE_EVERY - 1:  # a reply job with no tenant: the base model
                job["task"] = "reply"
                del job["adapter"]
        produce(
            args.bootstrap,
            [job_record(deployment.pipelines[j["task"]].input_topic, j) for j in jobs],
        )
        os.environ.update(deployment.env())
        # The zoo is this checkout's (a baseline worktree has no models/).
        roots = [str(ROOT / "models"), str(deployment.adapter_root)]
        os.environ["LORA_WORKERS_ADAPTERS__ALLOWED_ROOTS"] = json.dumps(roots)
        settings = Settings.load({}, ROOT / "lora-workers.yaml").settings
        # Imports and the first tokenizer load (its chat template compiled) outside the profile.
        InstantEngine(engine_values(settings.engine, load_catalog(settings.catalog))).close()
        profiles = ThreadProfiles() if args.profiled else None
        collecting = GcTime()
        started = time.monotonic()
        cpu_before = time.process_time()
        with profiles.installed() if profiles else contextlib.nullcontext():
            summary = run_worker(
                settings, max_jobs=args.jobs, idle_exit_s=60, engine_factory=InstantEngine
            )
        wall = time.monotonic() - started
        collecting.stop()
        cpu = time.process_time() - cpu_before
        topics = [p.result_topic for p in deployment.pipelines.values()]
        stamps = sorted(m.timestamp()[1] / 1000 for m in read_to_end(args.bootstrap, topics))
        first, last = stamps[0], stamps[-1]
        after_first = [s for s in stamps if s > first + 0.05]  # the first transaction left out
        figures: dict[str, Any] = {
            "jobs": args.jobs,
            "answered": summary.answered,
            "results": len(stamps),
            "dead_letters": sum(summary.dead_letters.values()),
            "jobs_s": len(after_first) / (last - first) if last > first else 0.0,
            "wall_s": wall,
            "cpu_s": cpu,
            "gc_s": collecting.seconds,
            "gc_runs": collecting.runs,
        }
        if profiles is not None:
            figures["stages"] = stage_table(profiles)
            figures["top"] = top_functions(profiles, 25, args.stats)
        args.out.write_text(json.dumps(figures))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the parent: variants side by side --------------------------------------------------------


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    tree = Path(tempfile.mkdtemp(prefix="bench-overhead-baseline-")) / "tree"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), ref], check=True)
    try:
        yield tree
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tree.parent, ignore_errors=True)


def run_child(
    tree: Path, bootstrap: str, jobs: int, profiled: bool, stats: Path | None, log: Path
) -> dict[str, Any]:
    """A child process on `tree`'s `workers` package (first on the path), this bench's code."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--jobs", str(jobs)]
        command += ["--bootstrap", bootstrap, "--out", out.name]
        if profiled:
            command.append("--profiled")
        if stats is not None:
            command += ["--stats", str(stats)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(tree), str(ROOT)]))}
        with log.open("a") as log_file:
            subprocess.run(command, env=env, cwd=tree, stderr=log_file, check=True)
        return json.loads(Path(out.name).read_text())  # type: ignore[no-any-return]


def print_profile(name: str, profiled: dict[str, Any]) -> None:
    stages = profiled["stages"]
    jobs = profiled["jobs"]
    total = stages["total"]
    print(f"\n## {name}: CPU per stage\n")
    print(
        f"Profiled run of {jobs} jobs, {total / jobs * 1e6:,.0f} µs CPU/job under cProfile "
        "(its per-call cost inflates functions called often; the shares are what to read):\n"
    )
    print("| stage | share | µs/job (profiled) |")
    print("|---|---:|---:|")
    for label, seconds in stages.items():
        if label != "total":
            print(f"| {label} | {seconds / total:.0%} | {seconds / jobs * 1e6:,.0f} |")
    print(f"\nTop of the profile (tottime, all threads):\n```\n{profiled['top'].strip()}\n```")


def print_figures(runs: dict[str, list[dict[str, Any]]]) -> None:
    print("\n## Jobs/s per worker process (first to last committed result)\n")
    print("| worker | jobs/s (median) | runs | CPU µs/job (whole run) | of which GC µs/job |")
    print("|---|---:|---|---:|---:|")
    for name, measured in runs.items():
        rates = [m["jobs_s"] for m in measured]
        cpu = statistics.median(m["cpu_s"] / m["jobs"] * 1e6 for m in measured)
        shown = ", ".join(f"{r:,.0f}" for r in rates)
        gc_ms = statistics.median(m["gc_s"] / m["jobs"] * 1e6 for m in measured)
        print(f"| {name} | {statistics.median(rates):,.0f} | {shown} | {cpu:,.0f} | {gc_ms:.0f} |")
    for name, measured in runs.items():
        missing = [m for m in measured if m["results"] != m["jobs"] or m["dead_letters"]]
        if missing:
            print(f"\n{name}: runs with results missing or dead letters: {missing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker, alternating")
    parser.add_argument("--baseline-ref", default=None, help="e.g. 3f089d1: measured beside")
    parser.add_argument("--profile", type=Path, default=None, help="write raw stats here")
    parser.add_argument("--no-profile-run", action="store_true", help="throughput only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with contextlib.ExitStack() as stack:
        bootstrap = bootstrap_servers(stack)
        variants = [("this checkout", ROOT)]
        if args.baseline_ref:
            tree = stack.enter_context(worktree(args.baseline_ref))
            variants.insert(0, (f"{args.baseline_ref} (before)", tree))
        log = Path(tempfile.gettempdir()) / "bench-overhead.log"
        print(f"worker logs: {log}", file=sys.stderr)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
        for _ in range(args.repeats):  # alternating, so load from elsewhere hits both alike
            for name, tree in variants:
                runs[name].append(run_child(tree, bootstrap, args.jobs, False, None, log))
        print_figures(runs)
        if args.no_profile_run:
            return
        for name, tree in variants:
            slug = name.split()[0].replace("/", "-")
            stats = None if args.profile is None else args.profile / f"{slug}.pstats"
            print_profile(name, run_child(tree, bootstrap, args.jobs, True, stats, log))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
