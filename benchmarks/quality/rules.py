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

import math

import torch

from alsals_fused import ALSALS
from alsals_fused.backends.base import Dir


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
                now = [p.detach().clone() for p in params]
                buffers = [b.detach().clone() for b in module.buffers()] if module is not None else []
                for p, w in zip(params, self._before):
                    p.copy_(w + gamma * (p - w))
                rng = torch.get_rng_state()
                loss_alt = float(closure())
                torch.set_rng_state(rng)       # the gradient forward draws the same dropout masks
                for p, w in zip(params, now):
                    p.copy_(w)
                if module is not None:
                    for b, v in zip(module.buffers(), buffers):
                        b.copy_(v)
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
                now = [p.detach().clone() for p in params]
                buffers = [b.detach().clone() for b in module.buffers()] if module is not None else []
                for p, w in zip(params, self._anchor):
                    p.copy_(w)
                rng = torch.get_rng_state()
                loss0 = float(closure())
                torch.set_rng_state(rng)       # the gradient forward draws the same dropout masks
                for p, w in zip(params, now):
                    p.copy_(w)
                if module is not None:
                    for b, v in zip(module.buffers(), buffers):
                        b.copy_(v)
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
