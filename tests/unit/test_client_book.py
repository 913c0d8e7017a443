"""The client's bookkeeping without Kafka: answers reach their handles, dead letters raise
`JobFailed` with their reason, memory stays bounded, and `as_completed` yields in arrival order."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from tests.unit.results import make_result
from workers.client import JobFailed, as_completed
from workers.client.book import AnswerBook, JobHandle, outcome_of
from workers.core.contracts import Result


def failed(job_id: str, code: str = "unknown_adapter") -> JobFailed:
    return JobFailed(job_id, code, "no such adapter", "jobs.classify.dlq")


def test_an_answer_reaches_the_handle_that_awaits_it() -> None:
    book = AnswerBook()
    handle = book.expect("j-1")
    assert not handle.done()
    book.answered("j-1", make_result(job_id="j-1"))
    assert handle.result(0).job_id == "j-1"
    assert book.stats() == {"awaited": 0, "kept": 0}  # the handle holds it, not the book


def test_a_dead_letter_raises_job_failed_with_its_reason() -> None:
    book = AnswerBook()
    handle = book.expect("p-1")
    book.answered("p-1", failed("p-1"))
    with pytest.raises(JobFailed) as raised:
        handle.result(0)
    assert (raised.value.code, raised.value.job_id) == ("unknown_adapter", "p-1")


def test_an_answer_that_came_first_is_found_by_a_later_handle() -> None:
    book = AnswerBook()
    book.answered("j-1", make_result(job_id="j-1"))  # e.g. a restarted client reading back
    assert book.expect("j-1").result(0).job_id == "j-1"


def test_no_answer_in_time_is_a_timeout() -> None:
    with pytest.raises(TimeoutError):
        AnswerBook().expect("j-1").result(0.01)


def test_answers_nobody_awaits_are_bounded_oldest_first() -> None:
    book = AnswerBook(max_kept=3)
    for n in range(10):
        book.answered(f"j-{n}", make_result(job_id=f"j-{n}"))
    assert book.stats() == {"awaited": 0, "kept": 3}
    assert book.expect("j-9").result(0).job_id == "j-9"
    with pytest.raises(TimeoutError):
        book.expect("j-0").result(0)  # dropped: the oldest


def test_a_dropped_handle_is_not_kept_alive_and_its_answer_is_bounded() -> None:
    book = AnswerBook(max_kept=2)
    for n in range(1500):
        book.expect(f"j-{n}")  # dropped at once
    gc.collect()
    assert book.stats()["awaited"] == 0
    for n in range(1500):
        book.answered(f"j-{n}", make_result(job_id=f"j-{n}"))
    assert book.stats() == {"awaited": 0, "kept": 2}


def test_the_first_answer_wins() -> None:
    book = AnswerBook()
    handle = book.expect("j-1")
    book.answered("j-1", make_result(job_id="j-1"))
    book.answered("j-1", failed("j-1"))
    assert isinstance(handle.result(0), Result)


def test_as_completed_yields_in_arrival_order_across_threads() -> None:
    book = AnswerBook()
    handles = [book.expect(f"j-{n}") for n in range(4)]
    book.answered("j-2", make_result(job_id="j-2"))  # already answered: first out

    def answer_the_rest() -> None:
        for job_id in ("j-3", "j-0"):
            book.answered(job_id, make_result(job_id=job_id))
        book.answered("j-1", failed("j-1"))

    threading.Timer(0.05, answer_the_rest).start()
    order = [h.job_id for h in as_completed(handles, timeout=5)]
    assert order == ["j-2", "j-3", "j-0", "j-1"]
    with pytest.raises(JobFailed):
        handles[1].result(0)


def test_as_completed_times_out_with_jobs_left() -> None:
    book = AnswerBook()
    handles = [book.expect("a"), book.expect("b")]
    book.answered("a", make_result(job_id="a"))
    seen = []
    with pytest.raises(TimeoutError):
        for handle in as_completed(handles, timeout=0.05):
            seen.append(handle.job_id)
    assert seen == ["a"]


def test_a_listener_may_be_awaited_from_asyncio() -> None:
    async def main() -> str:
        handle = JobHandle("j-1")
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future[None] = loop.create_future()
        handle.add_listener(lambda _h: loop.call_soon_threadsafe(arrived.set_result, None))
        threading.Timer(0.02, handle._settle, [make_result(job_id="j-1")]).start()
        await asyncio.wait_for(arrived, 5)
        return handle.result(0).job_id

    assert asyncio.run(main()) == "j-1"


def test_records_decode_to_results_and_dead_letters() -> None:
    result = make_result(job_id="j-7")
    value = result.model_dump_json().encode()
    assert outcome_of("results.classify", b"j-7", value, []) == ("j-7", result)
    headers = [("dlq.error.code", b"task_mismatch"), ("dlq.error.message", b"on jobs.reply")]
    job_id, outcome = outcome_of("jobs.reply.dlq", b"p-1", b"{}", headers) or ("", None)
    assert job_id == "p-1" and isinstance(outcome, JobFailed)
    assert (outcome.code, outcome.message, outcome.topic) == (
        "task_mismatch",
        "on jobs.reply",
        "jobs.reply.dlq",
    )
    # Unkeyed dead letter: the job id from the payload; neither key nor payload: skipped.
    unkeyed = outcome_of("jobs.dlq", None, b'{"job_id": "p-2"}', headers)
    assert unkeyed is not None and unkeyed[0] == "p-2"
    assert outcome_of("jobs.dlq", None, b"not json", headers) is None
    assert outcome_of("results.classify", b"x", b"not a result", None) is None
