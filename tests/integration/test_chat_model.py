"""The chat zoo end to end (real Kafka, real vLLM): a tiny Qwen2 with its own tokenizer and
ChatML template, rank-16 adapters trained on chat-formatted examples, `messages` jobs.

One worker serves the module (its engine start is the expensive part). Its settings point at
models/chat-zoo: the model, the catalog, the pipelines (copied with this run's topics) and the
allowed roots, plus the test's own adapter root for the first zoo's adapter it announces.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from jsonschema import Draft202012Validator

from tests.integration.harness import (
    ROOT,
    Deployment,
    TopicWatcher,
    deploy,
    job_record,
    produce,
    wait_for_event,
)
from tests.integration.oracle import PeftOracle
from workers.adapters.checks import adapter_digest

pytestmark = pytest.mark.integration

CHAT_ZOO = ROOT / "models" / "chat-zoo"
BASE = "tiny-qwen"
SYSTEM = "You are a helpful support assistant."  # support-chat.yaml's chat.system
PER_ROUTE = 5


@dataclass(frozen=True)
class ChatJob:
    job: dict
    adapter: str | None  # the adapter routing must pick
    expected: str  # the zoo's held-out greedy answer
    conversation: list[dict[str, str]]  # what the chat template renders, system message included


def held_out(model: str) -> list[dict]:
    rows = [json.loads(line) for line in (CHAT_ZOO / "heldout.jsonl").read_text().splitlines()]
    return [row for row in rows if row["model"] == model][:PER_ROUTE]


def chat_jobs() -> list[ChatJob]:
    """Held-out conversations of every model, as `messages` jobs of the two chat pipelines."""
    jobs: list[ChatJob] = []

    def add(task: str, row: dict, adapter: str | None, **extra: str) -> None:
        job = {"job_id": f"{task}-{len(jobs):03d}", "task": task, "messages": row["messages"]}
        conversation = row["messages"]
        if task == "support-chat" and conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": SYSTEM}, *conversation]
        jobs.append(ChatJob(job | extra, adapter, row["expected"], conversation))

    for row in held_out("ticket-label"):
        add("ticket-label", row, "ticket-label")
    for row in held_out("warm-reply"):
        add("support-chat", row, "warm-reply", tenant="acme")
    for row in held_out(BASE):
        add("support-chat", row, None)  # no tenant adapter: the base model
    return jobs


@dataclass
class ChatWorker:
    deployment: Deployment
    worker: subprocess.Popen
    results: TopicWatcher
    status: TopicWatcher

    def serve(self, jobs: list[ChatJob], timeout_s: float = 300) -> dict[str, list[dict]]:
        """Publish `jobs`; every result written for them, once each has one."""
        produce(
            self.deployment.bootstrap,
            [job_record(self.deployment.pipelines[j.job["task"]].input_topic, j.job) for j in jobs],
        )
        ids = {j.job["job_id"] for j in jobs}
        self.results.wait_for(lambda _m: ids <= set(self.by_job()), timeout_s)
        return {job_id: found for job_id, found in self.by_job().items() if job_id in ids}

    def by_job(self) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = defaultdict(list)
        for result in self.results.json_values():
            found[result["job_id"]].append(result)
        return found


@pytest.fixture(scope="module")
def chat_worker(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatWorker]:
    tmp_path = tmp_path_factory.mktemp("chat")
    # The pipelines name their schema relative to themselves (../schemas/): copy it alongside.
    shutil.copytree(CHAT_ZOO / "schemas", tmp_path / "schemas")
    deployment = deploy(kafka_bootstrap, tmp_path, pipelines=CHAT_ZOO / "pipelines")
    results = TopicWatcher(kafka_bootstrap, [p.result_topic for p in deployment.pipelines.values()])
    status = TopicWatcher(kafka_bootstrap, [deployment.status_topic])
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(
        "--idle-exit",
        "600",
        log_path=log_path,
        LORA_WORKERS_ENGINE__MODEL=str(CHAT_ZOO / BASE),
        LORA_WORKERS_CATALOG=str(CHAT_ZOO / "catalog.yaml"),
        LORA_WORKERS_ADAPTERS__ALLOWED_ROOTS=json.dumps(
            [str(CHAT_ZOO), str(deployment.adapter_root)]
        ),
    )
    try:
        wait_for_event(worker, log_path, "partitions_assigned", containing="jobs.")
        yield ChatWorker(deployment, worker, results, status)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
        deployment.kill_workers()
        results.close()
        status.close()


def test_messages_jobs_match_peft_token_for_token_and_are_answered_once(
    chat_worker: ChatWorker,
) -> None:
    jobs = chat_jobs()
    results = chat_worker.serve(jobs)

    assert Counter(len(results[j.job["job_id"]]) for j in jobs) == {1: len(jobs)}
    oracle = PeftOracle(
        CHAT_ZOO / BASE,
        {name: CHAT_ZOO / "adapters" / name for name in ("ticket-label", "warm-reply")},
    )
    schema = json.loads((CHAT_ZOO / "schemas" / "ticket-label.output.schema.json").read_text())
    validator = Draft202012Validator(schema)
    as_expected = 0
    for chat in jobs:
        (result,) = results[chat.job["job_id"]]
        assert result["status"] == "ok", result
        assert (result["adapter"] and result["adapter"]["name"]) == chat.adapter
        # The reference renders the model's own chat template, as vLLM's LLM.chat does.
        prompt = oracle.tokenizer.apply_chat_template(
            chat.conversation, tokenize=False, add_generation_prompt=True
        )
        sampling = chat_worker.deployment.pipelines[chat.job["task"]].sampling
        want = oracle.generate(chat.adapter, prompt, sampling.max_tokens)
        assert result["raw_output"] == want.text, (chat.adapter, chat.job)
        assert result["usage"]["completion_tokens"] == want.token_count, (chat.adapter, chat.job)
        assert result["usage"]["prompt_tokens"] == len(oracle.tokenizer(prompt)["input_ids"])
        if chat.job["task"] == "ticket-label":
            assert list(validator.iter_errors(result["output"])) == []
        as_expected += result["raw_output"] == chat.expected
    # The models do what they were trained to (the system message only some rows carried
    # may move an answer, PEFT's too).
    assert as_expected >= 0.9 * len(jobs)


def test_an_adapter_of_the_first_zoo_is_refused_as_another_base(
    chat_worker: ChatWorker,
) -> None:
    # The first zoo's classifier (tiny-llama), announced as a new version of a chat adapter.
    foreign = chat_worker.deployment.adapter_root / "classifier"
    shutil.copytree(ROOT / "models" / "adapters" / "classifier", foreign)
    update = {
        "name": "ticket-label",
        "base_model": BASE,
        "versions": [{"version": "2", "path": str(foreign), "sha256": adapter_digest(foreign)}],
    }
    produce(
        chat_worker.deployment.bootstrap,
        [(chat_worker.deployment.updates_topic, b"ticket-label", json.dumps(update).encode(), [])],
    )

    def rejected(_messages: list) -> list[dict]:
        return [
            s
            for s in chat_worker.status.json_values()
            if s["name"] == "ticket-label" and s["version"] == "2" and s["state"] == "rejected"
        ]

    chat_worker.status.wait_for(lambda m: bool(rejected(m)), timeout_s=120)
    (status,) = rejected([])
    assert status["code"] == "base_model_mismatch", status

    # Version 1 keeps serving, right, on the same worker.
    jobs = [j for j in chat_jobs() if j.job["task"] == "ticket-label"][:3]
    jobs = [replace(j, job=j.job | {"job_id": f"after-{j.job['job_id']}"}) for j in jobs]
    results = chat_worker.serve(jobs)
    for chat in jobs:
        (result,) = results[chat.job["job_id"]]
        assert result["adapter"]["version"] == "1"
        assert result["raw_output"] == chat.expected
    assert chat_worker.worker.poll() is None
