"""ALSALS checkpoints: a versioned state_dict format, validated in full before anything changes.

Format (``FORMAT_VERSION = 2``)::

    {"state": {index_or_fqn: {"exp_avg": Tensor, "exp_avg_sq": Tensor}, ...},
     "param_groups": [{"params": [...], "weight_decay": float, "lr": float,
                       "alsals": HOST},          # group 0 only
                      {...}, ...]}

    HOST = {"format": 2, "variant": str, "hyper": {Hyper fields}, "eta": float, "t": int,
            "counters": {name: int}, "fast": float | None, "slow": float | None,
            "last_search_t": int, "h": float, "s": float, "pending_skips": int,
            "growth": float | None, "scale_found": bool,      # the last four optional
            "cooldown_from": float | None, "plateau": PLATEAU | None}

    PLATEAU = {"drops": int, "total": int, "losses": [[int, float], ...]}

``growth`` and ``scale_found`` (the host state of the ``adaptive`` variant's search rules),
``cooldown_from`` (eta when the cooldown began), ``plateau`` (the alsals_plateau variant's
plateau test, plateau.py: its drops, the count of losses since the last drop and the kept ones,
from which the exact regression sums are recomputed, so that a resumed run drops where the
uninterrupted one would) and the Hyper fields added with them may be missing from older
checkpoints: they then take their defaults (no adapted growth; a scale counts as found once t > 0;
no cooldown begun; no loss kept; the variant's default Hyper, so no ``total_steps``).

The host state lives inside ``param_groups[0]`` (not at the top level) because
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` / ``set_optimizer_state_dict``
keep only ``state`` and ``param_groups`` (and every key of a group).  The device scalars h, s and
the pending-skip count are stored as Python numbers (exact: they are float64 on the device), so
the checkpoint does not depend on the device or the backend that wrote it.  They are the only
persistent slots of the control vector (``Ctl.H``, ``Ctl.S``, ``Ctl.PENDING``): every other slot,
``Ctl.UNDO`` included, is written within a step before it is read, so none is saved and a load
starts them at zero.

Format 1 (written by the first release): the same ``state`` and ``param_groups`` plus a top-level
``"alsals"`` entry with h, s and pending_skips as 0-dim tensors (or None before the first step);
it still loads.

``validate(opt, state_dict)`` checks everything (group count and sizes, parameter indices,
required keys, tensor shapes, dtypes and devices, finiteness of the moments, the hyperparameters
as saved under the constructor's own checks (``config.validate_hyper``), a finite positive eta
inside the range a search can represent, integer t and counters) and returns a ``LoadPlan``
holding the already-converted values; ``ALSALS.load_state_dict`` applies it with assignments
that cannot fail, so an invalid checkpoint raises ``CheckpointError`` (a ValueError naming what
is wrong) and leaves the optimizer exactly as it was.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, NoReturn, Optional

import torch
from torch import Tensor

from .backends.base import math_dtype
from .config import VARIANT_DEFAULTS, Hyper, validate_hyper, validate_search_range, validate_weight_decay
from .distributed import is_dtensor, local

if TYPE_CHECKING:
    from .optimizer import ALSALS

FORMAT_VERSION = 2
HOST_KEY = "alsals"                     # key of the host state inside param_groups[0]
# The live param_groups[0] holds this under HOST_KEY (state_dict() replaces it with the host
# state): torch.distributed.checkpoint's flatten_optimizer_state_dict=True restores only the
# group keys that the live groups have.
HOST_PLACEHOLDER = "ALSALS host state: written by state_dict()"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
COUNTER_KEYS = ("steps", "searches", "trials", "rejected", "skipped", "fallbacks")
LATER_HYPER_FIELDS = ("first_backtrack", "first_backtrack_on_rise", "growth_boost", "growth_max",
                      "total_steps", "cooldown_fraction", "drop_factor", "drop_min_samples",
                      "drop_every", "drop_significance")   # may be absent
HOST_KEYS = ("variant", "hyper", "eta", "t", "counters", "fast", "slow", "last_search_t", "h", "s",
             "pending_skips")


class CheckpointError(ValueError):
    """An ALSALS state_dict that cannot be loaded; the message names what is wrong."""


def _fail(msg: str) -> NoReturn:
    raise CheckpointError(f"ALSALS.load_state_dict: {msg}")


# -- writing ------------------------------------------------------------------------------------

def host_state(*, hyper: Hyper, eta: float, t: int, counters: Dict[str, int], fast: Optional[float],
               slow: Optional[float], last_search_t: int, h: float, s: float, pending_skips: int,
               growth: Optional[float], scale_found: bool,
               cooldown_from: Optional[float], plateau: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {"format": FORMAT_VERSION, "variant": hyper.variant, "hyper": dataclasses.asdict(hyper),
            "eta": float(eta), "t": int(t), "counters": {k: int(v) for k, v in counters.items()},
            "fast": fast, "slow": slow, "last_search_t": int(last_search_t), "h": float(h),
            "s": float(s), "pending_skips": int(pending_skips), "growth": growth,
            "scale_found": bool(scale_found), "cooldown_from": cooldown_from, "plateau": plateau}


def attach(state_dict: dict, host: Dict[str, Any]) -> dict:
    """Put the host state into param_groups[0] (where the DCP helpers keep it)."""
    if state_dict["param_groups"]:
        state_dict["param_groups"][0][HOST_KEY] = host
    return state_dict


# -- reading ------------------------------------------------------------------------------------

@dataclass
class LoadPlan:
    """Everything load_state_dict assigns, already validated and converted."""

    hyper: Hyper
    host: Dict[str, Any]                               # HOST with plain Python values
    weight_decays: List[float]                         # one per group
    state: Dict[Tensor, Dict[str, Tensor]] = field(default_factory=dict)   # param -> new state


def _number(value: Tensor, name: str, expected: str) -> Tensor:
    """A one-element tensor a host scalar may be read from (format 1 stored h, s and the pending
    skips as tensors): real, not bool, holding a value; else the checkpoint error naming it."""
    if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.is_meta:
        what = "on the meta device" if value.is_meta else f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        _fail(f"{name} is {what}; expected {expected}")
    return value


def _int(value, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, Tensor) and not value.is_floating_point():
        value = int(_number(value, name, f"an int >= {minimum}"))
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(f"{name}={value!r} is invalid; expected an int >= {minimum}")
    return int(value)


def _float(value, name: str) -> float:
    if isinstance(value, Tensor):
        value = float(_number(value, name, "a finite float"))
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        _fail(f"{name}={value!r} is invalid; expected a finite float")
    return float(value)


def _check_keys(value, keys, name: str) -> None:
    """``value`` is a dict with exactly ``keys``; else the checkpoint error naming ``name``."""
    if not isinstance(value, dict):
        _fail(f"{name} is a {type(value).__name__}, not a dict")
    missing = [k for k in keys if k not in value]
    unknown = sorted(set(value) - set(keys), key=repr)
    if missing or unknown:
        _fail(f"{name} has missing keys {missing} / unknown keys {unknown}")


def _host_of(state_dict: dict) -> Dict[str, Any]:
    groups = state_dict["param_groups"]
    host = groups[0].get(HOST_KEY) if groups and isinstance(groups[0], dict) else None
    top_level = host is None or host == HOST_PLACEHOLDER
    if top_level:
        host = state_dict.get("alsals")                # format 1: top level
        if host is None:
            _fail("this state_dict was not saved by ALSALS (no host state in param_groups[0]"
                  f"[{HOST_KEY!r}] nor at the top level)")
    if not isinstance(host, dict):
        _fail(f"the host state is a {type(host).__name__}, not a dict")
    if top_level:
        host = dict(host)
        host.setdefault("format", 1)
    version = host.get("format")
    if version not in (1, FORMAT_VERSION):
        _fail(f"checkpoint format {version!r} is not supported (this version reads 1 and "
              f"{FORMAT_VERSION}); was it written by a newer alsals_fused?")
    missing = [k for k in HOST_KEYS if k not in host]
    if missing:
        _fail(f"the host state lacks {missing} (format {version})")
    return host


def _check_hyper(saved, variant: str) -> Hyper:
    if not isinstance(saved, dict):
        _fail(f"hyper is a {type(saved).__name__}, not a dict")
    names = [f.name for f in dataclasses.fields(Hyper)]
    if variant in VARIANT_DEFAULTS:    # fields added after format 1 take the variant's defaults
        defaults = dataclasses.asdict(VARIANT_DEFAULTS[variant])
        saved = {**{k: defaults[k] for k in LATER_HYPER_FIELDS if k not in saved}, **saved}
    missing = [n for n in names if n not in saved]
    unknown = sorted(set(saved) - set(names))
    if missing or unknown:
        _fail(f"hyper has missing keys {missing} / unknown keys {unknown}")
    if saved["variant"] != variant:
        _fail(f"hyper['variant']={saved['variant']!r} differs from variant={variant!r}")
    given = {k: v for k, v in saved.items() if k != "variant"}
    if isinstance(given["betas"], list):
        given["betas"] = tuple(given["betas"])
    optional_none = {"max_grad_norm", "first_backtrack", "first_backtrack_on_rise", "total_steps",
                     "drop_factor"}
    for k, v in given.items():
        if v is None and k not in optional_none:
            _fail(f"hyper[{k!r}]=None is invalid")
    try:   # the saved values as they are (None included), under the constructor's own checks
        hyper = dataclasses.replace(VARIANT_DEFAULTS[variant], **given)
        validate_hyper(hyper)
    except (ValueError, TypeError) as exc:
        _fail(f"saved hyperparameters are invalid: {exc}")
    return hyper


def validate(opt: ALSALS, state_dict: object) -> LoadPlan:
    """Check ``state_dict`` against ``opt`` completely; raise CheckpointError, change nothing."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        _fail("expected a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
        _fail("param_groups must be a list of dicts")
    if not isinstance(saved_state, dict):
        _fail("state must be a dict")
    host = _host_of(state_dict)

    variant = host["variant"]
    if variant != opt.hyper.variant:
        _fail(f"saved with variant={variant!r}, this optimizer has variant={opt.hyper.variant!r}; to "
              f"resume it, construct the optimizer with ALSALS(..., variant={variant!r})")
    hyper = _check_hyper(host["hyper"], variant)
    if hyper.memory_efficient:           # the constructor's rule (in-place trial moves drift)
        low = sorted({str(p.dtype) for g in opt.param_groups for p in g["params"]
                      if p.dtype not in (torch.float32, torch.float64)})
        if low:
            _fail(f"saved with memory_efficient=True, which supports fp32 and fp64 parameters "
                  f"only, and this optimizer has {', '.join(low)} parameters")

    # Groups and parameter indices.
    if len(saved_groups) != len(opt.param_groups):
        _fail(f"the checkpoint has {len(saved_groups)} parameter groups, this optimizer "
              f"{len(opt.param_groups)}")
    index: Dict[Any, Tensor] = {}
    weight_decays: List[float] = []
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if "params" not in saved:
            _fail(f"param_groups[{gi}] has no 'params'")
        ids = list(saved["params"])
        if len(ids) != len(group["params"]):
            _fail(f"param_groups[{gi}] has {len(ids)} parameters in the checkpoint, "
                  f"{len(group['params'])} in this optimizer")
        for key, p in zip(ids, group["params"]):
            if key in index:
                _fail(f"parameter index {key!r} appears twice in param_groups")
            index[key] = p
        if "weight_decay" not in saved:
            _fail(f"param_groups[{gi}] has no 'weight_decay'")
        try:
            validate_weight_decay(saved["weight_decay"])
        except ValueError as exc:
            _fail(f"param_groups[{gi}]: {exc}")
        weight_decays.append(float(saved["weight_decay"]))

    # Per-parameter state: keys, shapes, dtypes, devices, values.
    new_state: Dict[Tensor, Dict[str, Tensor]] = {}
    for key, s in saved_state.items():
        if key not in index:
            _fail(f"state has an entry for parameter {key!r}, which no param_group lists")
        p = index[key]
        _check_keys(s, MOMENT_KEYS, f"state[{key!r}]")
        want = math_dtype(p.dtype)
        entry = {}
        for n in MOMENT_KEYS:
            v = s[n]
            where = f"state[{key!r}][{n!r}]"
            if not isinstance(v, Tensor):
                _fail(f"{where} is a {type(v).__name__}, not a tensor")
            if tuple(v.shape) != tuple(p.shape):
                _fail(f"{where} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}")
            if v.dtype != want:
                _fail(f"{where} is {v.dtype}; moments of {p.dtype} parameters are {want}")
            if v.device.type == "meta":
                _fail(f"{where} is on the meta device (holds no values)")
            if is_dtensor(p) != is_dtensor(v):
                _fail(f"{where} is {'a DTensor' if is_dtensor(v) else 'a plain tensor'} and its "
                      f"parameter {'is' if is_dtensor(p) else 'is not'} a DTensor: load sharded "
                      "state through torch.distributed.checkpoint (set_optimizer_state_dict)")
            # (p and v are both DTensors or both plain tensors here: checked just above.)
            if is_dtensor(p) and is_dtensor(v) and (v.device_mesh != p.device_mesh
                                                    or v.placements != p.placements):
                _fail(f"{where} is sharded as {v.placements} on {v.device_mesh}, its parameter as "
                      f"{p.placements} on {p.device_mesh}")
            lv = local(v)
            if lv.numel() and not bool(torch.isfinite(lv).all()):
                _fail(f"{where} holds non-finite values")
            if n == "exp_avg_sq" and lv.numel() and bool((lv < 0).any()):
                _fail(f"{where} holds negative values")
            entry[n] = v.detach().to(device=p.device, copy=True)   # a leaf, whatever it was
        new_state[p] = entry

    # Host scalars.
    eta = _float(host["eta"], "eta")
    if eta <= 0:
        _fail(f"eta={eta!r} is invalid; expected a finite float > 0")
    try:
        validate_search_range(eta, hyper, name="eta", check_growth=False)
    except ValueError as exc:
        _fail(str(exc))
    t = _int(host["t"], "t")
    counters = host["counters"]
    if not isinstance(counters, dict):
        _fail(f"counters is a {type(counters).__name__}, not a dict")
    missing = [k for k in COUNTER_KEYS if k not in counters]
    if missing:
        _fail(f"counters lacks {missing}")
    counters = {k: _int(v, f"counters[{k!r}]") for k, v in counters.items()}
    fast, slow = host["fast"], host["slow"]
    if (fast is None) != (slow is None):
        _fail(f"fast={fast!r} and slow={slow!r}: both None (no search yet) or both floats")
    if fast is not None:
        fast, slow = _float(fast, "fast"), _float(slow, "slow")
        if fast <= 0 or slow <= 0:
            _fail(f"fast={fast!r}, slow={slow!r}: the 'auto' EMAs of eta must be > 0")
    last = _int(host["last_search_t"], "last_search_t")
    if last > t:
        _fail(f"last_search_t={last} is after t={t}")
    h = 0.0 if host["h"] is None else _float(host["h"], "h")
    s_ = 0.0 if host["s"] is None else _float(host["s"], "s")
    pending = host["pending_skips"]
    if pending is None:
        pending = 0
    elif isinstance(pending, (Tensor, float)):
        pf = _float(pending, "pending_skips")
        if pf < 0 or pf != int(pf):
            _fail(f"pending_skips={pf!r} is invalid; expected an int >= 0")
        pending = int(pf)
    pending = _int(pending, "pending_skips")
    growth = host.get("growth")
    if growth is not None:
        growth = _float(growth, "growth")
        if growth < 1:
            _fail(f"growth={growth!r} is invalid; expected None or a float >= 1")
    scale_found = host.get("scale_found", t > 0)
    if not isinstance(scale_found, bool):
        _fail(f"scale_found={scale_found!r} is invalid; expected True or False")
    cooldown_from = host.get("cooldown_from")
    if cooldown_from is not None:
        cooldown_from = _float(cooldown_from, "cooldown_from")
        if cooldown_from <= 0:
            _fail(f"cooldown_from={cooldown_from!r} is invalid; expected None or a float > 0")
    plateau = _plateau_state(host.get("plateau"), hyper, t)
    clean = {"eta": eta, "t": t, "counters": counters, "fast": fast, "slow": slow,
             "last_search_t": last, "h": h, "s": s_, "pending_skips": pending, "growth": growth,
             "scale_found": scale_found, "cooldown_from": cooldown_from, "plateau": plateau}
    return LoadPlan(hyper=hyper, host=clean, weight_decays=weight_decays, state=new_state)


PLATEAU_KEYS = ("drops", "total", "losses")


def _plateau_state(saved, hyper: Hyper, t: int) -> Optional[Dict[str, Any]]:
    """The plateau test's state (plateau.PlateauTest.state), checked; a fresh one when absent
    (a checkpoint of a variant without drops, or written before them); None without drops."""
    if hyper.drop_factor is None:
        if saved is not None:
            _fail("the host state holds a plateau test, and its hyperparameters have drop_factor=None")
        return None
    if saved is None:
        return {"drops": 0, "total": 0, "losses": []}
    _check_keys(saved, PLATEAU_KEYS, "plateau")
    drops, total = _int(saved["drops"], "plateau['drops']"), _int(saved["total"], "plateau['total']")
    losses = saved["losses"]
    if not isinstance(losses, (list, tuple)) or len(losses) > total:
        _fail(f"plateau['losses'] must be a list of at most plateau['total']={total} [step, loss] pairs")
    clean_losses, last = [], 0
    for i, pair in enumerate(losses):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            _fail(f"plateau['losses'][{i}]={pair!r} is invalid; expected [step, loss]")
        step = _int(pair[0], f"plateau['losses'][{i}][0]", minimum=1)
        if step <= last or step > t:
            _fail(f"plateau['losses'][{i}] is at step {step}; steps must increase and be at most t={t}")
        clean_losses.append([step, _float(pair[1], f"plateau['losses'][{i}][1]")])
        last = step
    return {"drops": drops, "total": total, "losses": clean_losses}
