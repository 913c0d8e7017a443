"""The engine depth controller on plain data (`workers.core.depth`)."""

from __future__ import annotations

import pytest

from workers.core.depth import DepthController, StepTimeModel

# This machine's engine on the zoo model: about 28 ms a step at 64 requests, 87 ms at 256.
A, B = 0.0083, 0.00031


def cpu_like(controller: DepthController, sizes: range = range(8, 257, 8)) -> None:
    for _ in range(4):
        for n in sizes:
            controller.observe_step(n, A + B * n)
    controller.observe_finished(32)


def throughput(depth: int) -> float:
    return depth / (A + B * depth)


def test_the_model_recovers_the_step_time_line() -> None:
    model = StepTimeModel()
    for _ in range(3):
        for n in range(1, 200):
            model.observe(n, A + B * n)
    fit = model.coefficients()
    assert fit is not None
    assert fit[0] == pytest.approx(A, rel=1e-6) and fit[1] == pytest.approx(B, rel=1e-6)
    assert model.predict(256) == pytest.approx(A + B * 256, rel=1e-6)


def test_steps_of_one_size_do_not_fit_a_line() -> None:
    model = StepTimeModel()
    for _ in range(500):
        model.observe(256, 0.087)
    assert model.coefficients() is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_unusable_observations_are_ignored(bad: float) -> None:
    model = StepTimeModel()
    for n in range(1, 100):
        model.observe(n, A + B * n)
    before = model.coefficients()
    model.observe(50, bad)
    model.observe(0, 0.01)
    assert model.coefficients() == before


def test_uncontended_the_engine_is_kept_full() -> None:
    controller = DepthController(256, latency_target_s=0.5)
    cpu_like(controller)
    assert controller.depth(contended=False) == 256


def test_contended_with_a_tight_target_the_depth_is_the_throughput_floor() -> None:
    controller = DepthController(256, latency_target_s=0.5)
    cpu_like(controller)
    depth = controller.depth(contended=True)
    assert depth < 256
    # The least depth that keeps 95% of full depth's throughput: one less would not.
    assert throughput(depth) >= 0.95 * throughput(256)
    assert throughput(depth - 1) < 0.95 * throughput(256)


def test_contended_with_a_loose_target_the_depth_is_what_the_target_allows() -> None:
    controller = DepthController(256, latency_target_s=2.2)
    cpu_like(controller)
    depth = controller.depth(contended=True)
    floor = controller.throughput_floor()
    assert floor < depth < 256
    latency = controller.predicted_latency_s(depth)
    over = controller.predicted_latency_s(depth + 1)
    assert latency is not None and over is not None
    assert latency <= 2.2 < over


def test_a_target_met_at_full_depth_keeps_it_full() -> None:
    controller = DepthController(256, latency_target_s=10.0)
    cpu_like(controller)
    assert controller.depth(contended=True) == 256


def test_flat_steps_cost_no_latency_so_the_engine_stays_full() -> None:
    controller = DepthController(256, latency_target_s=0.1)  # a GPU-like engine
    for n in range(8, 257):
        controller.observe_step(n, 0.004)
    controller.observe_finished(32)
    assert controller.depth(contended=True) == 256


def test_keeping_all_of_the_throughput_keeps_full_depth() -> None:
    controller = DepthController(256, latency_target_s=0.1, min_throughput_share=1.0)
    cpu_like(controller)
    assert controller.depth(contended=True) == 256


def test_before_the_line_is_known_a_contended_engine_runs_at_half_depth() -> None:
    controller = DepthController(256, latency_target_s=0.5)
    for _ in range(100):
        controller.observe_step(256, 0.087)
    controller.observe_finished(32)
    assert controller.depth(contended=True) == 128
    for _ in range(100):
        controller.observe_step(128, 0.048)
    # Two sizes seen: the line is known and the floor applies.
    assert 128 < controller.depth(contended=True) < 256


def test_old_steps_are_forgotten_when_the_machine_changes() -> None:
    controller = DepthController(256, latency_target_s=0.5)
    cpu_like(controller)
    first = controller.throughput_floor()
    # Steps twice as costly per request, and flat overhead nearly gone.
    for _ in range(40):
        for n in range(8, 257, 8):
            controller.observe_step(n, 0.001 + 2 * B * n)
    assert controller.throughput_floor() < first


def test_requests_beyond_the_slots_count_as_full_depth_not_as_longer_steps() -> None:
    # 288 in the engine, 256 running: full depth keeps 32 ready for freed slots.
    controller = DepthController(288, latency_target_s=0.5, slots=256)
    for _ in range(4):
        for n in range(8, 289, 8):
            controller.observe_step(n, A + B * min(n, 256))
    controller.observe_finished(32)
    assert controller.depth(contended=False) == 288
    fit = controller.model.coefficients()
    assert fit is not None and fit[1] == pytest.approx(B, rel=1e-6)
    depth = controller.depth(contended=True)
    assert throughput(depth) >= 0.95 * throughput(256) > throughput(depth - 1)
