"""Experimental line-search rules, as small subclasses of the driver, so that a rule can be tried
on the harness before it is built into every backend.  They change host decisions only (which
step size a trial tests, which step is taken); every device pass is the driver's own.

``EdgeFraction``: search along ADAM's momentum direction for the Armijo edge E of the current
mini-batch (plain test, no smoothing), and step at ``kappa * E``.  The diagnostic behind it
(``probe.py``): along a run of Adam at its best learning rate, that rate is 0.3-1x the
momentum direction's c = 0.5 edge on all five tuning workloads, while runs at 10x smaller rates
sit at 0.02-0.1x of theirs, so the edge carries the scale.  After an accepted trial at eta with
measured decrease ratio q = (L0 - L_try) / (eta * slope), a quadratic model of the loss along the
line puts the edge at eta * (1 - c) / (1 - q); the next search starts there (clipped to
[eta, max_growth * eta]), so a search usually costs one trial forward.
"""
from __future__ import annotations

import functools
import math
import types

import torch

from alsals_fused import ALSALS
from alsals_fused.backends.base import Dir
from alsals_fused.plateau import betainc


class EdgeFraction(ALSALS):
    def __init__(self, params, *, kappa: float = 0.5, max_growth: float = 2.0, **kwargs):
        super().__init__(params, **kwargs)
        if not self.hyper.momentum_search:
            raise ValueError("EdgeFraction searches along the momentum direction (variant='alsals')")
        self.kappa, self.max_growth = kappa, max_growth
        self.step_size = kappa * self.eta               # the step size of the last update

    def _first_trial_eta(self, searching: bool) -> float:
        self.step_size = self.kappa * self.eta      # what a step that does not search takes
        return self.eta if searching else self.step_size

    def _commit(self, plan, hp, found, eta_before):
        edge = None
        if found.accepted and not found.skipped:
            q = ((found.loss0 - found.loss_try) / (found.eta * found.slope)
                 if found.slope > 0 and math.isfinite(found.loss_try) else 0.0)
            est = found.eta * (1 - self.hyper.c) / (1 - q) if q < 1 else math.inf
            edge = min(max(est, found.eta), self.max_growth * found.eta)
            self._move(plan, hp, found.eta, Dir.UPDATE, self.kappa * found.eta, Dir.UPDATE)
            self.step_size = self.kappa * found.eta
        else:
            self.step_size = 0.0
        super()._commit(plan, hp, found, eta_before)
        if edge is not None:
            self.eta = edge
            self._sync_lr()


RULES = {"edge_fraction": EdgeFraction}


class RatioControl(ALSALS):
    """Trial at the step it will take; steer eta so the measured decrease ratio meets a target.

    A searching step tries eta itself (no growth), along the momentum direction, with the plain
    Armijo test (``c``) as the safeguard.  After an accepted trial, q = (L0 - L_try) / (eta *
    slope) is the fraction of the linear decrease the step achieved; in a quadratic model along
    the line q = 1 - eta / (2 * eta_min), so ``target`` = 0.75 steps at half the line minimum.
    The next eta is eta * ((1 - target) / (1 - q)) ** damping, clipped to [1/max_change,
    max_change] per search.  A trial whose loss equals L0 (the loss cannot resolve the step)
    leaves eta as it is.  The trial point is the update: no extra pass.
    """

    def __init__(self, params, *, target: float = 0.75, damping: float = 1.0, max_change: float = 2.0,
                 **kwargs):
        super().__init__(params, **kwargs)
        if not self.hyper.momentum_search:
            raise ValueError("RatioControl searches along the momentum direction (variant='alsals')")
        self.target, self.damping, self.max_change = target, damping, max_change

    def _first_trial_eta(self, searching: bool) -> float:
        return self.eta

    def _commit(self, plan, hp, found, eta_before):
        ALSALS._commit(self, plan, hp, found, eta_before)
        if not found.accepted or found.skipped or found.loss_try == found.loss0 or not found.slope > 0:
            return
        self._steer(found.eta, self._ratio((found.loss0 - found.loss_try) / (found.eta * found.slope)))

    def _ratio(self, q_now: float) -> float:
        """The decrease ratio eta is steered by: this search's."""
        return q_now

    def _steer(self, eta: float, q: float) -> None:
        factor = ((1 - self.target) / (1 - q)) ** self.damping if q < 1 else math.inf
        self.eta = eta * min(self.max_change, max(1 / self.max_change, factor))
        self._sync_lr()


RULES["ratio_control"] = RatioControl


class SmoothedRatioControl(RatioControl):
    """RatioControl steered by smoothed evidence: q is an exponential moving average
    (``q_smoothing``, bias-corrected) of the per-search ratios, each clipped to [-1, 1], so one
    noisy mini-batch moves eta by little.  (Averaging the decreases and the linear decreases
    separately failed: their early, large values dominate for hundreds of searches, the same
    freeze as the smoothed Armijo test, and eta collapsed to 1e-10 on all five workloads.)  Every
    step searches while t <= ``warmup_searches`` (the scale is found early), then as
    ``line_search_every`` says."""

    def __init__(self, params, *, q_smoothing: float = 0.9, warmup_searches: int = 10, **kwargs):
        super().__init__(params, **kwargs)
        self.q_smoothing, self.warmup_searches = q_smoothing, warmup_searches
        self._q_avg, self._q_weight = 0.0, 0.0

    def _searches_at(self, t: int) -> bool:
        return t <= self.warmup_searches or super()._searches_at(t)

    def _ratio(self, q_now: float) -> float:
        b = self.q_smoothing
        self._q_avg = b * self._q_avg + (1 - b) * min(1.0, max(-1.0, q_now))
        self._q_weight = b * self._q_weight + (1 - b)
        return self._q_avg / self._q_weight


RULES["smoothed_ratio_control"] = SmoothedRatioControl


def _loss_at(point, params, module, closure) -> float:
    """The closure's loss with the params at ``point``.  Afterwards the params, the module's
    buffers and the RNG are as they were, so the gradient forward draws the same dropout masks."""
    now = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in module.buffers()] if module is not None else []
    for p, w in zip(params, point):
        p.copy_(w)
    rng = torch.get_rng_state()
    loss = float(closure())
    torch.set_rng_state(rng)
    for p, w in zip(params, now):
        p.copy_(w)
    if module is not None:
        for b, v in zip(module.buffers(), buffers):
            b.copy_(v)
    return loss


class NextBatchProbe(ALSALS):
    """Steer eta by the next mini-batch instead of the same one: after a step from w to
    w' = w - eta*d, the next step's batch is evaluated once more at w + gamma*(w' - w) (gamma =
    ``probe_factor`` or its inverse, alternately) with the gradient forward's dropout masks; when
    that loss is below the gradient forward's (at w'), eta moves towards gamma*eta by
    gamma**``probe_gain`` (``probe_gain_down`` when gamma < 1: a smaller value offsets the one-step
    comparison's preference for small steps).  The batch is independent of d, so the comparison estimates which of
    the two step sizes lowers the expected loss (the same-batch Armijo test favours steps that
    fit the batch).  One extra forward every ``probe_every`` steps; the searches run as
    ``line_search_every`` says (the first one finds the scale)."""

    def __init__(self, params, *, probe_every: int = 4, probe_factor: float = 2.0, probe_gain: float = 0.3,
                 probe_gain_down: float | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.probe_every, self.probe_factor, self.probe_gain = probe_every, probe_factor, probe_gain
        self.probe_gain_down = probe_gain if probe_gain_down is None else probe_gain_down
        self.probe_forwards = 0
        self._before: list = []            # the parameters before the last step, when it is probed
        self._probes = 0

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        module = self._buffer_module
        loss_alt = None
        if self._before:
            gamma = self.probe_factor if self._probes % 2 else 1 / self.probe_factor
            with torch.no_grad():
                loss_alt = _loss_at([w + gamma * (p - w) for p, w in zip(params, self._before)],
                                    params, module, closure)
            self.probe_forwards += 1
        self._before = ([p.detach().clone() for p in params]
                        if (self.t + 1) % self.probe_every == 0 else [])
        loss = super().step(closure)
        if loss_alt is not None:
            if loss_alt < float(loss.detach()):
                self.eta = self.eta * gamma ** (self.probe_gain if gamma > 1 else self.probe_gain_down)
                self._sync_lr()
            self._probes += 1
        return loss


RULES["next_batch_probe"] = NextBatchProbe


def _quad_min(L0: float, L1: float, G1: float) -> float:
    """Minimizer in s of the quadratic with f(0) = L0, f(1) = L1, f'(1) = G1; inf when it is not
    convex, nan when an input is not finite."""
    if not all(math.isfinite(v) for v in (L0, L1, G1)):
        return math.nan
    a = G1 - (L1 - L0)
    return (G1 - 2 * (L1 - L0)) / (2 * a) if a > 0 else math.inf


class QuadProbe(ALSALS):
    """Steer eta by a quadratic model of the next mini-batch's loss along the last displacement.

    An anchor w (the parameters) is kept ``probe_horizon`` steps before a probe; the probe step's
    batch is evaluated once more at w (the gradient forward's random numbers and buffers), and
    with the gradient forward's loss and gradient at the current point w' it gives the quadratic
    along w -> w' (value at both ends, slope at w'), whose minimizer s_q is in units of the
    displacement.  eta *= clip(kappa * s_q, 1/max_change, max_change) ** probe_gain: uphill
    (s_q <= 0) at the low clip, a non-convex fit at the high one.  One probe forward every
    ``probe_every`` steps; the searches run as ``line_search_every`` says (the first one finds
    the scale).  ``kappa`` is where the diagnostic (probe.py --mode next) puts the best Adam
    rate: s_q at that rate is about 1 / kappa."""

    def __init__(self, params, *, probe_every: int = 4, probe_horizon: int | None = None, kappa: float = 1.0,
                 probe_gain: float = 0.3, max_change: float = 4.0, **kwargs):
        super().__init__(params, **kwargs)
        self.probe_every, self.kappa, self.probe_gain, self.max_change = probe_every, kappa, probe_gain, max_change
        self.probe_horizon = probe_every if probe_horizon is None else probe_horizon
        if not 1 <= self.probe_horizon <= probe_every:
            raise ValueError(f"probe_horizon must be in [1, probe_every], got {self.probe_horizon}")
        self.probe_forwards = 0
        self._anchor: list = []            # the parameters probe_horizon steps before the next probe
        self._anchor_n = -1                # the step (count from 0) they were saved before
        self._n = 0
        self._g1: float | None = None
        self.estimates: list = []          # (t, s_q): for the record

    def _update(self, closure, loss0, searching, rng_before):
        if self._g1 is not None:           # the gradient at w' along w' - w, before the update moves w'
            params = [p for g in self.param_groups for p in g["params"]]
            self._g1 = float(sum((p.grad * (p - w)).sum() for p, w in zip(params, self._anchor)
                                 if p.grad is not None))
        super()._update(closure, loss0, searching, rng_before)

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        module = self._buffer_module
        loss0, n, k = None, self._n, self.probe_every
        anchor = ([p.detach().clone() for p in params] if n % k == (k - self.probe_horizon) % k else None)
        if self._anchor and n - self._anchor_n == self.probe_horizon:
            with torch.no_grad():
                loss0 = _loss_at(self._anchor, params, module, closure)
            self.probe_forwards += 1
            self._g1 = 0.0
        loss = super().step(closure)
        if loss0 is not None:
            s_q = _quad_min(loss0, float(loss.detach()), self._g1)
            self._g1, self._anchor = None, []
            if not math.isnan(s_q):
                r = min(self.max_change, max(1 / self.max_change, self.kappa * s_q))
                self.eta = self.eta * r ** self.probe_gain
                self._sync_lr()
                self.estimates.append((self.t, s_q))
        if anchor is not None:
            self._anchor, self._anchor_n = anchor, n
        self._n += 1
        return loss


RULES["quad_probe"] = QuadProbe


# -- a statistical stationarity test that drops eta (Zhang, Lang, Liu and Xiao 2020, "SALSA") ----
@functools.lru_cache(maxsize=None)
def _t_quantile(p: float, dof: int) -> float:
    """q with P(T <= q) = p for Student's t with ``dof`` degrees of freedom (bisection)."""
    if p < 0.5:
        return -_t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while 1.0 - 0.5 * betainc(dof / 2, 0.5, dof / (dof + hi * hi)) < p:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 1.0 - 0.5 * betainc(dof / 2, 0.5, dof / (dof + mid * mid)) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class _LeakyBucket:
    """The samples since the last reset, of which the most recent ceil(n / ratio) are kept."""

    def __init__(self, ratio: int):
        self.ratio, self.values, self.total = ratio, [], 0

    def add(self, value) -> None:
        self.total += 1
        self.values.append(value)
        keep = -(-self.total // self.ratio)
        del self.values[:-keep]

    def reset(self) -> None:
        self.values, self.total = [], 0


def _stationary(window: list, significance: float, composite: bool) -> bool:
    """The batch-means confidence interval test of a zero mean.  The mean of ``window`` has a
    1 - significance interval from non-overlapping batch means (batch size floor(sqrt(n)), which
    accounts for the samples' correlation along the run); stationary when it contains 0 and the
    two halves' means have the same sign.  ``composite`` (the first test): the interval of the
    same width around each half's mean must contain 0, which refuses a transient that crosses 0."""
    n = len(window)
    size = math.isqrt(n)
    k = n // size
    mean = sum(window) / n
    means = [sum(window[i * size:(i + 1) * size]) / size for i in range(k)]
    std = math.sqrt(size * sum((m - mean) ** 2 for m in means) / (k - 1))
    half_width = std * _t_quantile(1 - significance / 2, k - 1) / math.sqrt(n)
    m1, m2 = sum(window[:n // 2]) / (n // 2), sum(window[n // 2:]) / (n - n // 2)
    if composite:
        return abs(m1) < half_width and abs(m2) < half_width and m1 * m2 > 0
    return abs(mean) < half_width and m1 * m2 > 0


def _significantly_lower(after: list, before: list, significance: float) -> bool:
    """One-sided Welch t-test: is the mean of ``after`` below the mean of ``before``?"""
    na, nb = len(after), len(before)
    ma, mb = sum(after) / na, sum(before) / nb
    va = sum((x - ma) ** 2 for x in after) / (na - 1)
    vb = sum((x - mb) ** 2 for x in before) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 <= 0:
        return ma < mb
    dof = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return (ma - mb) / math.sqrt(se2) < _t_quantile(significance, max(1, int(dof)))


def _loss_stopped_falling(bucket: "_LeakyBucket", min_samples: int, significance: float) -> bool:
    """The loss-regression test of the drops and the switch: more than ``min_samples`` losses kept
    and no significant downward trend among them."""
    points = bucket.values
    return len(points) > min_samples and not _still_decreasing(points, significance)


def _still_decreasing(points: list, significance: float) -> bool:
    """One-sided t-test of a negative slope of the losses against the step number."""
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    syy = sum((v - my) ** 2 for _, v in points)
    sxy = sum((t - mx) * (v - my) for t, v in points)
    if sxx <= 0 or syy <= 0:
        return False
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    dof = n - 2
    t_stat = r * math.sqrt(dof / max((1 - r) * (1 + r), 1e-300))
    return t_stat < _t_quantile(significance, dof)


class StatisticalDrop(ALSALS):
    """The driver's own search warms eta up (phase 1); then eta is held constant with no trial
    forwards, and dropped by ``drop_factor`` whenever a statistical test finds the iterates
    stationary (Zhang, Lang, Liu and Xiao 2020, arXiv 2002.10597, "SALSA", after Lang, Zhang
    and Xiao 2019, "SASA").

    The test holds for any update x' = x + D: at a stationary distribution E||x'||^2 = E||x||^2,
    so the per-step samples z = -(2<x, D> + ||D||^2) / (2 eta) have mean 0 (for D = -eta*d this
    is the reference code's <x', d> + eta/2 ||d||^2).  They go into a leaky bucket that keeps the
    most recent 1/``leak_ratio`` of the samples since the last drop; every ``test_every`` steps,
    once it holds more than ``min_samples``, the batch-means interval test (``_stationary``) runs
    at ``significance``, the composite form before the first drop.  A drop resets the bucket.

    The switch from the search to the constant rate is the reference's automatic one: the first
    drop (the test runs from step 1, during the search too), or, when ``loss_switch``, a one-sided
    regression test that no longer finds the training loss decreasing (a leaky bucket of the
    losses, as large, at the same significance).  Substitute: the losses are every step's
    gradient-forward loss, where the reference records the line search's f0 and searches at
    every step (the cheap search here runs every ``line_search_every`` steps).  Deviation: the
    reference also zeroes SGD's momentum buffer at a drop; Adam's moments are left as they are
    (host decisions only).

    ``drop_test="loss"`` (not the paper's test): the drops come from the loss regression test
    instead, every ``test_every`` steps on the losses since the last drop (the same condition,
    E f(x') = E f(x), with the training loss as the test function); the first drop is the
    switch.  Tried because without weight decay ||x||^2 grows through every run here (the norm
    test's samples have a clearly negative mean: results/experiments.md, round 7).

    Prototype: z is computed here from the parameters before and after the step (a host clone
    per step).  A fused build needs two more reductions in the step pass, sum(w0 * d) and
    sum(d * d) along the direction the step takes (z = sum(w0*d) - eta/2 * sum(d*d) for the
    step w0 - eta*d, whichever eta the search accepts), read with the step's verdict.
    """

    def __init__(self, params, *, drop_factor: float = 10.0, significance: float = 0.05, leak_ratio: int = 8,
                 min_samples: int = 1000, test_every: int = 100, loss_switch: bool = True, drop_test: str = "norm",
                 drop_check: int = 0, hold_while_rising: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        # drop_check = W > 0: a drop is kept only if the mean loss of the last W/2 of the W steps
        # after it is significantly below the mean of the W steps before it (one-sided Welch test);
        # otherwise eta goes back up (and, for the first drop, the searches resume).  A plateau
        # also looks "no longer decreasing", and a lower eta does not help there.
        self.drop_check = drop_check
        # hold_while_rising (round 11): before the first drop, no drop while the searches are still
        # raising eta, i.e. while eta is above its value at the oldest loss the test looks at
        self.hold_while_rising = hold_while_rising
        self._eta_after: dict = {}               # step -> eta after it (hold_while_rising)
        self._recent: list = []
        self._check = None          # (step of the drop, losses before it, was it the first drop)
        if drop_test not in ("norm", "loss", "pflug"):
            raise ValueError(f"StatisticalDrop: drop_test must be 'norm', 'loss' or 'pflug', got {drop_test!r}")
        if not drop_factor > 1 or not 0 < significance < 1:
            raise ValueError(f"StatisticalDrop: drop_factor must be > 1 and 0 < significance < 1, got "
                             f"{drop_factor}, {significance}")
        if leak_ratio < 1 or min_samples < 4 or test_every < 1:
            raise ValueError(f"StatisticalDrop: leak_ratio >= 1, min_samples >= 4 and test_every >= 1 are "
                             f"needed, got {leak_ratio}, {min_samples}, {test_every}")
        self.drop_factor, self.significance, self.min_samples = drop_factor, significance, min_samples
        self.test_every, self.loss_switch, self.drop_test = test_every, loss_switch, drop_test
        self._samples, self._losses = _LeakyBucket(leak_ratio), _LeakyBucket(leak_ratio)
        self._composite = True
        self._previous_grads: list = []          # drop_test="pflug": the last step's gradient
        self.switched_at: int | None = None      # the step after which eta is constant
        self.switch_reason = ""
        self.drops: list = []                    # (step, eta after the drop)
        self.reverted: list = []                 # (step, step of the drop it undid)

    @property
    def events(self) -> dict:
        return dict(switched_at=self.switched_at, switch_reason=self.switch_reason, drops=self.drops,
                    reverted=self.reverted)

    def _searches_at(self, t: int) -> bool:
        return self.switched_at is None and super()._searches_at(t)

    def step(self, closure=None):
        by_norm = self.drop_test == "norm"      # the loss test needs no parameter snapshot
        params = [p for g in self.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params] if by_norm else []
        loss = super().step(closure)
        info, t = self.last_step, self.t
        if self.drop_test == "pflug" and not info.skipped:
            self._add_gradient_cosine(params)
        if by_norm and info.accepted and not info.skipped and info.eta > 0:
            with torch.no_grad():
                cross = sq = 0.0
                for p, w in zip(params, before):
                    delta = (p.detach() - w).double()
                    cross += float((w.double() * delta).sum())
                    sq += float((delta * delta).sum())
            z = -(2 * cross + sq) / (2 * float(info.eta))
            if math.isfinite(z):
                self._samples.add(z)
        if self.hold_while_rising and self.switched_at is None:
            self._eta_after[t] = self.eta
        by_loss = self.drop_test == "loss"
        if by_loss or (self.switched_at is None and self.loss_switch):
            self._losses.add((t, float(info.loss)))
        if self._eta_after and self._losses.values:      # keep the steps the test can still read
            oldest = self._losses.values[0][0]
            while self._eta_after and next(iter(self._eta_after)) < oldest:
                del self._eta_after[next(iter(self._eta_after))]
        if not by_loss and self.switched_at is None and self.loss_switch and \
                _loss_stopped_falling(self._losses, self.min_samples, self.significance):
            self.switched_at, self.switch_reason = t, "loss"
        if self.drop_check:
            self._recent = (self._recent + [float(info.loss)])[-self.drop_check:]
            if self._check is not None and t == self._check[0] + self.drop_check:
                self._judge_drop(t)
        if self._check is None and t % self.test_every == 0 and self._drop_now():
            if self.drop_check and len(self._recent) == self.drop_check:
                self._check = (t, list(self._recent), self.switched_at is None)
            self.eta /= self.drop_factor
            self._sync_lr()
            self._samples.reset()
            self._losses.reset()
            self._composite = False
            self.drops.append((t, self.eta))
            if self.switched_at is None:
                self.switched_at, self.switch_reason = t, self.drop_test
        return loss

    def _judge_drop(self, t: int) -> None:
        at, before, first = self._check
        self._check = None
        after = self._recent[len(self._recent) // 2:]
        if _significantly_lower(after, before, self.significance):
            return
        self.eta *= self.drop_factor
        self._sync_lr()
        self._losses.reset()
        self.reverted.append((t, at))
        if first:
            self.switched_at, self.switch_reason = None, ""

    def _add_gradient_cosine(self, params) -> None:
        """Pflug's diagnostic in the form of Chee and Toulis (2018, "Convergence diagnostics for
        stochastic gradient descent with constant learning rate"): successive gradients point the
        same way while the iterates drift (a transient, a plateau) and against each other once
        they bounce around a stationary point; here as the cosine, so the falling gradient scale
        does not weight the early steps."""
        with torch.no_grad():
            grads = [p.grad.detach().reshape(-1).to(torch.float64, copy=True) if p.grad is not None else None
                     for p in params]
            if self._previous_grads:
                dot = na = nb = 0.0
                for a, b in zip(grads, self._previous_grads):
                    if a is not None and b is not None:
                        dot += float((a * b).sum())
                        na += float((a * a).sum())
                        nb += float((b * b).sum())
                if na > 0 and nb > 0:
                    self._samples.add(dot / math.sqrt(na * nb))
            self._previous_grads = grads

    def _drop_now(self) -> bool:
        if self.hold_while_rising and self.switched_at is None and self._losses.values:
            oldest = self._losses.values[0][0]
            if self.eta > self._eta_after.get(oldest, math.inf):
                return False             # the searches still raise eta over the test's window
        if self.drop_test == "loss":     # E f(x') = E f(x) with the loss as the test function
            return _loss_stopped_falling(self._losses, self.min_samples, self.significance)
        if self.drop_test == "pflug":    # the recent successive gradients point against each other
            window = self._samples.values
            return len(window) > self.min_samples and sum(window) < 0
        window = self._samples.values
        return len(window) > self.min_samples and _stationary(window, self.significance, self._composite)


RULES["statistical_drop"] = StatisticalDrop


class PerUnitSearch:
    """Per-unit step sizes, as in the authors' follow-up for transformers (PLASLS: Kenneweg,
    Galli, Kenneweg and Hammer 2024, arXiv 2403.18506, whose package searches one layer group per
    step, in turn): a prototype in plain PyTorch, not a driver subclass, since the driver's eta is
    one scalar on every backend.

    ADAM's direction with momentum d = m_hat / (sqrt(v_hat) + eps); a unit is a parameter with
    two or more dimensions together with the one-dimensional parameters after it (biases, norm
    scales), so roughly a layer; ``units="global"`` makes one unit of everything (the same search
    with one eta, the control).  Step 1 searches all units together from ``init_step_size``
    (backtracking by ``first_backtrack``) and gives every unit the eta it accepts.  Then every
    ``line_search_every``-th step searches one unit, round robin: the trials move that unit alone
    (the others stay at w0) along its d, from its eta grown by ``growth`` per step since its last
    search, backtracking by ``backtrack``, with the plain Armijo test L_try <= L0 - c * eta *
    <g_u, d_u> on the gradient forward's batch (random numbers replayed, ``buffers`` restored).  A
    unit whose <g_u, d_u> is not positive is not searched this time.  The step then moves every
    unit by its own eta.

    ``drop_factor`` adds the loss-regression drop of ``StatisticalDrop(drop_test="loss")``: once
    the training loss no longer falls significantly, every eta is divided by it and the searches
    stop."""

    standalone = True          # methods.AlsalsAdapter passes the candidate's fields as arguments

    def __init__(self, params, *, variant: str = "alsals", line_search_every: int = 4, buffers=None,
                 init_step_size: float = 0.025, c: float = 0.5, growth: float = 1.004, backtrack: float = 0.7,
                 first_backtrack: float = 0.5, max_trials: int = 30, betas=(0.9, 0.999), eps: float = 1e-8,
                 units: str = "layer", drop_factor: float = 0.0, significance: float = 0.05,
                 leak_ratio: int = 2, min_samples: int = 50, test_every: int = 10):
        if variant != "alsals" or not isinstance(line_search_every, int) or units not in ("layer", "global"):
            raise ValueError("PerUnitSearch: variant 'alsals', an int line_search_every and units "
                             f"'layer' | 'global' are needed; got {variant!r}, {line_search_every!r}, {units!r}")
        self.params = [p for p in params if p.requires_grad]
        self.units: list = []
        for p in self.params:
            if units == "global" and self.units:
                self.units[0].append(p)
            elif p.dim() >= 2 or not self.units:
                self.units.append([p])
            else:
                self.units[-1].append(p)
        self.every, self.module = line_search_every, buffers
        self.init_step_size, self.c, self.growth = init_step_size, c, growth
        self.backtrack, self.first_backtrack, self.max_trials = backtrack, first_backtrack, max_trials
        self.betas, self.eps = betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.etas = [init_step_size] * len(self.units)
        self.searched_at = [0] * len(self.units)
        self.next_unit, self.t = 0, 0
        self.counters = dict(rejected=0, searches=0, fallbacks=0, skipped=0)
        self.last_step = None
        self.drop_factor, self.significance, self.min_samples = drop_factor, significance, min_samples
        self.test_every = test_every
        self._losses = _LeakyBucket(leak_ratio)
        self.switched_at = None
        self.drops: list = []

    @property
    def step_size(self) -> float:
        """The units' etas as one number for the harness's plots: the size-weighted geometric mean."""
        sizes = [sum(p.numel() for p in unit) for unit in self.units]
        logs = sum(n * math.log(e) for n, e in zip(sizes, self.etas))
        return math.exp(logs / max(1, sum(sizes)))

    @property
    def events(self) -> dict:
        return dict(switched_at=self.switched_at, drops=self.drops, final_etas=list(self.etas))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self, closure):
        self.t = t = self.t + 1
        rng_before = torch.get_rng_state()
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        loss0 = float(loss.detach())
        b1, b2 = self.betas
        with torch.no_grad():
            direction = {}
            for p, m, v in zip(self.params, self.m, self.v):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                direction[p] = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.eps)
            searching = t == 1 or (self.switched_at is None and t % self.every == 0)
            trials, accepted = 0, True
            if searching and math.isfinite(loss0):
                u = None if t == 1 else self.next_unit
                trials, accepted = self._search(u, direction, closure, loss0, rng_before, t)
            for unit, eta in zip(self.units, self.etas):
                for p in unit:
                    p.sub_(direction[p], alpha=eta)
        self._drop(t, loss0)
        self.last_step = types.SimpleNamespace(loss=loss0, eta=self.step_size, trials=trials, accepted=accepted,
                                               searched=trials > 0, skipped=False)
        return loss.detach()

    def _search(self, u, direction, closure, loss0, rng_before, t):
        unit = self.params if u is None else self.units[u]
        if u is not None:
            self.next_unit = (u + 1) % len(self.units)
        slope = sum(float((p.grad * direction[p]).sum()) for p in unit if p.grad is not None)
        if not slope > 0:
            return 0, True
        eta = self.init_step_size if u is None else self.etas[u] * self.growth ** (t - self.searched_at[u])
        factor = self.first_backtrack if u is None else self.backtrack
        w0 = [p.detach().clone() for p in unit]
        saved = [b.detach().clone() for b in self.module.buffers()] if self.module is not None else []
        rng_after = torch.get_rng_state()
        trials, accepted = 0, False
        while trials < self.max_trials:
            for p, w in zip(unit, w0):
                torch.sub(w, direction[p], alpha=eta, out=p)
            torch.set_rng_state(rng_before)
            loss_try = float(closure())
            trials += 1
            if math.isfinite(loss_try) and loss_try <= loss0 - self.c * eta * slope:
                accepted = True
                break
            eta *= factor
        for p, w in zip(unit, w0):
            p.copy_(w)
        for b, s in zip(self.module.buffers() if self.module is not None else [], saved):
            b.copy_(s)
        torch.set_rng_state(rng_after)
        self.counters["searches"] += 1
        if not accepted:
            self.counters["rejected"] += 1
        elif u is None:
            self.etas = [eta] * len(self.units)
        else:
            self.etas[u] = eta
        if u is not None:
            self.searched_at[u] = t
        else:
            self.searched_at = [t] * len(self.units)
        return trials, accepted

    def _drop(self, t: int, loss0: float) -> None:
        if not self.drop_factor:
            return
        self._losses.add((t, loss0))
        if t % self.test_every == 0 and _loss_stopped_falling(self._losses, self.min_samples, self.significance):
            self.etas = [e / self.drop_factor for e in self.etas]
            self._losses.reset()
            self.drops.append((t, self.step_size))
            if self.switched_at is None:
                self.switched_at = t


RULES["per_unit_search"] = PerUnitSearch
