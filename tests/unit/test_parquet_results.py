"""File boundaries of the Kafka → Parquet stage (plain data, a temp directory)."""

from pathlib import Path

from tests.datasets import read_dataset
from tests.unit.results import make_result
from workers.core.config import ParquetSinkConfig, PipelineConfig
from workers.core.contracts import Result
from workers.core.offsets import OffsetTracker
from workers.parquet.kafka_results import ParquetResults


def result(job_id: str) -> Result:
    return make_result(job_id=job_id, task="echo", output="x", raw_output="x", adapter=None)


def committed() -> bool:
    return True


def stage(root: Path, rows_per_file: int) -> ParquetResults:
    pipeline = PipelineConfig(
        task="echo",
        prompt_template="{input}",
        sinks=["parquet"],
        parquet=ParquetSinkConfig(path=root, rows_per_file=rows_per_file, max_file_age_ms=10**9),
    )
    return ParquetResults({"echo": pipeline})


def test_files_take_only_contiguous_offsets_and_commit_after_each(tmp_path: Path) -> None:
    tracker = OffsetTracker()
    for offset in range(6):
        tracker.track("jobs.echo", 0, offset)
    results = stage(tmp_path, rows_per_file=2)
    written: list[list[int]] = []
    for offset in (0, 1, 3, 4):  # offset 2 is still generating
        results.add("jobs.echo", 0, offset, result(f"j{offset}"))

    def on_written(key, offsets) -> None:
        written.append(offsets)
        for offset in offsets:
            tracker.finish(*key, offset)

    results.flush(tracker.first_unfinished_outside, on_written, committed)
    assert written == [[0, 1]]  # 3 and 4 wait for 2, or a replay could duplicate them
    tracker.finish("jobs.echo", 0, 2)  # dead-lettered, say
    results.flush(tracker.first_unfinished_outside, on_written, committed)
    assert written == [[0, 1], [3, 4]]
    files = sorted(p.name for p in tmp_path.rglob("*.parquet"))
    assert files == ["jobs.echo-p0000-000000000000.parquet", "jobs.echo-p0000-000000000003.parquet"]
    assert sorted(read_dataset(tmp_path).column("job_id").to_pylist()) == ["j0", "j1", "j3", "j4"]


def test_force_writes_a_partial_file_and_a_replay_overwrites_it(tmp_path: Path) -> None:
    tracker = OffsetTracker()
    tracker.track("jobs.echo", 1, 7)
    results = stage(tmp_path, rows_per_file=100)
    results.add("jobs.echo", 1, 7, result("first"))
    results.flush(tracker.first_unfinished_outside, lambda key, offsets: None, committed)
    assert list(tmp_path.rglob("*.parquet")) == []  # not due yet
    results.flush(
        tracker.first_unfinished_outside, lambda key, offsets: None, committed, force=True
    )
    replay = stage(tmp_path, rows_per_file=100)
    replay.add("jobs.echo", 1, 7, result("again"))
    replay.flush(tracker.first_unfinished_outside, lambda key, offsets: None, committed, force=True)
    assert read_dataset(tmp_path).column("job_id").to_pylist() == ["again"]


def test_no_next_file_before_a_commit_succeeds_so_a_replay_leaves_no_duplicate(
    tmp_path: Path,
) -> None:
    def ten_rows(rows_per_file: int) -> tuple[OffsetTracker, ParquetResults]:
        tracker, results = OffsetTracker(), stage(tmp_path, rows_per_file)
        for offset in range(10):
            tracker.track("jobs.echo", 0, offset)
            results.add("jobs.echo", 0, offset, result(f"j{offset}"))
        return tracker, results

    tracker, first = ten_rows(rows_per_file=5)
    commits: list[bool] = []

    def failing_commit() -> bool:
        commits.append(False)
        return False

    def finisher(of: OffsetTracker):
        return lambda key, offsets: [of.finish(*key, offset) for offset in offsets]

    first.flush(tracker.first_unfinished_outside, finisher(tracker), failing_commit)
    first.flush(tracker.first_unfinished_outside, finisher(tracker), failing_commit)
    assert [p.name for p in tmp_path.rglob("*.parquet")] == ["jobs.echo-p0000-000000000000.parquet"]
    assert commits == [False, False]
    # The worker dies; the next owner replays from the last commit (offset 0) and cuts its
    # files elsewhere (other rows_per_file, other timing). The uncommitted file is rewritten.
    replay_tracker, replay = ten_rows(rows_per_file=7)
    replay.flush(
        replay_tracker.first_unfinished_outside, finisher(replay_tracker), committed, force=True
    )
    job_ids = read_dataset(tmp_path).column("job_id").to_pylist()
    assert sorted(job_ids) == sorted(f"j{offset}" for offset in range(10))
