"""The plateau test of the ``alsals_plateau`` variant (docs/algorithm.md section 2.1).

The searches set eta's scale; from the first drop on eta is held (no trial forwards) and divided
by ``drop_factor`` whenever the training loss has stopped falling: every ``drop_every`` steps,
once more than ``drop_min_samples`` losses are kept, a one-sided t-test of the regression slope of
the kept losses against the step number finds no significant decrease at ``drop_significance``.
The kept losses are the most recent half of those since the last drop (a leaky bucket, after
Zhang, Lang, Liu and Xiao 2020, "SALSA"), so the test forgets the fast early fall.

Cost: each step's loss stays where the closure left it (a reference to the detached 0-dim tensor,
no device operation); a test reads the losses since the last test with one stack and one read,
and keeps the regression sums incrementally (exact integers), so its host cost does not grow with
the window.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Deque, Dict, List, Tuple, Union

import torch
from torch import Tensor

LEAK_RATIO = 2          # keep the most recent ceil(n / 2) of the n losses since the last drop


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):           # the fraction converges fast below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    tail = 0.5 * betainc(dof / 2, 0.5, dof / (dof + t * t))
    return tail if t < 0 else 1.0 - tail


def slope_is_negative(n: int, sxx: float, syy: float, sxy: float, significance: float) -> bool:
    """One-sided t-test of a negative regression slope from the centred sums of n points."""
    if sxx <= 0 or syy <= 0 or sxy >= 0:
        return False
    r = max(-1.0, sxy / math.sqrt(sxx * syy))
    dof = n - 2
    t_stat = r * math.sqrt(dof / max((1 - r) * (1 + r), 1e-300))
    return t_cdf(t_stat, dof) < significance


Loss = Union[float, Tensor]


class PlateauTest:
    """The losses kept since the last drop and their exact regression sums.

    Entries are (t, loss); the newest ``unread`` of them are still device tensors.  The sums of
    the read entries are exact: each loss is the integer ``num`` times ``2**unit`` (a float is a
    dyadic rational; ``unit`` only falls, and the sums are rescaled when it does), so adding and
    forgetting entries leaves no rounding behind, and the test's inputs depend only on which
    losses are kept, not on when they were read (a checkpoint reads them early)."""

    def __init__(self) -> None:
        self.drops = 0                  # drops so far; the searches end at the first
        self.reset()

    def reset(self) -> None:
        self.kept: Deque[Tuple[int, Loss]] = collections.deque()
        self.total = 0                  # losses added since the last drop (the leak counts them)
        self.unread = 0
        self.unit = 0                   # <= 0: the sums of v are in units of 2**unit, of v*v of 4**unit
        self.st = self.stt = self.sv = self.svv = self.stv = 0     # exact ints

    def __len__(self) -> int:
        return len(self.kept)

    def add(self, t: int, loss: Tensor) -> None:
        self.kept.append((t, loss))
        self.unread += 1
        self.total += 1
        keep = -(-self.total // LEAK_RATIO)
        while len(self.kept) > keep:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        t, v = self.kept.popleft()
        if isinstance(v, Tensor):       # never read: not in the sums
            self.unread -= 1
            return
        self._accumulate(t, v, -1)

    def _accumulate(self, t: int, v: float, sign: int) -> None:
        num, den = v.as_integer_ratio()
        exponent = 1 - den.bit_length()             # v = num * 2**exponent (den a power of 2)
        if exponent < self.unit:                    # rescale the sums to the finer unit
            shift = self.unit - exponent
            self.sv <<= shift
            self.stv <<= shift
            self.svv <<= 2 * shift
            self.unit = exponent
        q = num << (exponent - self.unit)           # v in units of 2**unit
        self.st += sign * t
        self.stt += sign * t * t
        self.sv += sign * q
        self.svv += sign * q * q
        self.stv += sign * t * q

    def read(self) -> int:
        """Read the unread losses (one stack and one device read); returns the reads made."""
        if not self.unread:
            return 0
        fresh = [self.kept.pop() for _ in range(self.unread)][::-1]
        values = torch.stack([v for _, v in fresh]).tolist()   # type: ignore[misc]
        self.unread = 0
        for (t, _), v in zip(fresh, values):
            if not math.isfinite(v):            # a skipped step's loss says nothing of the trend
                self.total -= 1
                continue
            self.kept.append((t, v))
            self._accumulate(t, v, +1)
        return 1

    def plateaued(self, significance: float) -> bool:
        """No significant decrease of the kept losses (all read).  Losses that do not vary
        measured nothing (a fitted batch's exact 0): no plateau."""
        n = len(self.kept)
        if n < 3:
            return False
        # n times the centred sums, exactly, then one correctly rounded division each
        syy_n = n * self.svv - self.sv * self.sv
        if syy_n <= 0:
            return False
        sxx = (n * self.stt - self.st * self.st) / n
        syy = syy_n / (n << -2 * self.unit)                        # unit <= 0
        sxy = (n * self.stv - self.st * self.sv) / (n << -self.unit)
        return not slope_is_negative(n, sxx, syy, sxy, significance)

    # -- checkpoints (checkpoint.py validates; the losses are read first) ----------------------
    def state(self) -> Dict[str, Any]:
        self.read()
        return {"drops": self.drops, "total": self.total, "losses": [[t, float(v)] for t, v in self.kept]}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "PlateauTest":
        """From a validated state (checkpoint.validate); the sums are recomputed, exactly."""
        test = cls()
        test.drops, test.total = state["drops"], state["total"]
        losses: List[List[Any]] = state["losses"]
        for t, v in losses:
            test.kept.append((t, v))
            test._accumulate(t, v, +1)
        return test
