import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workers.bulk.jobfiles import read_rows
from workers.core.prepare import decode_job

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "refund?"}]


def test_parquet_and_jsonl_job_files_carry_input_and_messages_jobs(tmp_path: Path) -> None:
    rows = [
        {"job_id": "1", "task": "assist", "input": "hi", "messages": None, "params": None},
        {
            "job_id": "2",
            "task": "assist",
            "input": None,
            "messages": CHAT,
            "params": {"top_p": 0.9, "stop": ["END"]},
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "jobs.parquet")
    lines = [{k: v for k, v in row.items() if v is not None} for row in rows]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name in ("jobs.parquet", "jobs.jsonl"):
        first, second = [decode_job(raw) for raw in read_rows(tmp_path / name)]
        assert (first.input, first.messages) == ("hi", None)
        assert second.input is None and second.messages is not None
        assert [m.model_dump() for m in second.messages] == CHAT
        assert second.params is not None
        assert (second.params.top_p, second.params.stop) == (0.9, ["END"])
