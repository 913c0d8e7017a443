"""OpenAI batch files on a real vLLM engine (the chat zoo): chat requests, a JSON-schema
request, an unknown model and malformed lines give one OpenAI output line per input line; a run
killed with -9 midway and started again writes each custom_id once; and the same file through
`vllm run_batch` gives the same greedy outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator

from tests.integration.harness import ROOT
from tests.integration.processes import kill_9_leaving_no_orphans

pytestmark = pytest.mark.integration

CHAT_ZOO = ROOT / "models" / "chat-zoo"
BASE = "tiny-qwen"
ADAPTERS = ("ticket-label", "warm-reply")
MAX_MODEL_LEN = 512
LABEL_SCHEMA = json.loads((CHAT_ZOO / "schemas" / "ticket-label.output.schema.json").read_text())
FILLERS = 96  # base-model completions of staggered lengths, so a run can be caught midway


def environment() -> dict[str, str]:
    """The CLI on the chat zoo, the same context length as the run_batch reference."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("LORA_WORKERS_")}
    return kept | {
        "LORA_WORKERS_ENGINE__MODEL": str(CHAT_ZOO / BASE),
        "LORA_WORKERS_CATALOG": str(CHAT_ZOO / "catalog.yaml"),
        "LORA_WORKERS_ADAPTERS__ALLOWED_ROOTS": json.dumps([str(CHAT_ZOO)]),
        "LORA_WORKERS_ENGINE__MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "LORA_WORKERS_ENGINE__DTYPE": "float32",
    }


def held_out(per_model: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (CHAT_ZOO / "heldout.jsonl").read_text().splitlines()]
    picked: list[dict[str, Any]] = []
    for model in (BASE, *ADAPTERS):
        picked += [row for row in rows if row["model"] == model][:per_model]
    return picked


def request(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat_lines(per_model: int) -> tuple[list[str], dict[str, str]]:
    """Greedy chat requests of the held-out conversations, and each one's expected answer."""
    lines, expected = [], {}
    for i, row in enumerate(held_out(per_model)):
        custom_id = f"chat-{i}"
        body = {"model": row["model"], "messages": row["messages"], "max_tokens": 128}
        lines.append(request(custom_id, body | {"temperature": 0}))
        expected[custom_id] = row["expected"]
    return lines, expected


def bulk(source: Path, output: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = ["bulk", "--format", "openai", "--input", str(source), "--output", str(output)]
    return subprocess.Popen(
        [sys.executable, "-m", "workers", *command, *extra],
        cwd=ROOT,
        env=environment(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_openai_file_with_bad_lines_killed_midway_resumes_with_each_custom_id_once(
    tmp_path: Path,
) -> None:
    lines, expected = chat_lines(per_model=2)
    # A ticket-label conversation the chat lines do not have.
    label_row = [row for row in held_out(per_model=3) if row["model"] == "ticket-label"][-1]
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": True},
    }
    lines.append(
        request(
            "schema-1",
            {
                "model": "ticket-label",
                "messages": label_row["messages"],
                "max_tokens": 64,
                "temperature": 0,
                "response_format": schema_format,
            },
        )
    )
    for i in range(FILLERS):
        tokens = 8 * (1 + i % 24)
        body = {"model": BASE, "prompt": f"filler {i}", "temperature": 0}
        lines.append(
            request(
                f"fill-{i}", body | {"max_tokens": tokens, "min_tokens": tokens}, "/v1/completions"
            )
        )
    bad = {
        "not json {": "invalid_json",
        request(
            "unknown-model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        ): "unknown_model",
        request("unknown-url", {"model": BASE, "input": "x"}, "/v1/embeddings"): "unknown_url",
        json.dumps(
            {"custom_id": "no-body", "method": "POST", "url": "/v1/completions"}
        ): "invalid_request",
        request(
            "too-hot", {"model": BASE, "prompt": "x", "temperature": 9}, "/v1/completions"
        ): "invalid_job",
        request(
            "chat-0", {"model": BASE, "messages": [{"role": "user", "content": "again"}]}
        ): "duplicate_custom_id",
    }
    lines += list(bad)
    source = tmp_path / "batch.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    parts = tmp_path / "out.jsonl.parts"

    first = bulk(source, output, tmp_path / "first.log", "--rows-per-file", "2")
    deadline = time.monotonic() + 600
    while not list(parts.rglob("part-*.parquet")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no staging file in 10 minutes"
        time.sleep(0.005)
    kill_9_leaving_no_orphans(first, tmp_path / "first.log")
    assert not output.exists()  # the output is written whole at the end, or not at all
    staged = sum(pq.ParquetFile(p).metadata.num_rows for p in parts.rglob("part-*.parquet"))
    servable = len(lines) - len(bad)
    assert 0 < staged < servable

    second = bulk(source, output, tmp_path / "second.log", "--rows-per-file", "2")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    skipped = re.search(
        r"skipped \(already written\)\D*([\d,]+)", (tmp_path / "second.log").read_text()
    )
    assert skipped is not None and int(skipped.group(1).replace(",", "")) == staged

    out = [json.loads(text) for text in output.read_text().splitlines()]
    assert len(out) == len(lines)  # one output line per input line, in input order
    ids = [entry["custom_id"] for entry in out if entry["response"] is not None]
    assert len(ids) == len(set(ids)) == servable  # each custom_id answered once
    staged_ids = [
        job_id
        for path in parts.rglob("part-*.parquet")
        for job_id in pq.read_table(path, columns=["job_id"]).column("job_id").to_pylist()
    ]
    assert sorted(staged_ids) == sorted(ids)  # no duplicate left in staging either
    for entry, text in zip(out, lines, strict=True):
        assert set(entry) == {"id", "custom_id", "response", "error"}
        if text in bad:
            assert entry["response"] is None and entry["error"]["code"] == bad[text], entry
            continue
        assert entry["error"] is None, entry
        response = entry["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        (choice,) = body["choices"]
        if entry["custom_id"].startswith("fill-"):
            assert body["object"] == "text_completion" and choice["finish_reason"] == "length"
            continue
        assert body["object"] == "chat.completion"
        assert choice["message"]["role"] == "assistant"
        content = choice["message"]["content"]
        if entry["custom_id"] == "schema-1":
            Draft202012Validator(LABEL_SCHEMA).validate(json.loads(content))
            assert content == label_row["expected"]
        else:
            assert content == expected[entry["custom_id"]], entry
    assert [e["response"]["body"]["model"] for e in out[:6]] == [BASE] * 2 + [
        "ticket-label"
    ] * 2 + ["warm-reply"] * 2


def test_the_same_file_through_vllm_run_batch_gives_the_same_greedy_outputs(tmp_path: Path) -> None:
    lines, _ = chat_lines(per_model=2)
    # vLLM 0.32's run_batch serves /v1/chat/completions but not /v1/completions: chat lines only.
    source = tmp_path / "batch.jsonl"
    source.write_text("\n".join(lines) + "\n")

    ours = tmp_path / "ours.jsonl"
    run = bulk(source, ours, tmp_path / "ours.log")
    assert run.wait(timeout=600) == 0, (tmp_path / "ours.log").read_text()[-3000:]

    reference = tmp_path / "vllm.jsonl"
    modules = [f"{name}={CHAT_ZOO / 'adapters' / name}" for name in ADAPTERS]
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(source),
        "-o",
        str(reference),
        "--model",
        str(CHAT_ZOO / BASE),
        "--served-model-name",
        BASE,
        "--enable-lora",
        "--lora-modules",
        *modules,
        "--max-lora-rank",
        "16",
        "--max-loras",
        "5",  # as the worker's engine (run_batch's default, 1, is not what bulk runs with)
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(2**30),
    ]
    log = tmp_path / "vllm.log"
    with log.open("w") as sink:
        # Its start-up (about 30-60 s here) bounded; a hung start fails the test, not CI.
        done = subprocess.run(
            command, stdout=sink, stderr=subprocess.STDOUT, timeout=600, check=False
        )
    assert done.returncode == 0, log.read_text()[-3000:]

    def answers(path: Path) -> dict[str, str]:
        found = {}
        for text in path.read_text().splitlines():
            entry = json.loads(text)
            (choice,) = entry["response"]["body"]["choices"]
            found[entry["custom_id"]] = (
                choice["message"]["content"] if "message" in choice else choice["text"]
            )
        return found

    expected = answers(reference)
    assert len(expected) == len(lines)
    assert answers(ours) == expected
