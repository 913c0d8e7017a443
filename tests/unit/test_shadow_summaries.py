from workers.core.contracts import (
    AdapterRef,
    AdapterState,
    Result,
    ResultStatus,
    ShadowEvaluation,
    Timings,
    Usage,
)
from workers.core.evaluation import ShadowSummaries, summarize
from workers.core.processing import evaluation_of


def result(version: str, text: str, output: object, ok: bool, tokens: int, ms: float) -> Result:
    return Result(
        job_id="j1",
        task="classify",
        status=ResultStatus.OK if ok else ResultStatus.INVALID_OUTPUT,
        output=output,
        raw_output=text,
        adapter=AdapterRef(name="classifier", version=version, sha256="s" + version),
        usage=Usage(prompt_tokens=9, completion_tokens=tokens),
        timings=Timings(
            enqueued_at_ms=0, received_at_ms=0, completed_at_ms=0, queue_ms=0, generate_ms=ms
        ),
    )


def test_an_evaluation_compares_text_output_validity_tokens_and_latency() -> None:
    serving = result("1", '{"label": "billing"}', {"label": "billing"}, True, 7, 40.0)
    same_output = result("2", '{"label":  "billing"}', {"label": "billing"}, True, 8, 55.5)
    evaluation = evaluation_of(serving, same_output, "w1")
    assert (evaluation.identical_text, evaluation.identical_output) == (False, True)
    assert (evaluation.serving_tokens, evaluation.shadow_tokens) == (7, 8)
    assert (evaluation.serving_latency_ms, evaluation.shadow_latency_ms) == (40.0, 55.5)
    assert (evaluation.serving.version, evaluation.shadow.version) == ("1", "2")
    invalid = result("2", "{", None, False, 3, 10.0)
    worse = evaluation_of(serving, invalid, "w1")
    assert (worse.identical_output, worse.serving_valid, worse.shadow_valid) == (False, True, False)


def evaluation(identical: bool, shadow_ms: float) -> ShadowEvaluation:
    serving = result("1", "a", "a", True, 4, 10.0)
    shadow = result("2", "a" if identical else "b", "a" if identical else "b", True, 4, shadow_ms)
    return evaluation_of(serving, shadow, "w1")


def test_summaries_roll_over_a_window_and_report_once_per_interval() -> None:
    summaries = ShadowSummaries(window=4, interval_s=10.0, worker="w1")
    for identical in (False, False, True, True, True, True):
        summaries.add(evaluation(identical, 30.0))
    (status,) = summaries.due(now=100.0)
    assert status.state is AdapterState.SHADOW and status.key == "classifier@2"
    assert status.evaluation is not None
    assert (status.evaluation.jobs, status.evaluation.identical_text) == (4, 1.0)
    assert summaries.due(now=105.0) == []  # nothing new
    summaries.add(evaluation(False, 30.0))
    assert summaries.due(now=105.0) == []  # not due yet
    (later,) = summaries.due(now=111.0)
    assert later.evaluation is not None and later.evaluation.identical_text == 0.75
    assert summarize([]).jobs == 0


def test_outputs_are_compared_as_json_values_not_python_ones() -> None:
    serving = result("1", '{"flag": true}', {"flag": True, "n": 1}, True, 4, 10.0)
    for different in ({"flag": 1, "n": 1}, {"flag": True, "n": 1.0}, [True]):
        shadow = result("2", "x", different, True, 4, 10.0)
        assert not evaluation_of(serving, shadow, "w1").identical_output, different
    reordered = result("2", "x", {"n": 1, "flag": True}, True, 4, 10.0)
    assert evaluation_of(serving, reordered, "w1").identical_output
