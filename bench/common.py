"""What the benchmarks share: the zoo, the pipelines' prompt shape, inputs like the training
data, and copies of the zoo's adapters under distinct names (vLLM then treats them as N)."""

from __future__ import annotations

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
