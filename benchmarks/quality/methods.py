"""The optimizers the quality harness compares, each behind one small adapter.

An adapter owns its optimizer and runs one training step on a closure; it reports the step's
mini-batch loss (the loss at the weights before the step, as every method here measures it),
the step size it used (eta for the line searches, lr for Adam) and the forward passes it ran.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from alsals_fused import ALSALS
from alsals_fused.config import VARIANTS, cooldown_steps, make_hyper

# Keyword arguments of the experimental rules (rules.py); every other key is a field of Hyper.
RULE_ARGUMENTS = ("kappa", "max_growth", "target", "damping", "max_change", "q_smoothing", "warmup_searches",
                  "probe_every", "probe_factor", "probe_gain", "probe_gain_down", "probe_horizon",
                  "drop_factor", "significance", "leak_ratio", "min_samples", "test_every", "loss_switch",
                  "drop_test", "drop_check", "hold_while_rising")
# A candidate's "total_steps": "budget" is replaced by the run's step budget (the cooldown option).
BUDGET = "budget"
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
ADAM_COOLDOWN = 0.2
ADAMW_COSINE = dict(peak_lr=3e-3, weight_decay=1e-2, warmup=0.05)


class Adapter:
    label: str = ""
    family: str = ""

    def step(self, closure: Callable[[], torch.Tensor]) -> Tuple[float, float, int]:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}

    def before_eval(self, model: nn.Module, batches) -> None:
        """Called once before the held-out evaluation (schedule-free AdamW switches points)."""


class AdamAdapter(Adapter):
    family = "adam"

    def __init__(self, model: nn.Module, lr: float, steps: int, cosine: bool = False,
                 weight_decay: float = 0.0, warmup: float = 0.0, cooldown: float = 0.0):
        cls = torch.optim.AdamW if cosine else torch.optim.Adam
        self.opt = cls(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.lr, self.steps, self.cosine = lr, steps, cosine
        self.warmup = max(1, int(round(warmup * steps))) if cosine else 0
        # the cooldown's length as ALSALS counts it (config.cooldown_steps)
        self.cooldown_steps = cooldown_steps(make_hyper("alsals", total_steps=steps, cooldown_fraction=cooldown)) \
            if cooldown else 0
        self.t = 0

    def _lr(self) -> float:
        if self.cooldown_steps:       # constant, then linear to 0 over the last steps (ALSALS's total_steps=)
            left = self.steps - self.t + 1
            return self.lr * min(1.0, left / (self.cooldown_steps + 1))
        if not self.cosine:
            return self.lr
        if self.t <= self.warmup:
            return self.lr * self.t / self.warmup
        frac = (self.t - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def step(self, closure):
        self.t += 1
        lr = self._lr()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        self.opt.step()
        return float(loss.detach()), lr, 1


class AlsalsAdapter(Adapter):
    family = "alsals"

    def __init__(self, model: nn.Module, variant: str, line_search_every, has_buffers: bool,
                 overrides: Optional[dict] = None, steps: Optional[int] = None):
        overrides = dict(overrides or {})
        if overrides.get("total_steps") == BUDGET:
            overrides["total_steps"] = steps
        rule = overrides.pop("rule", None)
        if rule is not None:   # an experimental host rule (rules.py) with its own keyword arguments
            from .rules import RULES
            cls = RULES[rule]
            # a standalone prototype (not a driver subclass) takes every field of the candidate
            names = list(overrides) if getattr(cls, "standalone", False) else RULE_ARGUMENTS
            rule_kwargs = {k: overrides.pop(k) for k in names if k in overrides}
            self.opt = cls(model.parameters(), variant=variant, line_search_every=line_search_every,
                           buffers=model if has_buffers else None, **rule_kwargs)
        else:
            self.opt = ALSALS(model.parameters(), variant=variant, line_search_every=line_search_every,
                              buffers=model if has_buffers else None)
        if overrides:          # candidate rules: fields of Hyper (config.py), validated there
            from alsals_fused.config import make_hyper
            base = dataclasses.asdict(self.opt.hyper)
            base.pop("variant")
            base.update(overrides)
            self.opt.hyper = make_hyper(variant, **base)
            self.opt.eta = self.opt.hyper.init_step_size
            self.opt._sync_lr()        # the lr mirrors follow eta (an init_step_size override)
        self.first_trials: Optional[int] = None
        self.rejected_run = self.max_rejected_run = 0

    def step(self, closure):
        self.opt.zero_grad(set_to_none=True)
        probes = getattr(self.opt, "probe_forwards", 0)
        self.opt.step(closure)
        probes = getattr(self.opt, "probe_forwards", 0) - probes     # a rule's forwards outside the search
        info = self.opt.last_step
        if self.first_trials is None:
            self.first_trials = info.trials
        if info.searched and not info.accepted and not info.skipped:
            self.rejected_run += 1
            self.max_rejected_run = max(self.max_rejected_run, self.rejected_run)
        elif info.searched:
            self.rejected_run = 0
        eta = getattr(self.opt, "step_size", None)
        return float(info.loss), float(eta if eta is not None else info.eta), 1 + info.trials + probes

    def summary(self):
        c = self.opt.counters
        out = dict(first_step_trials=self.first_trials, rejected=c["rejected"],
                   max_consecutive_rejected=self.max_rejected_run, searches=c["searches"],
                   fallbacks=c["fallbacks"], skipped=c["skipped"])
        events = getattr(self.opt, "events", None)      # a rule's record (rules.py), into the JSON rows
        if events is not None:
            out["rule_events"] = events
        return out


class SalsaPackageAdapter(Adapter):
    """The authors' SaLSA package (``pip install salsa-optimizer``), with its defaults.

    Its closure takes ``backwards=`` and runs backward itself.  It reseeds torch from
    ``int(time.time())`` around every forward; the harness gives its module a clock that counts
    steps instead, so runs are reproducible (this only changes which dropout masks it draws).
    Its trial forwards move BatchNorm statistics (it has no buffers option)."""

    family = "salsa_pkg"

    def __init__(self, model: nn.Module, seed: int):
        from salsa import SaLSA as module
        self._module = module
        self._clock = [seed * 1_000_000]
        module.time = types.SimpleNamespace(time=lambda: self._clock[0])
        self.opt = module.SaLSA(model.parameters())
        self.model = model

    def step(self, closure):
        self._clock[0] += 1
        before = self.opt.state["n_forwards"]

        def closure_b(backwards=False):
            if backwards:
                self.opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = closure()
                loss.backward()
                return loss.detach()
            with torch.no_grad():
                return closure()
        loss = self.opt.step(closure_b)
        fwd = self.opt.state["n_forwards"] - before
        # Non-searching steps run no forward that it counts beyond the gradient's.
        return float(loss), float(self.opt.step_size), max(1, int(fwd))


class PeerAdapter(Adapter):
    """A learning-rate-free optimizer people compare against, with its documented defaults.

    ``before_eval`` is called before the held-out evaluation: schedule-free AdamW evaluates at its
    averaged point (``opt.eval()``), and a model with BatchNorm then needs its running statistics
    recomputed there, as the package's documentation says (a few training-mode forwards under
    ``no_grad``)."""

    def __init__(self, model: nn.Module, family: str):
        self.family, self.model = family, model
        params = model.parameters()
        if family == "prodigy":
            from prodigyopt import Prodigy
            self.opt = Prodigy(params, lr=1.0)
        elif family == "dadapt_adam":
            from dadaptation import DAdaptAdam
            self.opt = DAdaptAdam(params, lr=1.0)
        elif family == "schedulefree":
            from schedulefree import AdamWScheduleFree
            self.opt = AdamWScheduleFree(params)
            self.opt.train()
        else:
            raise ValueError(f"unknown peer {family!r}")

    def _step_size(self) -> float:
        g = self.opt.param_groups[0]
        d = g.get("d", 1.0)                      # Prodigy / D-Adapt: the estimated scale times lr
        return float(g["lr"]) * float(d)

    def step(self, closure):
        self.opt.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        self.opt.step()
        return float(loss.detach()), self._step_size(), 1

    def before_eval(self, model: nn.Module, batches) -> None:
        if self.family != "schedulefree":
            return
        self.opt.eval()
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            with torch.no_grad():
                for x, _ in batches:
                    model(x)
            model.eval()


PEERS = {"prodigy": ("prodigyopt", "Prodigy (lr=1)"), "dadapt_adam": ("dadaptation", "D-Adapt Adam (lr=1)"),
         "schedulefree": ("schedulefree", "schedule-free AdamW (lr=0.0025)")}


def peer_status(family: str) -> Optional[str]:
    """None when the peer's package imports; otherwise why it is skipped."""
    module = PEERS[family][0]
    try:
        __import__(module)
    except Exception as e:
        return f"{module} is not available ({type(e).__name__}: {e}); `pip install {module}`; {family} skipped"
    return None


def salsa_package_status() -> Optional[str]:
    """None when the authors' package imports; otherwise why it is skipped."""
    try:
        from salsa.SaLSA import SaLSA  # noqa: F401
    except Exception as e:              # not installed, or broken
        return (f"the authors' SaLSA package is not available ({type(e).__name__}: {e}); "
                "install it with `pip install --no-deps salsa-optimizer` (it needs torch and "
                "numpy); skipped")
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    family: str                      # adam | adamw_cosine | <variant> | salsa_pkg | <peer>
    make: Callable[..., Adapter]


def _line_search(variant: str, every, overrides: Optional[dict] = None, name: Optional[str] = None):
    mode = "auto" if every == "auto" else "every"
    nm = name or f"{variant}/{mode}"
    return Method(nm, nm, variant,
                  lambda model, steps, seed, wl: AlsalsAdapter(model, variant, every, wl.has_buffers,
                                                               overrides, steps))


def _adam_make(lr: float, cooldown: float = 0.0) -> Callable[..., Adapter]:
    return lambda model, steps, seed, wl: AdamAdapter(model, lr, steps, cooldown=cooldown)


def _peer_make(family: str) -> Callable[..., Adapter]:
    return lambda model, steps, seed, wl: PeerAdapter(model, family)


def all_methods(candidates: Optional[Dict[str, dict]] = None) -> List[Method]:
    out = [Method(f"adam@{lr:g}", f"Adam {lr:g}", "adam", _adam_make(lr))
           for lr in ADAM_GRID]
    # The same grid with the end-of-run cooldown that ALSALS's total_steps= gives a line search:
    # the fair baseline for a rule that knows the step budget.
    out += [Method(f"adam_cd@{lr:g}", f"Adam {lr:g} + cooldown {ADAM_COOLDOWN:g}", "adam_cooldown",
                   _adam_make(lr, ADAM_COOLDOWN)) for lr in ADAM_GRID]
    cfg = ADAMW_COSINE
    out.append(Method("adamw_cosine", f"AdamW {cfg['peak_lr']:g} warmup+cosine", "adamw_cosine",
                      lambda model, steps, seed, wl: AdamAdapter(
                          model, cfg["peak_lr"], steps, cosine=True,
                          weight_decay=cfg["weight_decay"], warmup=cfg["warmup"])))
    for variant in VARIANTS:
        for every in (1, "auto"):
            out.append(_line_search(variant, every))
        out.append(_line_search(variant, None, name=variant))     # the variant's own defaults
    out.append(Method("salsa_pkg", "SaLSA package (authors)", "salsa_pkg",
                      lambda model, steps, seed, wl: SalsaPackageAdapter(model, seed)))
    for family, (_, label) in PEERS.items():
        out.append(Method(family, label, family, _peer_make(family)))
    for name, spec in (candidates or {}).items():
        spec = dict(spec)
        variant = spec.pop("variant", "adaptive")
        every = spec.pop("line_search_every", "auto")
        out.append(_line_search(variant, every, spec, name=f"cand:{name}"))
    return out
