"""End to end on real parts: jobs on a real Kafka broker → `lora-workers run` (a real vLLM engine
with four LoRA adapters and the base model) → results and dead letters back on Kafka.

One worker run serves the whole module: its start-up (the engine) is the expensive part.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from types import ModuleType

import pytest
from jsonschema import Draft202012Validator

from tests.integration.harness import (
    ROOT,
    Deployment,
    assert_committed_to_the_end,
    deploy,
    expected_adapter,
    job_record,
    load_zoo_generators,
    produce,
)
from tests.integration.oracle import PeftOracle

pytestmark = pytest.mark.integration

ZOO = ROOT / "models"
ORACLE_SAMPLES_PER_ADAPTER = 6


def good_jobs(zoo: ModuleType, rng: random.Random) -> list[dict]:
    jobs: list[dict] = []

    def add(task: str, text: str, **extra: object) -> None:
        jobs.append({"job_id": f"{task}-{len(jobs):04d}", "task": task, "input": text, **extra})

    for _ in range(70):
        text, label, _topic = zoo.make_message(rng)
        add("classify", text, metadata={"expected_label": label})
    reply_tenants = ["acme"] * 25 + ["globex"] * 25 + [None] * 15 + ["initech"] * 10
    for tenant in reply_tenants:
        extra = {"tenant": tenant} if tenant else {}
        add("reply", zoo.make_message(rng)[0], **extra)
    for _ in range(5):  # the job's own adapter beats its tenant's
        add("reply", zoo.make_message(rng)[0], tenant="acme", adapter="partner-tone")
    for _ in range(60):
        add("summarize", zoo.make_report(rng), metadata={"batch": "nightly"})
    return jobs


@dataclass(frozen=True)
class Poison:
    code: str
    topic_task: str
    value: bytes
    dlq: str  # "task" for jobs.<task>.dlq, "unknown" for the unknown-task topic


POISONS = [
    Poison("invalid_json", "classify", b"{this is not json", "task"),
    Poison("invalid_job", "summarize", b'{"job_id": "p-2", "task": "summarize"}', "task"),
    Poison(
        "unknown_task", "reply", b'{"job_id": "p-3", "task": "translate", "input": "x"}', "unknown"
    ),
    Poison(
        "unknown_adapter",
        "classify",
        b'{"job_id": "p-4", "task": "classify", "input": "refund", "adapter": "ghost"}',
        "task",
    ),
    Poison(
        "context_exceeded",
        "summarize",
        json.dumps({"job_id": "p-5", "task": "summarize", "input": "word " * 800}).encode(),
        "task",
    ),
    Poison(
        "task_mismatch", "classify", b'{"job_id": "p-6", "task": "reply", "input": "x"}', "task"
    ),
]


@dataclass
class RunOutcome:
    deployment: Deployment
    jobs: list[dict]
    results: dict[str, list[dict]]  # job_id -> every result written for it
    dead_letters: list  # confluent_kafka.Message
    exit_code: int
    log: str


@pytest.fixture(scope="module")
def outcome(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    tmp_path = tmp_path_factory.mktemp("e2e")
    deployment = deploy(kafka_bootstrap, tmp_path)
    rng = random.Random(20261123)
    jobs = good_jobs(load_zoo_generators(), rng)
    records = [job_record(deployment.pipelines[j["task"]].input_topic, j) for j in jobs]
    for poison in POISONS:
        topic = deployment.pipelines[poison.topic_task].input_topic
        headers = [("x-trace", f"poison-{poison.code}".encode())]
        records.append((topic, f"poison-{poison.code}".encode(), poison.value, headers))
    rng.shuffle(records)
    produce(kafka_bootstrap, records)

    log_path = tmp_path / "worker.log"
    exit_code = deployment.run_worker(
        "--max-jobs", str(len(records)), "--idle-exit", "90", log_path=log_path
    )
    results: dict[str, list[dict]] = defaultdict(list)
    for message in deployment.read([p.result_topic for p in deployment.pipelines.values()]):
        result = json.loads(message.value())
        assert message.key() == result["job_id"].encode()
        results[result["job_id"]].append(result)
    dlq_topics = [p.dlq_topic for p in deployment.pipelines.values()]
    dead_letters = deployment.read([*dlq_topics, deployment.unknown_task_dlq])
    return RunOutcome(deployment, jobs, results, dead_letters, exit_code, log_path.read_text())


def test_worker_exits_cleanly(outcome: RunOutcome) -> None:
    assert outcome.exit_code == 0, outcome.log[-3000:]


def test_exactly_one_result_per_job(outcome: RunOutcome) -> None:
    assert len(outcome.jobs) >= 200
    counts = Counter({job_id: len(found) for job_id, found in outcome.results.items()})
    missing = [j["job_id"] for j in outcome.jobs if j["job_id"] not in counts]
    duplicated = [job_id for job_id, n in counts.items() if n > 1]
    assert missing == []
    assert duplicated == []
    assert set(counts) == {j["job_id"] for j in outcome.jobs}


def test_every_result_names_the_adapter_routing_promises(outcome: RunOutcome) -> None:
    served = Counter()
    for job in outcome.jobs:
        (result,) = outcome.results[job["job_id"]]
        want = expected_adapter(job)
        got = result["adapter"]
        assert (got and got["name"]) == want, job
        if got is not None:
            assert got["version"] == "1"
        served[want] += 1
        assert result["metadata"] == job.get("metadata")
        assert result["usage"]["prompt_tokens"] > 0
        assert result["timings"]["completed_at_ms"] >= result["timings"]["received_at_ms"]
    assert set(served) == {"classifier", "customer-tone", "partner-tone", "summarizer", None}


def test_greedy_outputs_equal_peft_token_for_token(outcome: RunOutcome) -> None:
    catalog_dirs = {
        name: ZOO / "adapters" / name
        for name in ("classifier", "customer-tone", "partner-tone", "summarizer")
    }
    oracle = PeftOracle(ZOO / "tiny-llama", catalog_dirs)
    by_adapter: dict[str | None, list[dict]] = defaultdict(list)
    for job in outcome.jobs:
        by_adapter[expected_adapter(job)].append(job)
    compared = 0
    for adapter, jobs in by_adapter.items():
        for job in random.Random(7).sample(jobs, min(ORACLE_SAMPLES_PER_ADAPTER, len(jobs))):
            pipeline = outcome.deployment.pipelines[job["task"]]
            (result,) = outcome.results[job["job_id"]]
            want = oracle.generate(
                adapter, pipeline.render_prompt(job["input"]), pipeline.sampling.max_tokens
            )
            assert result["raw_output"] == want.text, (adapter, job["job_id"])
            assert result["usage"]["completion_tokens"] == want.token_count, (adapter, job)
            compared += 1
    assert compared >= 5 * ORACLE_SAMPLES_PER_ADAPTER


def test_classifier_outputs_validate_and_are_right(outcome: RunOutcome) -> None:
    schema = json.loads((ROOT / "schemas" / "classify.output.schema.json").read_text())
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    classified = [j for j in outcome.jobs if j["task"] == "classify"]
    correct = 0
    for job in classified:
        (result,) = outcome.results[job["job_id"]]
        assert result["status"] == "ok", result
        assert list(validator.iter_errors(result["output"])) == []
        correct += result["output"]["label"] == job["metadata"]["expected_label"]
    assert correct / len(classified) >= 0.9


def test_summaries_are_schema_checked(outcome: RunOutcome) -> None:
    statuses = Counter(
        outcome.results[j["job_id"]][0]["status"] for j in outcome.jobs if j["task"] == "summarize"
    )
    assert statuses["ok"] >= 0.9 * sum(statuses.values()), statuses


def test_each_poison_is_dead_lettered_with_its_reason(outcome: RunOutcome) -> None:
    deployment = outcome.deployment
    by_trace = {}
    for message in outcome.dead_letters:
        headers = dict(message.headers())
        by_trace[headers["x-trace"].decode()] = (message, headers)
    assert len(outcome.dead_letters) == len(POISONS)
    for poison in POISONS:
        message, headers = by_trace[f"poison-{poison.code}"]
        source_topic = deployment.pipelines[poison.topic_task].input_topic
        expected_dlq = (
            deployment.unknown_task_dlq if poison.dlq == "unknown" else f"{source_topic}.dlq"
        )
        assert message.topic() == expected_dlq
        assert message.value() == poison.value  # original bytes, untouched
        assert headers["dlq.error.code"].decode() == poison.code
        assert headers["dlq.error.message"]
        assert headers["dlq.source.topic"].decode() == source_topic
        assert int(headers["dlq.source.partition"]) in range(3)
        assert int(headers["dlq.source.offset"]) >= 0


def test_offsets_committed_to_the_end(outcome: RunOutcome) -> None:
    assert_committed_to_the_end(outcome.deployment)
