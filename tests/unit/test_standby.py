"""The standby engine's hand-over, on fake engines: what `restart` gets from it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from workers import metrics
from workers.engine.standby import Standby, free_memory_bytes, room_for_another


class FakeCore:
    def __init__(self) -> None:
        self.resources = SimpleNamespace(engine_dead=False)
        self.shut_down = False

    def shutdown(self, timeout: float | None = None) -> None:
        self.shut_down = True


def fake_llm() -> SimpleNamespace:
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=FakeCore()))


class Starts:
    """A `start` that hands out fake engines, each once `release` lets it finish."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.started: list[SimpleNamespace] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self) -> SimpleNamespace:
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("no memory")
        self.started.append(fake_llm())
        return self.started[-1]


def held() -> tuple[Starts, Standby]:
    """A standby whose start goes on only once `starts.release` is set."""
    starts = Starts()
    starts.release.clear()
    return starts, Standby(starts)


def until_started(standby: Standby) -> None:
    deadline = time.monotonic() + 10
    while standby.starting and time.monotonic() < deadline:
        time.sleep(0.01)


def test_take_hands_over_the_started_engine_once() -> None:
    starts = Starts()
    standby = Standby(starts)
    standby.prepare()
    until_started(standby)
    assert metrics.ENGINE_STANDBY._value.get() == 1
    assert standby.take() is starts.started[0]
    assert metrics.ENGINE_STANDBY._value.get() == 0
    assert standby.take() is None  # taken: a restart without a new one starts cold


def test_take_waits_for_a_standby_still_starting() -> None:
    starts, standby = held()
    standby.prepare()
    assert standby.starting
    threading.Timer(0.2, starts.release.set).start()
    assert standby.take() is starts.started[0]


def test_prepare_starts_one_at_a_time() -> None:
    starts, standby = held()
    standby.prepare()
    standby.prepare()
    starts.release.set()
    standby.take()
    standby.prepare()
    standby.prepare()
    standby.take()
    assert len(starts.started) == 2


def test_a_failed_start_gives_nothing_and_the_next_prepare_tries_again() -> None:
    starts = Starts(fail=True)
    standby = Standby(starts)
    standby.prepare()
    assert standby.take() is None
    starts.fail = False
    standby.prepare()
    assert standby.take() is starts.started[0]


def test_a_standby_that_died_idle_is_not_handed_over() -> None:
    starts = Starts()
    standby = Standby(starts)
    standby.prepare()
    until_started(standby)
    dead = starts.started[0]
    dead.llm_engine.engine_core.resources.engine_dead = True
    assert standby.take() is None
    assert dead.llm_engine.engine_core.shut_down


def test_close_shuts_down_a_ready_standby_and_one_still_starting_once_started() -> None:
    starts = Starts()
    standby = Standby(starts)
    standby.prepare()
    until_started(standby)
    standby.close()
    assert starts.started[0].llm_engine.engine_core.shut_down

    starts, standby = held()
    standby.prepare()
    standby.close()
    starts.release.set()
    assert standby.take() is None
    assert starts.started[0].llm_engine.engine_core.shut_down
    standby.prepare()  # closed: starts nothing more
    assert not standby.starting and len(starts.started) == 1


def test_free_memory_follows_a_cgroup_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    assert free_memory_bytes(tmp_path) == 2 * 2**30
    (tmp_path / "memory.max").write_text("max\n")
    assert free_memory_bytes(tmp_path) > 0
    assert free_memory_bytes(tmp_path / "absent") == free_memory_bytes(tmp_path)


def test_auto_wants_half_again_the_running_engine_free() -> None:
    room, available = room_for_another(0)
    assert room and available > 0
    assert not room_for_another(available)[0]


def test_a_standby_starts_once_the_engine_is_quiet() -> None:
    starts = Starts()
    quiet = threading.Event()
    standby = Standby(starts, quiet=quiet.is_set)
    standby.prepare(within_s=30)
    time.sleep(0.8)
    assert starts.started == []  # the engine is busy: its cores are left to it
    quiet.set()
    deadline = time.monotonic() + 10
    while standby.starting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(starts.started) == 1


def test_a_standby_starts_at_its_deadline_or_when_needed_however_busy() -> None:
    starts = Starts()
    standby = Standby(starts, quiet=lambda: False)
    standby.prepare(within_s=0.3)
    deadline = time.monotonic() + 10
    while not starts.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(starts.started) == 1  # started at its deadline, the engine still busy
    assert standby.take() is starts.started[0]
    standby.prepare(within_s=30)
    began = time.monotonic()
    assert standby.take() is starts.started[1]  # a death will not wait for a quiet moment
    assert time.monotonic() - began < 5
