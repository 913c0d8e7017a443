"""What the benchmarks share: the zoo, the pipelines' prompt shape, inputs like the training
data, copies of the zoo's adapters under distinct names (vLLM then treats them as N), the job
dicts the worker consumes, and the environment that points a worker at any model and adapters."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ZOO = ROOT / "models"
PROMPT = "### Task: {task}\n### Input: {text}\n### Output: "  # as in pipelines/*.yaml
TASK_OF = {
    "classifier": "classify",
    "customer-tone": "reply",
    "partner-tone": "reply",
    "summarizer": "summarize",
}


def zoo_inputs(count: int, seed: int) -> list[tuple[str, str]]:
    """(adapter source, input text) pairs like the adapters' training data, sources in turn."""
    from tests.integration.harness import load_zoo_generators

    zoo = load_zoo_generators()
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        source = list(TASK_OF)[i % len(TASK_OF)]
        text = zoo.make_report(rng) if source == "summarizer" else zoo.make_message(rng)[0]
        pairs.append((source, text))
    return pairs


def zoo_jobs(pairs: list[tuple[str, str]], max_tokens: int, prefix: str) -> list[dict]:
    """Worker jobs (the job contract) for (adapter, input) pairs, the adapter named explicitly."""
    return [
        {
            "job_id": f"{prefix}{i}",
            "task": TASK_OF[source],
            "input": text,
            "adapter": source,
            "params": {"max_tokens": max_tokens},
        }
        for i, (source, text) in enumerate(pairs)
    ]


def copy_adapters(
    count: int, root: Path, adapters_dir: Path = ZOO / "adapters"
) -> list[tuple[str, Path, str]]:
    """`count` adapters as (name, directory, zoo source), the sources taken in turn."""
    made = []
    for i in range(count):
        source = list(TASK_OF)[i % len(TASK_OF)]
        target = root / f"adapter-{i:04d}"
        if not target.exists():
            shutil.copytree(adapters_dir / source, target)
        made.append((target.name, target, source))
    return made


def worker_env(model: Path, adapters_dir: Path, scratch: Path) -> dict[str, str]:
    """Environment for a `python -m workers` command serving `model` and the four adapters in
    `adapters_dir`."""
    return {**os.environ, **worker_settings(model, adapters_dir, scratch)}


def worker_settings(model: Path, adapters_dir: Path, scratch: Path) -> dict[str, str]:
    """The settings for serving `model` and the four adapters in `adapters_dir`: a catalog in
    `scratch` (absolute paths) and allowed roots that admit it."""
    catalog = scratch / "catalog.yaml"
    lines = [f"base_model: {model.name}", "adapters:"]
    for source in TASK_OF:
        path = (adapters_dir / source).resolve()
        lines += [f"  - name: {source}", '    version: "1"', f"    path: {json.dumps(str(path))}"]
    catalog.write_text("\n".join(lines) + "\n")
    roots = [str(ZOO.resolve()), str(adapters_dir.resolve())]
    return {
        "LORA_WORKERS_ENGINE__MODEL": str(model.resolve()),
        "LORA_WORKERS_CATALOG": str(catalog),
        "LORA_WORKERS_ADAPTERS__ALLOWED_ROOTS": json.dumps(roots),
        "VLLM_LOGGING_LEVEL": "WARNING",
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
