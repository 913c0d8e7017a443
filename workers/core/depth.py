"""How many requests the engine loop keeps in the engine. Pure logic, no I/O.

A step advances every request in the engine by one token, so a request's time in the engine is
about (its steps) x (step time), and throughput is (requests in a step) ÷ (step time). Where the
step time grows with the requests in it (a CPU: 87 ms at 256 requests, 28 ms at 64 with the
zoo's model), a deep engine buys throughput with every request's latency; where it barely grows
(a small model on a GPU), depth is nearly free.

`DepthController` learns the step time as a + b·n from the steps it observes (`StepTimeModel`)
and the steps a request takes, then sets the depth:

- **Uncontended** (nothing waits, or every tenant with requests in the engine has a backlog
  too): the full `max_depth`. Depth caps nothing when nothing waits, and under a backlog that
  every tenant shares, less depth only lowers throughput: each job waits longer to enter than
  it saves inside.
- **Contended** (jobs wait, and some tenant with requests in the engine has nothing waiting: a
  quiet tenant beside a flood, whose jobs fair admission puts first): the largest depth whose
  predicted latency in the engine meets `latency_target_s`, but never below the depth that
  keeps `min_throughput_share` of full depth's throughput. The quiet tenant's jobs run in
  shorter steps; the flood pays at most 1 - `min_throughput_share` of its throughput.

Until the model has seen steps of different sizes it cannot tell a from b: contended, it runs
at half depth for a few steps to see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A fit needs steps whose request counts differ by at least this much (standard deviation).
MIN_SPREAD = 4.0
MIN_WEIGHT = 32.0  # and about this many steps observed


@dataclass
class StepTimeModel:
    """Least squares of step seconds on requests per step, forgetting old steps with a
    half-life of `half_life_steps`, so the fit follows a machine whose load changes."""

    half_life_steps: float = 2000.0
    _decay: float = field(init=False)
    _w: float = 0.0
    _n: float = 0.0
    _t: float = 0.0
    _nn: float = 0.0
    _nt: float = 0.0
    _slope: float | None = None  # the last b fitted from steps of different sizes

    def __post_init__(self) -> None:
        self._decay = 0.5 ** (1.0 / self.half_life_steps)

    def observe(self, requests: int, seconds: float) -> None:
        if requests <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        d = self._decay
        self._w = self._w * d + 1.0
        self._n = self._n * d + requests
        self._t = self._t * d + seconds
        self._nn = self._nn * d + requests * requests
        self._nt = self._nt * d + requests * seconds

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) in seconds and seconds per request, or None until the steps seen differ
        enough in size to separate them. While recent steps are all of about one size (a
        steady engine), the last slope b stands and a follows their mean."""
        if self._w < MIN_WEIGHT:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        variance = self._nn / self._w - mean_n * mean_n
        if variance < MIN_SPREAD * MIN_SPREAD:
            if self._slope is None:
                return None
            b = self._slope
        else:
            b = max(0.0, (self._nt / self._w - mean_n * mean_t) / variance)
            self._slope = b
        a = mean_t - b * mean_n
        if a < 0:  # a step costs at least nothing: the line through the origin
            return 0.0, self._nt / self._nn
        return a, b

    def predict(self, requests: int) -> float | None:
        fit = self.coefficients()
        return None if fit is None else fit[0] + fit[1] * requests


@dataclass
class DepthController:
    """`max_depth`: requests in the engine at full depth; `slots`: how many of them a step runs
    (vLLM's max_num_seqs; those beyond wait inside the engine, ready for a freed slot). The step
    model, the floor and the latency target are about running requests."""

    max_depth: int
    latency_target_s: float
    min_throughput_share: float = 0.95
    slots: int | None = None  # default: max_depth
    model: StepTimeModel = field(default_factory=StepTimeModel)
    steps_per_request: float = 0.0  # moving average, 0 until a request finished
    recent_step_s: float = 0.0  # moving average of the last few steps' time, whatever size
    _smoothing: float = 0.05

    @property
    def _slots(self) -> int:
        return min(self.slots or self.max_depth, self.max_depth)

    def observe_step(self, requests: int, seconds: float) -> None:
        self.model.observe(min(requests, self._slots), seconds)
        if math.isfinite(seconds) and seconds >= 0:
            self.recent_step_s += 0.2 * (seconds - self.recent_step_s)

    def observe_finished(self, steps: int) -> None:
        if self.steps_per_request == 0.0:
            self.steps_per_request = float(steps)
        else:
            self.steps_per_request += self._smoothing * (steps - self.steps_per_request)

    def predicted_latency_s(self, depth: int) -> float | None:
        """A request's predicted time in the engine at `depth` requests."""
        step = self.model.predict(depth)
        if step is None or not self.steps_per_request:
            return None
        return step * self.steps_per_request

    def throughput_floor(self) -> int:
        """The least depth that keeps `min_throughput_share` of full depth's requests per
        second: d / (a + b·d) ≥ share · D / (a + b·D)."""
        slots = self._slots
        fit = self.model.coefficients()
        if fit is None:
            return slots
        a, b = fit
        full = slots / (a + b * slots)
        k = self.min_throughput_share * full
        return max(1, min(slots, math.ceil(k * a / (1.0 - k * b))))

    def depth(self, *, contended: bool) -> int:
        if not contended or not self.steps_per_request:
            return self.max_depth
        fit = self.model.coefficients()
        if fit is None:
            # Steps all of one size (a steady backlog keeps the engine full) cannot tell a
            # from b: run at half depth until steps of both sizes fit the line.
            return max(1, self._slots // 2)
        a, b = fit
        if b == 0.0:
            return self.max_depth
        step_budget = self.latency_target_s / self.steps_per_request
        by_latency = math.floor((step_budget - a) / b)
        if by_latency >= self._slots:
            return self.max_depth  # the target holds with every slot running
        return max(self.throughput_floor(), by_latency)
