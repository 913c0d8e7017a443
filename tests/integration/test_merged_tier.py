"""The merged tier on a real vLLM engine: bulk runs whose dominant adapter is served merged into
the base weights of the run's one engine, in place, checked against the LoRA path's answers
(vLLM's, from a `--merge never` run of the same jobs), a planner that merges the dominant adapter
and not a rare one, a deliberately wrong merge that the agreement check sends back to LoRA, and a
Kafka worker dedicated to one adapter that switches its merged engine to a new version
mid-stream."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import read_dataset
from tests.integration.harness import (
    ROOT,
    TopicWatcher,
    deploy,
    job_record,
    load_zoo_generators,
    produce,
    wait_for_event,
)
from tests.integration.oracle import PeftOracle
from workers.adapters.checks import adapter_digest

pytestmark = pytest.mark.integration


def classify_jobs(count: int, seed: int) -> list[dict]:
    zoo = load_zoo_generators()
    rng = random.Random(seed)
    return [
        {"job_id": f"c-{i:04d}", "task": "classify", "input": zoo.make_message(rng)[0]}
        for i in range(count)
    ]


def write_jobs(path: Path, jobs: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs) + "".join(extra_lines))
    return path


def bulk(
    jobs_file: Path,
    output: Path,
    mode: str,
    cache: Path,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """One `lora-workers bulk` command; its --summary-json (and its log in `log`)."""
    summary = output.with_suffix(".summary.json")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "workers", "bulk", "--merge", mode),
            *("--input", str(jobs_file), "--output", str(output)),
            *("--summary-json", str(summary)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "LORA_WORKERS_MERGE__CACHE_DIR": str(cache), **(env or {})},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if log is not None:
        log.write_text(done.stderr)
    return json.loads(summary.read_text())


def rows_by_job(output: Path) -> dict[str, dict]:
    rows = read_dataset(output).to_pylist()
    by_job = {row["job_id"]: row for row in rows}
    assert len(by_job) == len(rows), "a job was written twice"
    return by_job


def test_merged_answers_match_the_lora_paths(tmp_path: Path) -> None:
    jobs = classify_jobs(300, seed=5)
    jobs_file = write_jobs(tmp_path / "classify.jsonl", jobs)
    cache = tmp_path / "merged-cache"
    lora_summary = bulk(jobs_file, tmp_path / "lora", "never", cache)
    merged_summary = bulk(jobs_file, tmp_path / "merged", "always", cache)

    assert lora_summary["plan"]["merged"] == []
    assert merged_summary["plan"]["merged"] == ["classifier"]
    # The LoRA phase comes first, only to answer the agreement check's probes; then the same
    # engine merges the classifier in place: one engine start in the run.
    probes, phase = merged_summary["phases"]
    assert (probes["served_by"], probes["jobs"], probes["probes_for"]) == (
        "lora",
        0,
        ["classifier@1"],
    )
    assert probes["engine_start_s"] > 0
    assert phase["served_by"] == "merged" and phase["fallback"] is None
    assert phase["engine_start_s"] == 0
    assert 0 < phase["merge_s"] < 5 and 0 < phase["unmerge_s"] < 5
    assert phase["agreement"]["jobs"] == 32  # 1% of 300 is fewer than the minimum
    assert phase["agreement"]["identical_text"] >= 0.97

    lora, merged = rows_by_job(tmp_path / "lora"), rows_by_job(tmp_path / "merged")
    assert set(lora) == set(merged) == {job["job_id"] for job in jobs}
    assert {row["served_by"] for row in lora.values()} == {"lora"}
    assert {row["served_by"] for row in merged.values()} == {"merged"}
    for job_id, row in merged.items():
        assert (row["adapter_name"], row["adapter_version"]) == ("classifier", "1")
        assert row["adapter_sha256"] == lora[job_id]["adapter_sha256"]
    same_text = sum(merged[j]["raw_output"] == lora[j]["raw_output"] for j in lora)
    same_output = sum(
        json.loads(merged[j]["output_json"]) == json.loads(lora[j]["output_json"]) for j in lora
    )
    assert same_text / len(lora) >= 0.97, f"{same_text} of {len(lora)} identical"
    assert same_output / len(lora) >= 0.99, f"{same_output} of {len(lora)} identical"
    assert all(row["status"] == "ok" for row in merged.values())
    # The planner's costs now know the switch's measured time.
    assert 0 < json.loads((cache / "costs.json").read_text())["switch_s"] < 5


def test_auto_merges_the_dominant_adapter_and_serves_the_rest_on_lora(tmp_path: Path) -> None:
    zoo = load_zoo_generators()
    rng = random.Random(8)
    summaries = [
        {"job_id": f"s-{i}", "task": "summarize", "input": zoo.make_report(rng)} for i in range(10)
    ]
    base = [
        {"job_id": f"b-{i}", "task": "reply", "input": zoo.make_message(rng)[0]} for i in range(4)
    ]
    jobs = classify_jobs(400, seed=9) + summaries + base
    random.Random(1).shuffle(jobs)
    jobs_file = write_jobs(
        tmp_path / "nightly.jsonl",
        jobs,
        ("not a job\n", json.dumps({"job_id": "x", "task": "translate", "input": "hi"}) + "\n"),
    )
    cache = tmp_path / "merged-cache"
    cache.mkdir()
    # Costs as a slow machine would measure them: merging 400 classify jobs pays (4.5 s on
    # LoRA against 1.05 s of switch and check plus 1.1 s merged), merging 10 summaries does not
    # (0.5 s on LoRA).
    stored = {
        "engine_start_s": 1.0,
        "lora_tokens_per_s": 1000.0,
        "merged_tokens_per_s": 4000.0,
        "switch_s": 0.05,
        "check_s": 1.0,
        "budget_fill": {"classifier": 0.35, "summarizer": 0.8, "base": 0.5},
    }
    (cache / "costs.json").write_text(json.dumps(stored))

    summary = bulk(jobs_file, tmp_path / "out", "auto", cache)

    assert summary["plan"]["merged"] == ["classifier"]
    lora_phase, merged_phase = summary["phases"]
    assert (merged_phase["served_by"], merged_phase["adapters"]) == ("merged", ["classifier@1"])
    assert merged_phase["fallback"] is None and merged_phase["agreement"]["jobs"] == 32
    assert lora_phase["served_by"] == "lora"
    assert set(lora_phase["adapters"]) == {"summarizer@1", "base"}
    assert lora_phase["probes_for"] == ["classifier@1"]
    rows = rows_by_job(tmp_path / "out")
    assert len(rows) == len(jobs) + 2  # the two bad rows are error rows, written once
    served = {job_id: row["served_by"] for job_id, row in rows.items()}
    assert {served[j["job_id"]] for j in jobs if j["task"] == "classify"} == {"merged"}
    assert {served[j["job_id"]] for j in summaries} == {"lora"}
    assert {served[j["job_id"]] for j in base} == {"base"}
    assert {rows["x"]["error_code"], rows["row-414"]["error_code"]} == {
        "unknown_task",
        "invalid_json",
    }
    # The run measured its own costs and stored them for the next plan.
    measured = json.loads((cache / "costs.json").read_text())
    assert measured["merged_tokens_per_s"] != stored["merged_tokens_per_s"]
    assert measured["lora_tokens_per_s"] != stored["lora_tokens_per_s"]


def test_a_deliberately_wrong_merge_falls_back_to_lora_and_says_so(tmp_path: Path) -> None:
    # Fault injection: the engine merges the classifier's deltas four times over.
    jobs = classify_jobs(12, seed=21)
    log = tmp_path / "bulk.log"
    summary = bulk(
        write_jobs(tmp_path / "few.jsonl", jobs),
        tmp_path / "out",
        "always",
        tmp_path / "merged-cache",
        log,
        env={"LORA_WORKERS_ENGINE__FAULT_INJECTION_MERGE_SCALE": "4"},
    )

    probes, merged, fallback = summary["phases"]
    assert probes["served_by"] == "lora" and probes["probes_for"] == ["classifier@1"]
    assert merged["served_by"] == "merged" and merged["agreement"]["jobs"] == 12
    assert merged["fallback"].startswith("identical text"), merged
    assert merged["unmerge_s"] > 0  # back to LoRA on the same engine
    assert (fallback["served_by"], fallback["adapters"], fallback["jobs"]) == (
        "lora",
        ["classifier@1"],
        12,
    )
    assert fallback["engine_start_s"] == 0
    rows = rows_by_job(tmp_path / "out")
    assert set(rows) == {job["job_id"] for job in jobs}
    assert {row["served_by"] for row in rows.values()} == {"lora"}
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert '"merged_adapter_fallback"' in log.read_text()


def test_a_worker_dedicated_to_one_adapter_switches_versions_mid_stream(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    deployment = deploy(kafka_bootstrap, tmp_path)
    # With every shipped pipeline, some jobs would go to other adapters: refused at start-up.
    refused = deployment.run_worker(
        "--max-jobs",
        "1",
        log_path=tmp_path / "refused.log",
        timeout=120,
        settings={"LORA_WORKERS_MERGE__DEDICATED_ADAPTER": "classifier"},
    )
    assert refused != 0
    assert "routes jobs to" in (tmp_path / "refused.log").read_text()
    for other in ("reply.yaml", "summarize.yaml"):
        (deployment.pipelines_dir / other).unlink()
    topic = deployment.pipelines["classify"].input_topic
    results = TopicWatcher(kafka_bootstrap, [deployment.pipelines["classify"].result_topic])
    status = TopicWatcher(kafka_bootstrap, [deployment.status_topic])
    log_path = tmp_path / "worker.log"
    worker = deployment.start_worker(
        "--idle-exit",
        "600",
        log_path=log_path,
        LORA_WORKERS_MERGE__DEDICATED_ADAPTER="classifier",
    )
    try:
        wait_for_event(worker, log_path, "adapter_updates_caught_up")
        jobs = classify_jobs(240, seed=13)
        before, during, after = jobs[:80], jobs[80:160], jobs[160:]
        produce(kafka_bootstrap, [job_record(topic, job) for job in before])
        # Version 2: the classifier at half strength (lora_alpha halved), so some answers
        # differ from version 1's and each version's own weights tell them apart.
        v2 = deployment.adapter_root / "classifier-v2"
        shutil.copytree(ROOT / "models" / "adapters" / "classifier", v2)
        config = json.loads((v2 / "adapter_config.json").read_text())
        config["lora_alpha"] = config["lora_alpha"] / 2
        (v2 / "adapter_config.json").write_text(json.dumps(config))
        published = deployment.cli(
            "adapters", "publish", "classifier", "--version", "2", "--path", str(v2)
        )
        assert published.returncode == 0, published.stderr
        produce(kafka_bootstrap, [job_record(topic, job) for job in during])

        def serving_v2(_messages: list) -> bool:
            return any(
                (s["name"], s["version"], s["state"]) == ("classifier", "2", "serving")
                for s in status.json_values()
            )

        status.wait_for(serving_v2, timeout_s=300)
        produce(kafka_bootstrap, [job_record(topic, job) for job in after])
        ids = {job["job_id"] for job in jobs}

        def all_answered(_messages: list) -> bool:
            return ids <= {r["job_id"] for r in results.json_values()}

        results.wait_for(all_answered, timeout_s=600)
        answers: dict[str, list[dict]] = {}
        for result in results.json_values():
            answers.setdefault(result["job_id"], []).append(result)
        assert {i for i in ids if len(answers[i]) != 1} == set()  # none lost, none twice
        answered = {i: answers[i][0] for i in ids}
        assert {r["served_by"] for r in answered.values()} == {"merged"}
        assert {r["status"] for r in answered.values()} == {"ok"}
        (switch,) = [
            s["at_ms"]
            for s in status.json_values()
            if (s["name"], s["version"], s["state"]) == ("classifier", "2", "serving")
        ]
        for result in answered.values():
            routed_after = result["timings"]["received_at_ms"] > switch
            assert result["adapter"]["version"] == ("2" if routed_after else "1"), result
        assert {answered[j["job_id"]]["adapter"]["version"] for j in after} == {"2"}
        assert answered[after[0]["job_id"]]["adapter"]["sha256"] == adapter_digest(v2)
        # Each version's answers are its own weights' (PEFT on the CPU, greedy): the merged
        # engine switched, it did not keep serving version 1 under version 2's name.
        oracle = PeftOracle(
            ROOT / "models" / "tiny-llama",
            {"1": ROOT / "models" / "adapters" / "classifier", "2": v2},
        )
        pipeline = deployment.pipelines["classify"]
        inputs = {job["job_id"]: job["input"] for job in jobs}
        agree: dict[str, list[bool]] = {"1": [], "2": []}
        distinguishing = 0
        for job_id, result in sorted(answered.items()):
            version = result["adapter"]["version"]
            if len(agree[version]) >= 40:
                continue
            prompt = pipeline.render_prompt(inputs[job_id])
            mine = oracle.generate(version, prompt, 32).text
            theirs = oracle.generate("2" if version == "1" else "1", prompt, 32).text
            agree[version].append(result["raw_output"] == mine)
            if mine != theirs:
                distinguishing += 1
                assert result["raw_output"] != theirs, (job_id, version)
        assert distinguishing > 0
        for version, matches in agree.items():
            assert sum(matches) >= 0.9 * len(matches), (version, matches)
        log_text = log_path.read_text()
        assert log_text.count('"merged_engine_switched"') == 1
        # Each version's checkpoint was checked against a LoRA engine: at start, at the switch.
        checks = [line for line in log_text.splitlines() if '"merged_adapter_agreement"' in line]
        assert [json.loads(line)["fallback"] for line in checks] == [None, None], checks
        assert worker.poll() is None
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
        results.close()
        status.close()
