"""File boundaries of the Kafka → Parquet stage (plain data, a temp directory, a fake group)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from tests.datasets import read_dataset
from tests.unit.results import make_result
from workers.core.config import ParquetSinkConfig, PipelineConfig
from workers.core.contracts import Result
from workers.core.offsets import Ledger, OffsetTracker, TopicPartitionKey
from workers.kafka.source import KafkaJobSource
from workers.parquet.kafka_results import ConsumerOwner, ParquetResults

KEY: TopicPartitionKey = ("jobs.echo", 0)


def result(job_id: str) -> Result:
    return make_result(job_id=job_id, task="echo", output="x", raw_output="x", adapter=None)


def stage(root: Path, rows_per_file: int) -> ParquetResults:
    pipeline = PipelineConfig(
        task="echo",
        prompt_template="{input}",
        sinks=["parquet"],
        parquet=ParquetSinkConfig(path=root, rows_per_file=rows_per_file, max_file_age_ms=10**9),
    )
    return ParquetResults({"echo": pipeline})


@dataclass
class Group:
    """The consumer group: committed positions, and which member holds each partition."""

    committed: dict[TopicPartitionKey, int] = field(default_factory=dict)
    holder: dict[TopicPartitionKey, str] = field(default_factory=dict)


@dataclass
class Member:
    """One member's view of the group: what ParquetResults asks the consumer."""

    group: Group
    name: str

    def started(self) -> set[TopicPartitionKey]:
        return {key for key, holder in self.group.holder.items() if holder == self.name}

    def committed(self, key: TopicPartitionKey) -> int:
        return self.group.committed.get(key, 0)

    def claim(self, key: TopicPartitionKey) -> str | None:
        return self.name if self.group.holder.get(key) == self.name else None


class Consumer:
    """A worker's side of one partition: offsets, the Parquet stage, commits into the group."""

    def __init__(
        self, root: Path, group: Group, name: str, rows_per_file: int, *, commits: bool = True
    ) -> None:
        self.group, self.member = group, Member(group, name)
        group.holder[KEY] = name
        self.tracker, self.results = OffsetTracker(), stage(root, rows_per_file)
        self.commits = commits
        self.written: list[list[int]] = []

    def read(self, first: int, verdicts: str) -> None:
        """One message per letter from `first`: r is answered into Parquet, d dead-lettered
        (engine_crash, adapter_unavailable: a replay may decide otherwise)."""
        for offset, verdict in enumerate(verdicts, start=first):
            self.tracker.track(*KEY, offset)
            if verdict == "r":
                self.results.add(*KEY, offset, result(f"j{offset}"))
            else:
                self.tracker.mark_answered(*KEY, offset)

    def on_written(self, key: TopicPartitionKey, offsets: list[int]) -> None:
        self.written.append(offsets)
        for offset in offsets:
            self.tracker.mark_answered(*key, offset)

    def commit(self) -> bool:
        if not self.commits:
            return False
        points = self.tracker.committable()
        self.group.committed.update({key: point.position for key, point in points.items()})
        self.tracker.mark_committed(points)
        return True

    def flush(self, *, force: bool = False) -> None:
        self.results.flush(
            self.member,
            self.tracker.first_unanswered_outside,
            self.on_written,
            self.commit,
            force=force,
        )


def file_names(root: Path) -> list[str]:
    return sorted(path.name for path in root.rglob("*.parquet"))


def job_ids(root: Path) -> Counter[str]:
    return Counter(read_dataset(root).column("job_id").to_pylist())


def test_files_take_only_contiguous_offsets_and_commit_after_each(tmp_path: Path) -> None:
    consumer = Consumer(tmp_path, Group(), "a", rows_per_file=2)
    consumer.read(0, "rr")
    consumer.tracker.track(*KEY, 2)  # offset 2 is still generating
    consumer.read(3, "rr")
    consumer.flush()
    assert consumer.written == [[0, 1]]  # 3 and 4 wait for 2, or a replay could duplicate them
    consumer.tracker.mark_answered(*KEY, 2)  # dead-lettered, say
    consumer.flush()
    assert consumer.written == [[0, 1], [3, 4]]
    # Each named after the committed position it starts at: 2, not its first row, 3.
    assert file_names(tmp_path) == [
        "jobs.echo-p0000-000000000000.parquet",
        "jobs.echo-p0000-000000000002.parquet",
    ]
    assert job_ids(tmp_path) == Counter(["j0", "j1", "j3", "j4"])


def test_force_writes_a_partial_file_and_a_replay_overwrites_it(tmp_path: Path) -> None:
    group = Group(committed={KEY: 7})
    first = Consumer(tmp_path, group, "a", rows_per_file=100, commits=False)
    first.read(7, "r")
    first.flush()
    assert file_names(tmp_path) == []  # not due yet
    first.flush(force=True)
    replay = Consumer(tmp_path, group, "b", rows_per_file=100)
    replay.results.add(*KEY, 7, result("again"))
    replay.tracker.track(*KEY, 7)
    replay.flush(force=True)
    assert job_ids(tmp_path) == Counter(["again"])


def test_no_next_file_before_a_commit_succeeds_so_a_replay_leaves_no_duplicate(
    tmp_path: Path,
) -> None:
    group = Group()
    first = Consumer(tmp_path, group, "a", rows_per_file=5, commits=False)
    first.read(0, "r" * 10)
    first.flush()
    first.flush()
    assert file_names(tmp_path) == ["jobs.echo-p0000-000000000000.parquet"]
    assert first.written == [[0, 1, 2, 3, 4]]
    # The worker dies; the next owner replays from the last commit (offset 0) and cuts its
    # files elsewhere (other rows_per_file, other timing). The uncommitted file is rewritten.
    replay = Consumer(tmp_path, group, "b", rows_per_file=7)
    replay.read(0, "r" * 10)
    replay.flush(force=True)
    assert job_ids(tmp_path) == Counter(f"j{offset}" for offset in range(10))


def test_a_replay_that_decides_otherwise_rewrites_the_same_file(tmp_path: Path) -> None:
    group = Group()
    first = Consumer(tmp_path, group, "a", rows_per_file=3, commits=False)
    first.read(0, "drrrrr")  # offset 0: engine_crash, dead-lettered
    first.flush()
    (uncommitted,) = file_names(tmp_path)
    # The worker dies before its commit. The replay from offset 0 answers offset 0 this time.
    replay = Consumer(tmp_path, group, "b", rows_per_file=3)
    replay.read(0, "rrrrrr")
    replay.flush(force=True)
    assert job_ids(tmp_path) == Counter(f"j{offset}" for offset in range(6))  # each once
    assert file_names(tmp_path) == [uncommitted, "jobs.echo-p0000-000000000003.parquet"]


def test_a_resumed_partition_drops_the_files_its_commit_does_not_cover(tmp_path: Path) -> None:
    group = Group()
    first = Consumer(tmp_path, group, "a", rows_per_file=4)
    first.read(0, "rrrr")
    first.flush()
    first.read(4, "rrrr")
    first.commits = False  # the broker goes away after the first file's commit
    first.flush()
    assert file_names(tmp_path) == [
        "jobs.echo-p0000-000000000000.parquet",
        "jobs.echo-p0000-000000000004.parquet",
    ]
    assert group.committed == {KEY: 4}
    # The next owner resumes at 4 and dead-letters 4..7 (the adapter is unavailable now): the
    # file at 4 must go before it commits past it, or its rows would be answered twice.
    replay = Consumer(tmp_path, group, "b", rows_per_file=4)
    replay.read(4, "dddd")
    replay.flush()
    assert replay.commit()
    assert file_names(tmp_path) == ["jobs.echo-p0000-000000000000.parquet"]
    assert job_ids(tmp_path) == Counter(["j0", "j1", "j2", "j3"])


def test_a_member_that_lost_its_partition_does_not_publish(tmp_path: Path) -> None:
    group = Group()
    stale = Consumer(tmp_path, group, "a", rows_per_file=100)
    stale.read(0, "rrrr")
    stale.flush()  # nothing due yet
    # Its session expires; the group hands the partition to b, which answers and commits.
    successor = Consumer(tmp_path, group, "b", rows_per_file=100)
    successor.read(0, "drrr")  # offset 0 dead-lettered this time
    successor.flush(force=True)
    published = file_names(tmp_path)
    # a has not polled yet, so no lost callback has told it: its file must not be published.
    stale.flush(force=True)
    assert file_names(tmp_path) == published
    assert job_ids(tmp_path) == Counter(["j1", "j2", "j3"])
    assert stale.written == []  # its rows stay unanswered: nothing is committed for them
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == published  # no temp left


@dataclass
class FakeSource:
    """What librdkafka reports: member id, generation, assignment; and the committed offsets."""

    member: str = "m-1"
    generation: int = 3
    assigned: set[TopicPartitionKey] = field(default_factory=lambda: {KEY})

    def membership(self) -> tuple[str, int, set[TopicPartitionKey]]:
        return self.member, self.generation, set(self.assigned)

    def committed_ledger(self, key: TopicPartitionKey) -> Ledger:
        return Ledger(12)


def test_the_consumer_holds_a_partition_until_librdkafka_reports_the_membership_lost() -> None:
    source = FakeSource()
    owner = ConsumerOwner(cast(KafkaJobSource, source), lambda key: key == KEY)
    assert (owner.started(), owner.committed(KEY), owner.claim(KEY)) == ({KEY}, 12, "m-1")
    source.generation = 4  # a cooperative rebalance that leaves the partition here
    assert owner.claim(KEY) == "m-1"
    for lost in ({"member": ""}, {"generation": -1}, {"assigned": set()}):
        assert ConsumerOwner(cast(KafkaJobSource, FakeSource(**lost)), bool).claim(KEY) is None
