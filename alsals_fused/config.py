"""Variants, their defaults (docs/algorithm.md section 2) and argument validation."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple, Union

VARIANTS = ("alsals", "adam_sls", "salsa", "adaptive", "alsals_plateau")
DEFAULT_VARIANT = "alsals"          # ALSALS()'s
MOMENTUM_VARIANTS = ("alsals", "alsals_plateau")    # search along m_hat*p and keep the trial point
BACKENDS = ("auto", "reference", "foreach", "triton", "cuda")


@dataclass(frozen=True)
class Hyper:
    """Global hyperparameters (weight_decay is per param group and lives there)."""

    variant: str = "alsals"
    init_step_size: float = 0.1
    c: float = 0.5
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    smoothing: float = 0.99                     # b3 in docs/algorithm.md
    growth: float = 1 / 0.999
    backtrack: float = 0.9
    max_trials: int = 100
    line_search_every: Union[int, str] = 1      # k, or "auto" (SaLSA's rule)
    weight_decay: float = 0.0                   # default for groups that do not set their own
    max_grad_norm: Optional[float] = None
    memory_efficient: bool = False
    # Host-side search adaptation (the "adaptive" variant; neutral values for the others).
    first_backtrack: Optional[float] = None     # backtrack until a search accepts (None: backtrack)
    first_backtrack_on_rise: Optional[float] = None   # the same after a trial whose loss rose (None: first_backtrack)
    growth_boost: float = 1.0                   # growth *= this after a first-trial pass (1: off)
    growth_max: float = 1 / 0.999               # cap of the boosted growth
    # End-of-run cooldown for a known step budget (section 3); None: none, eta is the search's.
    total_steps: Optional[int] = None
    cooldown_fraction: float = 0.2              # the last fraction of total_steps that cools down
    # Plateau drops (the alsals_plateau variant, section 2.1; plateau.py): None: none.
    drop_factor: Optional[float] = None         # eta /= drop_factor when the loss stops falling
    drop_min_samples: int = 50                  # losses kept before the first test after a drop
    drop_every: int = 10                        # steps between tests
    drop_significance: float = 0.05             # one-sided level of the "still falling" test

    @property
    def momentum_search(self) -> bool:
        """alsals searches along m_hat*p; adam_sls, salsa and adaptive along g*p."""
        return self.variant in MOMENTUM_VARIANTS

    @property
    def update_is_trial_point(self) -> bool:
        """alsals keeps the accepted trial point; the others re-step from w0 along m_hat*p."""
        return self.variant in MOMENTUM_VARIANTS


VARIANT_DEFAULTS = {
    "alsals": Hyper(),
    "adam_sls": Hyper(variant="adam_sls", c=0.1, smoothing=0.0, growth=2 ** (1 / 500)),
    "salsa": Hyper(variant="salsa", c=0.3, smoothing=0.99, growth=2 ** (1 / 500),
                   line_search_every="auto"),
    # Not from a paper: SaLSA's search (along g*p, smoothed test, update along
    # m_hat*p, "auto") with a growth of 1% per search, so eta follows the scale the loss allows
    # through a run instead of staying near step 1's choice, and a first search that backtracks
    # by 0.3 (init 0.1 reaches 1e-3 in 4 trials).  Evidence: benchmarks/quality/README.md.
    "adaptive": Hyper(variant="adaptive", c=0.3, smoothing=0.99, growth=1.01, backtrack=0.9,
                      line_search_every="auto", first_backtrack=0.3),
    # Not from a paper: alsals's search every 4th step from a smaller first guess (0.025, halved
    # until a search accepts, quartered after a trial whose loss rose), its growth boosted by
    # 1.5x after each first-trial pass (at most 2% per search), until the plateau test first
    # finds the loss no longer falling; from then on eta is held and halved at each plateau, with
    # no trial forwards.  Evidence: benchmarks/quality/results/experiments.md, rounds 8, 9, 18.
    "alsals_plateau": Hyper(variant="alsals_plateau", init_step_size=0.025, line_search_every=4,
                            first_backtrack=0.5, first_backtrack_on_rise=0.25, growth=1.004,
                            growth_boost=1.5, growth_max=1.02, drop_factor=2.0),
}


def _require(ok: bool, name: str, value, accepted: str) -> None:
    if not ok:
        raise ValueError(f"ALSALS: {name}={value!r} is invalid; accepted: {accepted}")


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_weight_decay(wd) -> None:
    _require(_real(wd) and wd >= 0, "weight_decay", wd, "a finite float >= 0")


def _as_int(value):
    """Numpy ints and 0-dim integer tensors as ints; anything else unchanged (and refused, by
    name, by the validation if it is not an accepted value)."""
    if value is not None and not isinstance(value, (bool, int, str)) and hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except TypeError:                       # a float tensor: refused by the validation
            pass
    return value


def make_hyper(variant: str, **overrides) -> Hyper:
    """The variant's defaults with the explicit (non-None) arguments applied, validated."""
    _require(variant in VARIANTS, "variant", variant, " | ".join(VARIANTS))
    given = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(Hyper)} - {"variant"}
    unknown = set(given) - known
    if unknown:
        raise TypeError(f"ALSALS: unknown argument(s) {sorted(unknown)}")
    if "betas" in given:
        b = given["betas"]
        _require(isinstance(b, (tuple, list)) and len(b) == 2 and all(_real(x) and 0 <= x < 1 for x in b),
                 "betas", b, "a pair (beta1, beta2) with 0 <= beta < 1")
        given["betas"] = (float(b[0]), float(b[1]))
    for name in ("max_trials", "line_search_every", "total_steps", "drop_min_samples", "drop_every"):
        if name in given:
            given[name] = _as_int(given[name])
    h = replace(VARIANT_DEFAULTS[variant], **given)
    validate_hyper(h)
    return h


def require_budget_for_fraction(total_steps, cooldown_fraction) -> None:
    """A cooldown fraction is a fraction of a step budget: refused without one."""
    if cooldown_fraction is not None and total_steps is None:
        raise ValueError("ALSALS: cooldown_fraction= needs total_steps= (the run's step budget, "
                         "whose last fraction cools down)")


def with_budget(h: Hyper, total_steps, cooldown_fraction=None) -> Hyper:
    """``h`` with the run's step budget set (``ALSALS.set_total_steps``), validated as at
    construction; the cooldown fraction stays ``h``'s unless given (its default without a budget)."""
    total_steps = _as_int(total_steps)
    if total_steps is None:                       # no budget: the fraction goes back to its default
        fraction = VARIANT_DEFAULTS[h.variant].cooldown_fraction
    else:
        fraction = h.cooldown_fraction if cooldown_fraction is None else cooldown_fraction
    budgeted = replace(h, total_steps=total_steps, cooldown_fraction=fraction)
    validate_hyper(budgeted)
    return budgeted


def validate_hyper(h: Hyper) -> None:
    _require(_real(h.init_step_size) and h.init_step_size > 0, "init_step_size", h.init_step_size,
             "a finite float > 0")
    _require(_real(h.c) and 0 < h.c < 1, "c", h.c, "0 < c < 1")
    _require(_real(h.eps) and h.eps > 0, "eps", h.eps, "a finite float > 0")
    _require(_real(h.smoothing) and 0 <= h.smoothing < 1, "smoothing", h.smoothing, "0 <= smoothing < 1")
    _require(_real(h.growth) and h.growth >= 1, "growth", h.growth, "a finite float >= 1")
    _require(_real(h.backtrack) and 0 < h.backtrack < 1, "backtrack", h.backtrack, "0 < backtrack < 1")
    _require(h.first_backtrack is None or (_real(h.first_backtrack) and 0 < h.first_backtrack < 1),
             "first_backtrack", h.first_backtrack, "None or 0 < first_backtrack < 1")
    _require(h.first_backtrack_on_rise is None
             or (h.first_backtrack is not None and _real(h.first_backtrack_on_rise)
                 and 0 < h.first_backtrack_on_rise <= h.first_backtrack),
             "first_backtrack_on_rise", h.first_backtrack_on_rise,
             f"None, or 0 < first_backtrack_on_rise <= first_backtrack (={h.first_backtrack!r})")
    _require(_real(h.growth_boost) and h.growth_boost >= 1, "growth_boost", h.growth_boost, "a float >= 1")
    _require(_real(h.growth_max) and h.growth_max >= 1, "growth_max", h.growth_max, "a float >= 1")
    _require(isinstance(h.max_trials, int) and not isinstance(h.max_trials, bool) and h.max_trials >= 1,
             "max_trials", h.max_trials, "an int >= 1")
    k = h.line_search_every
    _require(k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
             "line_search_every", k, 'an int >= 1 or "auto"')
    validate_weight_decay(h.weight_decay)
    _require(h.max_grad_norm is None or (_real(h.max_grad_norm) and h.max_grad_norm > 0),
             "max_grad_norm", h.max_grad_norm, "None or a finite float > 0")
    _require(isinstance(h.memory_efficient, bool), "memory_efficient", h.memory_efficient, "True or False")
    _require(h.total_steps is None or (isinstance(h.total_steps, int) and not isinstance(h.total_steps, bool)
                                       and h.total_steps >= 1),
             "total_steps", h.total_steps, "None or an int >= 1")
    _require(_real(h.cooldown_fraction) and 0 < h.cooldown_fraction <= 1, "cooldown_fraction",
             h.cooldown_fraction, "0 < cooldown_fraction <= 1")
    _require(h.drop_factor is None or (_real(h.drop_factor) and h.drop_factor > 1), "drop_factor",
             h.drop_factor, "None or a finite float > 1")
    _require(isinstance(h.drop_min_samples, int) and not isinstance(h.drop_min_samples, bool)
             and h.drop_min_samples >= 3, "drop_min_samples", h.drop_min_samples, "an int >= 3")
    _require(isinstance(h.drop_every, int) and not isinstance(h.drop_every, bool) and h.drop_every >= 1,
             "drop_every", h.drop_every, "an int >= 1")
    _require(_real(h.drop_significance) and 0 < h.drop_significance < 0.5, "drop_significance",
             h.drop_significance, "0 < drop_significance < 0.5")
    validate_search_range(h.init_step_size, h)


def cooldown_steps(h: Hyper) -> int:
    """Steps of the end-of-run cooldown: the last ``cooldown_fraction`` of ``total_steps``, at
    least one (0 without ``total_steps``)."""
    if h.total_steps is None:
        return 0
    return max(1, round(h.cooldown_fraction * h.total_steps))


# -- the step sizes a search can represent ----------------------------------------------------------
# Kernels take eta as an fp32 argument and form w0 - eta*(d + wd*w0) in fp32, where |d| = |m_hat*p|
# stays below about 32 with the default betas.  A step size above ETA_MAX (or one that a single
# growth takes above it) could overflow a candidate even in fp32; one below ETA_MIN is no longer an
# fp32 normal number once multiplied by d.  The driver also caps growth at ETA_MAX and ends a
# search that would backtrack below ETA_MIN (docs/algorithm.md section 9).
ETA_MAX = 1e30
ETA_MIN = 1e-30


def validate_search_range(eta: float, h: Hyper, name: str = "init_step_size",
                          check_growth: bool = True) -> None:
    """eta (and eta*growth) must lie in [ETA_MIN, ETA_MAX] (ValueError naming the argument)."""
    _require(ETA_MIN <= eta <= ETA_MAX, name, eta, f"{ETA_MIN:g} <= {name} <= {ETA_MAX:g}")
    _require(not check_growth or eta * h.growth <= ETA_MAX, "growth", h.growth,
             f"{name}*growth <= {ETA_MAX:g} ({name}={eta!r}): a search must be able to represent "
             "the grown step size")
