"""Adapter lifecycle on a running worker (real Kafka, real vLLM): hot reload mid-stream,
canary split, bad updates rejected while the previous version keeps serving.

New versions are copies of other zoo adapters, so the new version's greedy output differs
visibly from the old one and the PEFT oracle knows exactly which weights each version has.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    wait_for_event,
)
from tests.integration.oracle import PeftOracle
from workers.adapters.checks import adapter_digest
from workers.kafka.topics import TopicSpec, create_topics

pytestmark = pytest.mark.integration

ZOO = ROOT / "models"
ADAPTER_TENANTS = {"customer-tone": "acme", "partner-tone": "globex"}
# Which zoo weights each served version has: the oracle's key.
WEIGHTS = {
    ("classifier", "1"): "classifier",
    ("summarizer", "1"): "summarizer",
    ("customer-tone", "1"): "customer-tone",
    ("customer-tone", "2"): "partner-tone",
    ("partner-tone", "1"): "partner-tone",
    ("partner-tone", "2"): "customer-tone",
}


@dataclass
class Traffic:
    deployment: Deployment
    watcher: TopicWatcher
    jobs: dict[str, dict] = field(default_factory=dict)
    sent: int = 0

    def send(self, phase: str, per_route: int, routes: tuple[str, ...]) -> list[str]:
        records, ids = [], []
        for route in routes:
            for _ in range(per_route):
                job = self._job(phase, route)
                self.jobs[job["job_id"]] = job
                ids.append(job["job_id"])
                records.append(job_record(self.deployment.pipelines[job["task"]].input_topic, job))
        produce(self.deployment.bootstrap, records)
        return ids

    def resend(self, job_ids: list[str]) -> None:
        produce(
            self.deployment.bootstrap,
            [
                job_record(
                    self.deployment.pipelines[self.jobs[i]["task"]].input_topic, self.jobs[i]
                )
                for i in job_ids
            ],
        )

    def _job(self, phase: str, route: str) -> dict:
        self.sent += 1
        job_id = f"{phase}-{route}-{self.sent:05d}"
        # Inputs like each adapter's training data: constrained decoding only changes outputs
        # that would break the task's schema, so in-distribution inputs keep the PEFT oracle exact.
        zoo = load_zoo_generators()
        rng = random.Random(self.sent)
        text = zoo.make_report(rng) if route == "summarizer" else zoo.make_message(rng)[0]
        if route in ADAPTER_TENANTS:
            return {
                "job_id": job_id,
                "task": "reply",
                "input": text,
                "tenant": ADAPTER_TENANTS[route],
            }
        if route == "base":
            return {"job_id": job_id, "task": "reply", "input": text}
        task = {"classifier": "classify", "summarizer": "summarize"}[route]
        return {"job_id": job_id, "task": task, "input": text}

    def results(self) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = defaultdict(list)
        for result in self.watcher.json_values():
            if "job_id" in result:
                found[result["job_id"]].append(result)
        return found

    def wait_for_results(self, job_ids: list[str], copies: int = 1, timeout_s: float = 300) -> None:
        def done(_messages: list) -> bool:
            found = self.results()
            return all(len(found.get(i, [])) >= copies for i in job_ids)

        self.watcher.wait_for(done, timeout_s)


@dataclass
class Lifecycle:
    deployment: Deployment
    traffic: Traffic
    status: TopicWatcher
    worker: subprocess.Popen
    log_path: Path

    def publish_version(self, name: str, version: str, weights_of: str, *extra: str) -> None:
        target = self.deployment.adapter_root / f"{name}-v{version}"
        shutil.copytree(ZOO / "adapters" / weights_of, target)
        published = self.deployment.cli(
            "adapters", "publish", name, "--version", version, "--path", str(target), *extra
        )
        assert published.returncode == 0, published.stderr

    def wait_for_status(
        self,
        name: str,
        version: str | None,
        state: str,
        code: str | None = None,
        occurrences: int = 1,
    ) -> None:
        def seen(_messages: list) -> bool:
            matching = [s for s in self.statuses() if self._matches(s, name, version, state, code)]
            return len(matching) >= occurrences

        self.status.wait_for(seen, timeout_s=120)

    def statuses(self) -> list[dict]:
        return self.status.json_values()

    @staticmethod
    def _matches(status: dict, name: str, version: str | None, state: str, code: str | None):
        return (
            status["name"] == name
            and (version is None or status["version"] == version)
            and status["state"] == state
            and (code is None or status["code"] == code)
        )


@pytest.fixture(scope="module")
def lifecycle(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lifecycle]:
    tmp_path = tmp_path_factory.mktemp("lifecycle")
    deployment = deploy(kafka_bootstrap, tmp_path)
    results = TopicWatcher(kafka_bootstrap, [p.result_topic for p in deployment.pipelines.values()])
    status = TopicWatcher(kafka_bootstrap, [deployment.status_topic])
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker("--idle-exit", "600", log_path=log_path)
    state = Lifecycle(deployment, Traffic(deployment, results), status, worker, log_path)
    try:
        for name in ("classifier", "customer-tone", "partner-tone", "summarizer"):
            state.wait_for_status(name, "1", "serving")
        # Consuming, not only started: the tests publish jobs, then an update right after, and
        # mean the jobs to be routed first.
        wait_for_event(worker, log_path, "partitions_assigned", containing="jobs.")
        yield state
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
        results.close()
        status.close()


ROUTES = ("classifier", "customer-tone", "partner-tone", "summarizer", "base")


def served_version(result: dict) -> str | None:
    return None if result["adapter"] is None else result["adapter"]["version"]


def assert_matches_oracle(traffic: Traffic, job_ids: list[str], per_version: int = 4) -> int:
    """Each result's greedy output equals PEFT on the weights of the version it names."""
    oracle = PeftOracle(
        ZOO / "tiny-llama",
        {name: ZOO / "adapters" / name for name in set(WEIGHTS.values())},
    )
    results = traffic.results()
    by_version: dict[tuple, list[str]] = defaultdict(list)
    for job_id in job_ids:
        result = results[job_id][0]
        adapter = result["adapter"]
        key = None if adapter is None else (adapter["name"], adapter["version"])
        by_version[key].append(job_id)
    checked = 0
    for key, ids in by_version.items():
        for job_id in ids[:per_version]:
            job = traffic.jobs[job_id]
            pipeline = traffic.deployment.pipelines[job["task"]]
            want = oracle.generate(
                None if key is None else WEIGHTS[key],
                pipeline.render_prompt(job["input"]),
                pipeline.sampling.max_tokens,
            )
            assert results[job_id][0]["raw_output"] == want.text, (key, job_id)
            checked += 1
    return checked


def test_hot_reload_mid_stream(lifecycle: Lifecycle) -> None:
    traffic = lifecycle.traffic
    before = traffic.send("before", 12, ROUTES)
    # The update lands while `before` is still being served: mid-stream.
    lifecycle.publish_version("customer-tone", "2", weights_of="partner-tone")
    during = traffic.send("during", 12, ROUTES)
    lifecycle.wait_for_status("customer-tone", "2", "serving")
    after = traffic.send("after", 12, ROUTES)
    traffic.wait_for_results(before + during + after)

    results = traffic.results()
    every = before + during + after
    assert [i for i in every if len(results[i]) != 1] == []  # none lost, none doubled
    assert all(results[i][0]["status"] != "error" for i in every)
    v2_digest = adapter_digest(lifecycle.deployment.adapter_root / "customer-tone-v2")
    for job_id in after:
        if "customer-tone" in job_id:
            assert results[job_id][0]["adapter"] == {
                "name": "customer-tone",
                "version": "2",
                "sha256": v2_digest,
            }
    # Routing happens when a job is consumed: a job consumed before the switch keeps v1 even
    # when it is generated after it; one consumed after the switch gets v2.
    (switch,) = [
        s["at_ms"]
        for s in lifecycle.statuses()
        if (s["name"], s["version"], s["state"]) == ("customer-tone", "2", "serving")
    ]
    tone = [results[i][0] for i in every if "customer-tone" in i]
    routed_before = [r for r in tone if r["timings"]["received_at_ms"] < switch]
    routed_after = [r for r in tone if r["timings"]["received_at_ms"] > switch]
    assert routed_before and routed_after
    assert {served_version(r) for r in routed_before} == {"1"}
    assert {served_version(r) for r in routed_after} == {"2"}
    generated_after_switch = [r for r in routed_before if r["timings"]["completed_at_ms"] > switch]
    print(f"\n{len(generated_after_switch)} jobs routed before the switch finished after it on v1")
    assert assert_matches_oracle(traffic, every) >= 6 * 3
    # The old version leaves the engine once nothing routed to it is waiting.
    lifecycle.wait_for_status("customer-tone", "1", "retired")
    assert lifecycle.worker.poll() is None


def test_announcing_the_old_version_again_rolls_back(lifecycle: Lifecycle) -> None:
    traffic = lifecycle.traffic
    lifecycle.publish_version("customer-tone", "1", weights_of="customer-tone")
    lifecycle.wait_for_status("customer-tone", "1", "serving", occurrences=2)  # start-up, now
    jobs = traffic.send("rollback", 8, ("customer-tone",))
    traffic.wait_for_results(jobs)
    results = traffic.results()
    assert {served_version(results[i][0]) for i in jobs} == {"1"}
    assert assert_matches_oracle(traffic, jobs) >= 4
    lifecycle.wait_for_status("customer-tone", "2", "retired")


def test_a_reload_while_the_old_versions_requests_are_running(lifecycle: Lifecycle) -> None:
    traffic = lifecycle.traffic
    # A backlog of v1 jobs keeps the engine busy with v1 requests when v3 arrives: v3 is
    # published once the backlog's first requests are in the engine (the engine serves about
    # 190 of them a second here; publishing takes a CLI start, 1-2 s).
    busy_periods = lifecycle.log_path.read_text(errors="replace").count('"engine_running"')
    backlog = traffic.send("backlog", 1000, ("customer-tone",))
    wait_for_event(lifecycle.worker, lifecycle.log_path, "engine_running", busy_periods + 1)
    lifecycle.publish_version("customer-tone", "3", weights_of="partner-tone")
    lifecycle.wait_for_status("customer-tone", "3", "serving")
    after = traffic.send("after-v3", 8, ("customer-tone",))
    traffic.wait_for_results(backlog + after)
    results = traffic.results()
    every = [results[i][0] for i in backlog + after]
    assert [i for i in backlog + after if len(results[i]) != 1] == []
    (switch,) = [
        s["at_ms"]
        for s in lifecycle.statuses()
        if (s["name"], s["version"], s["state"]) == ("customer-tone", "3", "serving")
    ]
    routed_before = [r for r in every if r["timings"]["received_at_ms"] < switch]
    routed_after = [r for r in every if r["timings"]["received_at_ms"] > switch]
    assert {served_version(r) for r in routed_before} == {"1"}
    assert {served_version(r) for r in routed_after} == {"3"}
    still_running = [r for r in routed_before if r["timings"]["completed_at_ms"] > switch]
    assert still_running, "the backlog was done before the switch; the test proves nothing"
    print(f"\n{len(still_running)} v1 jobs finished after v3 took over, on v1")
    # v1 leaves the engine only once its last request has finished (it retired once already,
    # in the hot-reload test, and came back with the rollback).
    lifecycle.wait_for_status("customer-tone", "1", "retired", occurrences=2)
    retired = [
        s["at_ms"]
        for s in lifecycle.statuses()
        if (s["name"], s["version"], s["state"]) == ("customer-tone", "1", "retired")
    ]
    assert retired[-1] >= max(r["timings"]["completed_at_ms"] for r in routed_before)


def test_canary_weight_splits_traffic_deterministically(lifecycle: Lifecycle) -> None:
    traffic = lifecycle.traffic
    lifecycle.publish_version("partner-tone", "2", "customer-tone", "--weight", "0.3")
    lifecycle.wait_for_status("partner-tone", "2", "serving")
    canary = traffic.send("canary", 300, ("partner-tone",))
    traffic.wait_for_results(canary)
    traffic.resend(canary)  # a retried job must land on the same version
    traffic.wait_for_results(canary, copies=2)

    results = traffic.results()
    first = {i: served_version(results[i][0]) for i in canary}
    share = sum(v == "2" for v in first.values()) / len(canary)
    assert 0.22 <= share <= 0.38, share
    assert all(served_version(results[i][1]) == first[i] for i in canary)
    assert assert_matches_oracle(traffic, canary) >= 8


def save_other_base(directory: Path) -> None:
    """A different tiny Llama (other widths): adapters trained on it cannot fit ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=64,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def save_random_lora(base_dir: Path, out: Path, rank: int, claimed_base: str | None = None):
    """A real PEFT adapter with random weights, trained on nothing: enough for load checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(rank)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(out, save_embedding_layers=False)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = claimed_base or base_dir.name
    config_path.write_text(json.dumps(config))


@dataclass(frozen=True)
class BadUpdate:
    code: str
    version: str
    path: str
    sha256: str | None = None  # None: the real digest of path
    base_model: str = "tiny-llama"


def test_bad_updates_are_rejected_and_the_previous_version_keeps_serving(
    lifecycle: Lifecycle, tmp_path: Path
) -> None:
    deployment = lifecycle.deployment
    root = deployment.adapter_root
    good = ZOO / "adapters" / "summarizer"
    save_random_lora(ZOO / "tiny-llama", root / "rank16", rank=16)
    other_base = tmp_path / "other-llama"
    save_other_base(other_base)
    save_random_lora(other_base, root / "foreign", rank=8)
    # Its config claims our base, but its weights' shapes are another model's: the identity
    # check refuses it before the engine sees it.
    save_random_lora(other_base, root / "disguised", rank=8, claimed_base="tiny-llama")
    # Intact headers, data cut short: only loading it can tell.
    shutil.copytree(good, root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    shutil.copytree(good, tmp_path / "outside")
    (root / "escape").symlink_to(tmp_path / "outside")
    # Written straight to the topic, past `adapters publish`: reading these files once stopped
    # every worker (EngineLoopFailed on the dangling link), and again on each restart.
    shutil.copytree(good, root / "dangling")
    (root / "dangling" / "adapter_config.json").unlink()
    (root / "dangling" / "adapter_config.json").symlink_to(root / "dangling" / "gone.json")
    shutil.copytree(good, root / "config-folder")
    (root / "config-folder" / "adapter_config.json").unlink()
    (root / "config-folder" / "adapter_config.json").mkdir()

    bad = [
        BadUpdate("path_missing", "b1", str(root / "nowhere"), sha256="0" * 64),
        BadUpdate("checksum_mismatch", "b2", str(good), sha256="f" * 64),
        BadUpdate("base_model_mismatch", "b3", str(good), base_model="other-llama"),
        BadUpdate("base_model_mismatch", "b4", str(root / "foreign")),
        BadUpdate("rank_too_large", "b5", str(root / "rank16")),
        BadUpdate("base_model_mismatch", "b8", str(root / "disguised")),
        BadUpdate("load_failed", "b11", str(root / "truncated")),
        BadUpdate("path_outside_roots", "b6", str(tmp_path / "outside")),
        BadUpdate("path_outside_roots", "b7", str(root / "escape")),
        BadUpdate("files_missing", "b9", str(root / "dangling")),
        BadUpdate("files_missing", "b10", str(root / "config-folder")),
    ]
    records = []
    for update in bad:
        path = Path(update.path)
        sha256 = update.sha256 or adapter_digest(path.resolve())
        value = {
            "name": "summarizer",
            "base_model": update.base_model,
            "versions": [{"version": update.version, "path": update.path, "sha256": sha256}],
        }
        records.append((deployment.updates_topic, b"summarizer", json.dumps(value).encode(), []))
    records.append((deployment.updates_topic, b"summarizer", b"{not json", []))
    records.append(
        (deployment.updates_topic, b"summarizer", b'{"name": "summarizer", "versions": []}', [])
    )
    produce(deployment.bootstrap, records)

    for update in bad:
        lifecycle.wait_for_status("summarizer", update.version, "rejected", update.code)
    malformed = [
        s
        for s in lifecycle.statuses()
        if s["name"] == "summarizer" and s["code"] == "malformed_update"
    ]
    assert len(malformed) == 2

    # The previous version still serves, correctly, and the worker never stopped.
    jobs = lifecycle.traffic.send("after-bad", 10, ("summarizer",))
    lifecycle.traffic.wait_for_results(jobs)
    results = lifecycle.traffic.results()
    assert {served_version(results[i][0]) for i in jobs} == {"1"}
    assert assert_matches_oracle(lifecycle.traffic, jobs) >= 4
    assert lifecycle.worker.poll() is None


def test_tenant_allow_list_dead_letters_forbidden_jobs(lifecycle: Lifecycle) -> None:
    deployment, traffic = lifecycle.deployment, lifecycle.traffic
    lifecycle.publish_version("classifier", "1", "classifier", "--tenants", "acme")
    lifecycle.wait_for_status("classifier", "1", "serving", occurrences=2)
    dlq = TopicWatcher(deployment.bootstrap, [deployment.pipelines["classify"].dlq_topic])
    try:
        jobs = {
            tenant: {
                "job_id": f"tenant-{tenant}",
                "task": "classify",
                "tenant": tenant,
                "input": "Hello, this is Ana. I need help with my invoice today.",
            }
            for tenant in ("acme", "globex")
        }
        topic = deployment.pipelines["classify"].input_topic
        produce(deployment.bootstrap, [job_record(topic, job) for job in jobs.values()])
        traffic.jobs.update({job["job_id"]: job for job in jobs.values()})
        traffic.wait_for_results(["tenant-acme"])
        dlq.wait_for(lambda messages: len(messages) >= 1, timeout_s=60)
        (rejected,) = dlq.messages
        headers = dict(rejected.headers())
        assert rejected.key() == b"tenant-globex"
        assert headers["dlq.error.code"] == b"adapter_forbidden"
        assert "tenant-globex" not in traffic.results()
    finally:
        dlq.close()


def hostile_update_records(folder: Path, topic: str) -> list[tuple[str, bytes | None, bytes, list]]:
    """Records a buggy or compromised publisher can write past `adapters publish`: versions
    whose files are a dangling link or a folder, garbage, and a tombstone for no adapter."""
    good = ZOO / "adapters" / "classifier"
    shutil.copytree(good, folder / "dangling")
    (folder / "dangling" / "adapter_config.json").unlink()
    (folder / "dangling" / "adapter_config.json").symlink_to(folder / "gone.json")
    shutil.copytree(good, folder / "config-folder")
    (folder / "config-folder" / "adapter_config.json").unlink()
    (folder / "config-folder" / "adapter_config.json").mkdir()
    records: list[tuple[str, bytes | None, bytes, list]] = []
    for name, version in (("classifier", "dangling"), ("customer-tone", "config-folder")):
        path = folder / version
        value = {
            "name": name,
            "base_model": "tiny-llama",
            "versions": [{"version": version, "path": str(path), "sha256": adapter_digest(path)}],
        }
        records.append((topic, name.encode(), json.dumps(value).encode(), []))
    nested = b'{"name": "partner-tone", "tenants": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    records.append((topic, b"partner-tone", nested, []))
    records.append((topic, b"partner-tone\xff", b'{"name": "\xff\xfe"}', []))
    records.append((topic, b"never-announced", None, []))  # type: ignore[arg-type]
    return records


def test_a_worker_started_after_compaction_serves_the_fleets_last_good_state(
    lifecycle: Lifecycle, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The fleet serves summarizer v2; a bad update (wrong checksum) then becomes the latest
    record for the name. Compaction keeps only that record, so a worker started afterwards
    reads nothing good for summarizer on the updates topic: it must still serve v2."""
    first = lifecycle.deployment
    lifecycle.publish_version("summarizer", "2", weights_of="summarizer")
    lifecycle.wait_for_status("summarizer", "2", "serving")
    bad = {
        "name": "summarizer",
        "base_model": "tiny-llama",
        "versions": [
            {"version": "b9", "path": str(ZOO / "adapters" / "summarizer"), "sha256": "e" * 64}
        ],
        "published_at_ms": int(time.time() * 1000),
    }
    bad_record = (first.updates_topic, b"summarizer", json.dumps(bad).encode(), [])
    produce(kafka_bootstrap, [bad_record])
    lifecycle.wait_for_status("summarizer", "b9", "rejected", "checksum_mismatch")

    # What compaction leaves of the updates topic for this name: the bad record alone. Beside
    # it, records for other names that a start-up once died on, replayed on every restart.
    second = deploy(kafka_bootstrap, tmp_path)
    compacted = f"{first.updates_topic}.compacted"
    create_topics(kafka_bootstrap, [TopicSpec(compacted, 1, {"cleanup.policy": "compact"})], 1)
    hostile = hostile_update_records(first.adapter_root / "late", compacted)
    produce(kafka_bootstrap, [*hostile, (compacted, b"summarizer", bad_record[2], [])])
    jobs = [
        {
            "job_id": f"late-{i}",
            "task": "summarize",
            "input": load_zoo_generators().make_report(random.Random(i)),
        }
        for i in range(6)
    ]
    produce(
        kafka_bootstrap, [job_record(second.pipelines["summarize"].input_topic, j) for j in jobs]
    )
    log_path = tmp_path / "late.log"
    code = second.run_worker(
        "--idle-exit",
        "15",
        log_path=log_path,
        settings={
            "LORA_WORKERS_ADAPTERS__UPDATES_TOPIC": compacted,
            "LORA_WORKERS_ADAPTERS__STATUS_TOPIC": first.status_topic,
            "LORA_WORKERS_ADAPTERS__ALLOWED_ROOTS": json.dumps(
                [str(ROOT / "models"), str(first.adapter_root)]
            ),
        },
    )
    log = log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert '"event": "adapters_restored_from_status"' in log
    rejected = [json.loads(line) for line in log.splitlines() if '"adapter_rejected"' in line]
    assert {(r["adapter"], r["code"]) for r in rejected} >= {
        ("classifier", "files_missing"),
        ("customer-tone", "files_missing"),
        ("partner-tone", "malformed_update"),
    }
    results = [
        json.loads(m.value()) for m in second.read([second.pipelines["summarize"].result_topic])
    ]
    assert sorted(r["job_id"] for r in results) == sorted(j["job_id"] for j in jobs)
    v2 = adapter_digest(first.adapter_root / "summarizer-v2")
    assert {(r["adapter"]["version"], r["adapter"]["sha256"]) for r in results} == {("2", v2)}


def test_worker_stops_cleanly_on_sigterm(lifecycle: Lifecycle) -> None:
    lifecycle.worker.send_signal(signal.SIGTERM)
    assert lifecycle.worker.wait(timeout=120) == 0, lifecycle.log_path.read_text()[-3000:]
