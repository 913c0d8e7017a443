"""Routing beyond rules and adapter governance, on a real broker and a real vLLM engine:
classifier routing and embedding routing (the shipped `pipelines/routing/` pipelines on the
zoo's held-out tickets), a shadow version evaluated on live traffic and then promoted with no
job lost, and adapters composed with PEFT that pass the checks and serve."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.integration.harness import (
    ROOT,
    Deployment,
    TopicWatcher,
    deploy,
    job_record,
    load_zoo_generators,
    produce,
)
from tests.integration.oracle import PeftOracle

pytestmark = pytest.mark.integration

ZOO = ROOT / "models"


@cache
def held_out() -> list[dict]:
    """The zoo's labelled held-out tickets (ops/build_zoo.py)."""
    lines = (ZOO / "routing-heldout.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


SUPPORT_LABELS = {"billing": "billing-reply", "technical": "technical-reply"}
SUPPORT_LABELS["account"] = "account-reply"


@dataclass(frozen=True)
class RoutedRun:
    deployment: Deployment
    results: dict[str, dict]
    unrelated: set[str]


@pytest.fixture(scope="module")
def routed_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> RoutedRun:
    """One worker serving the classifier-routed and embedding-routed pipelines."""
    tmp_path = tmp_path_factory.mktemp("routed")
    deployment = deploy(kafka_bootstrap, tmp_path, ROOT / "pipelines" / "routing")
    rng = random.Random(11)
    zoo = load_zoo_generators()
    unrelated = [zoo.make_report(rng) for _ in range(20)]  # status reports: no ticket at all
    jobs = [
        {"job_id": f"{task}-{i:03d}", "task": task, "input": example["input"]}
        for task in ("support", "triage")
        for i, example in enumerate(held_out())
    ]
    jobs += [
        {"job_id": f"triage-unrelated-{i:02d}", "task": "triage", "input": text}
        for i, text in enumerate(unrelated)
    ]
    pipelines = deployment.pipelines
    produce(kafka_bootstrap, [job_record(pipelines[j["task"]].input_topic, j) for j in jobs])
    log_path = tmp_path / "worker.log"
    code = deployment.run_worker(
        "--max-jobs", str(len(jobs)), "--idle-exit", "120", log_path=log_path
    )
    assert code == 0, log_path.read_text()[-3000:]
    results: dict[str, dict] = {}
    for message in deployment.read([p.result_topic for p in pipelines.values()]):
        result = json.loads(message.value())
        assert result["job_id"] not in results, "a job was answered twice"
        results[result["job_id"]] = result
    assert set(results) == {job["job_id"] for job in jobs}
    return RoutedRun(deployment, results, {f"triage-unrelated-{i:02d}" for i in range(20)})


def test_classifier_routing_sends_each_ticket_to_its_labels_adapter(routed_run: RoutedRun) -> None:
    results = routed_run.results
    oracle = PeftOracle(
        ZOO / "tiny-llama",
        {name: ZOO / "adapters" / name for name in ["classifier", *SUPPORT_LABELS.values()]},
    )
    pipeline = routed_run.deployment.pipelines["support"]
    classifier = pipeline.routing.classifier
    assert classifier is not None and classifier.prompt_template is not None
    right, replies_checked, replies_matched = 0, Counter[str](), 0
    for i, example in enumerate(held_out()):
        result = results[f"support-{i:03d}"]
        route = result["route"]
        assert route["by"] == "classifier", result
        assert route["usage"]["prompt_tokens"] > 0 and route["usage"]["completion_tokens"] > 0
        right += route["label"] == example["label"]
        if route["fallback"]:
            assert result["adapter"] is None
            continue
        # The adapter its label names, whatever the label was.
        assert result["adapter"]["name"] == SUPPORT_LABELS[route["label"]], result
        assert result["served_by"] == "lora"
        adapter = result["adapter"]["name"]
        if replies_checked[adapter] < 4:
            # Both passes are what PEFT gives on the same weights: the label, then the reply.
            label = oracle.generate(
                "classifier",
                classifier.prompt_template.replace("{input}", example["input"]),
                classifier.max_tokens,
            )
            assert json.loads(label.text)["label"] == route["label"]
            want = oracle.generate(adapter, pipeline.render_prompt(example["input"]), 64)
            replies_matched += result["raw_output"] == want.text
            replies_checked[adapter] += 1
    assert right / len(held_out()) >= 0.9, right
    assert sum(replies_checked.values()) == 12 and replies_matched >= 11


def test_embedding_routing_picks_the_nearest_examples_or_falls_back(
    routed_run: RoutedRun,
) -> None:
    results = routed_run.results
    embedding = routed_run.deployment.pipelines["triage"].routing.embedding
    assert embedding is not None
    right = 0
    for i, example in enumerate(held_out()):
        result = results[f"triage-{i:03d}"]
        route = result["route"]
        assert route["by"] == "embedding" and route["similarity"] is not None
        assert (route["similarity"] >= embedding.threshold) == (not route["fallback"])
        right += route["adapter"] == example["adapter"]
        name = result["adapter"] and result["adapter"]["name"]
        assert name == route["adapter"]
    assert right / len(held_out()) >= 0.9, right
    for job_id in routed_run.unrelated:
        route = results[job_id]["route"]
        assert route["fallback"] and route["adapter"] is None, results[job_id]
        assert results[job_id]["adapter"] is None and results[job_id]["served_by"] == "base"


# --- shadow evaluation, promotion and composition ------------------------------------------


def classify_jobs(prefix: str, count: int, seed: int) -> list[dict]:
    zoo = load_zoo_generators()
    rng = random.Random(seed)
    return [
        {"job_id": f"{prefix}-{i:04d}", "task": "classify", "input": zoo.make_message(rng)[0]}
        for i in range(count)
    ]


def half_strength_classifier(root: Path) -> Path:
    """The classifier at half its LoRA scaling: mostly the same answers, not always."""
    target = root / "classifier-v2"
    shutil.copytree(ZOO / "adapters" / "classifier", target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] / 2
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def cli_ok(deployment: Deployment, *args: str) -> str:
    done = deployment.cli(*args, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_shadow_evaluation_then_promotion_and_composed_adapters(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    pipelines = deployment.pipelines
    shadow_dir = half_strength_classifier(deployment.adapter_root)
    published = cli_ok(
        deployment,
        *("adapters", "publish", "classifier", "--version", "2", "--path", str(shadow_dir)),
        *("--shadow", "0.2"),
    )
    assert "shadow 2: 20% of jobs" in published
    # Composition: a linear blend of the two tones serves; a cat of them has rank 16, more
    # than the engine's max_lora_rank 8, and is refused with nothing published or left behind.
    blend_dir = deployment.adapter_root / "blend"
    cli_ok(
        deployment,
        *("adapters", "compose", "blend", "--from", "customer-tone:0.5,partner-tone:0.5"),
        *("--version", "1", "--out", str(blend_dir)),
    )
    refused = deployment.cli(
        *("adapters", "compose", "wide", "--from", "customer-tone:0.5,partner-tone:0.5"),
        *("--method", "cat", "--version", "1", "--out", str(deployment.adapter_root / "wide")),
        timeout=300,
    )
    assert refused.returncode == 2 and "rank_too_large" in refused.stderr, refused.stderr
    assert not (deployment.adapter_root / "wide").exists()

    results = TopicWatcher(kafka_bootstrap, [p.result_topic for p in pipelines.values()])
    evaluations = TopicWatcher(kafka_bootstrap, [deployment.evaluations_topic])
    statuses = TopicWatcher(kafka_bootstrap, [deployment.status_topic])
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(
        "--idle-exit", "120", log_path=log_path, LORA_WORKERS_SHADOW__STATUS_INTERVAL_S="1"
    )
    try:
        first = classify_jobs("first", 320, seed=21)
        blended = [
            {**job, "job_id": f"blend-{i}", "task": "reply", "adapter": "blend"}
            for i, job in enumerate(classify_jobs("blend", 10, seed=24))
        ]
        produce(
            kafka_bootstrap,
            [job_record(pipelines[j["task"]].input_topic, j) for j in first + blended],
        )
        wanted = {job["job_id"] for job in first + blended}
        results.wait_for(lambda _: wanted <= answered(results), timeout_s=600)

        evaluations.wait_for(lambda messages: len(messages) >= 40, timeout_s=300)
        statuses.wait_for(
            lambda _: any(
                s["state"] == "shadow" and s["evaluation"] for s in statuses.json_values()
            ),
            timeout_s=120,
        )
        wait_until_quiet(evaluations, quiet_s=5)
        listing = cli_ok(deployment, "adapters", "list")
        assert "shadow 20%" in listing and "jobs:" in listing, listing

        # Promote while jobs are flowing: none lost, none twice.
        second = classify_jobs("second", 120, seed=22)
        produce(kafka_bootstrap, [job_record(pipelines["classify"].input_topic, j) for j in second])
        cli_ok(deployment, "adapters", "promote", "classifier", "2")
        statuses.wait_for(
            lambda _: any(
                s["name"] == "classifier" and s["version"] == "2" and s["state"] == "serving"
                for s in statuses.json_values()
            ),
            timeout_s=120,
        )
        third = classify_jobs("third", 40, seed=23)
        produce(kafka_bootstrap, [job_record(pipelines["classify"].input_topic, j) for j in third])
        everything = wanted | {job["job_id"] for job in second + third}
        results.wait_for(lambda _: everything <= answered(results), timeout_s=600)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            deployment.kill_workers()
        for watcher in (statuses,):
            watcher.close()
    log = log_path.read_text()
    assert worker.returncode == 0, log[-3000:]

    answers = results.json_values()
    counts = Counter(result["job_id"] for result in answers)
    assert set(counts) == everything and set(counts.values()) == {1}, "lost or doubled jobs"
    by_job = {result["job_id"]: result for result in answers}
    first_ids = {job["job_id"] for job in first}
    # The shadow never answers a job; after the promotion it serves them all.
    assert {by_job[j]["adapter"]["version"] for j in first_ids} == {"1"}
    assert {by_job[job["job_id"]]["adapter"]["version"] for job in third} == {"2"}
    assert {by_job[job["job_id"]]["adapter"]["version"] for job in second} <= {"1", "2"}

    evaluated = [e for e in evaluations.json_values() if e["job_id"] in first_ids]
    assert len({e["job_id"] for e in evaluated}) == len(evaluated), "an evaluation twice"
    share = len(evaluated) / len(first_ids)
    assert abs(share - 0.2) <= 0.08, share
    oracle = PeftOracle(
        ZOO / "tiny-llama", {"v1": ZOO / "adapters" / "classifier", "v2": shadow_dir}
    )
    jobs_by_id = {job["job_id"]: job for job in first}
    matched = 0
    sample = evaluated[:24]
    for evaluation in evaluated:
        serving = by_job[evaluation["job_id"]]
        assert (evaluation["serving"]["version"], evaluation["shadow"]["version"]) == ("1", "2")
        assert evaluation["serving_output"] == serving["raw_output"]
        assert evaluation["identical_text"] == (
            evaluation["serving_output"] == evaluation["shadow_output"]
        )
    for evaluation in sample:
        prompt = pipelines["classify"].render_prompt(jobs_by_id[evaluation["job_id"]]["input"])
        v1 = oracle.generate("v1", prompt, 32).text
        v2 = oracle.generate("v2", prompt, 32).text
        matched += (evaluation["serving_output"], evaluation["shadow_output"]) == (v1, v2)
    assert matched >= 0.9 * len(sample), (matched, len(sample))

    blend_oracle = PeftOracle(ZOO / "tiny-llama", {"blend": blend_dir})
    blend_matched = 0
    for job in blended:
        result = by_job[job["job_id"]]
        assert result["adapter"]["name"] == "blend" and result["route"]["by"] == "job"
        want = blend_oracle.generate("blend", pipelines["reply"].render_prompt(job["input"]), 64)
        blend_matched += result["raw_output"] == want.text
    assert blend_matched >= 9, blend_matched


def answered(watcher: TopicWatcher) -> set[str]:
    return {result["job_id"] for result in watcher.json_values()}


def wait_until_quiet(watcher: TopicWatcher, quiet_s: float, timeout_s: float = 300) -> None:
    """Until no new message arrived for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = len(watcher.messages)
        with contextlib.suppress(TimeoutError):
            watcher.wait_for(lambda messages, seen=before: len(messages) > seen, timeout_s=quiet_s)
        if len(watcher.messages) == before:
            return
    raise TimeoutError(f"still receiving after {timeout_s}s")
