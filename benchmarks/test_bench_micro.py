"""Optimizer-step microbenchmarks on parameter sets shaped like real models.

Gradients are fixed random tensors, so a row times optimizer work only (no forward/backward).
Groups (compare rows within one):

``step <set>``  copy | torch Adam for-loop, foreach, fused | per ALSALS backend: ``accepted``
                (the driver's own step after the gradient, ``ALSALS._update``, on a step whose
                first trial is accepted: gradient pre-pass, step pass with its candidate and slope
                finisher, the fallback fix-up, one verdict and its read, the commit; a model-free
                closure stands in for the trial forward) and ``opt.step`` (the whole driver with a
                trivial closure: no model, first trial accepted) | the salsa-optimizer package's
                step doing the same (installed only)
``pass <set>``  copy | per backend, on the driver's own plan, step scalars and ``ctl``:
                ``step_pass`` (with its finisher), ``backtrack`` (one move_pass: an extra trial),
                ``grad_pass`` (the gradient norm and the grad finisher)

On CUDA each row is timed twice (``_benchlib.run_rows``): wall time per call over many calls per
synchronization (host work included: the row's median) and device time per call from CUDA events
(``device_s``); ``wall_over_device`` is their ratio.  extra_info carries GB/s (from device time on
CUDA) from the byte counts of docs/algorithm.md section 7
(``_benchlib.BYTES_PER_PARAM``) against the copy of the same run, host reads/syncs per step and
optimizer-state bytes per param.
"""
from __future__ import annotations

import functools
import traceback

import pytest
import torch

import _benchlib as lib
from alsals_fused import ALSALS
from alsals_fused.backends import available_backends
from alsals_fused.backends.base import Dir

BACKENDS = ("reference", "foreach", "triton", "cuda")
ADAM = {"adam-forloop": {"foreach": False}, "adam-foreach": {"foreach": True},
        "adam-fused": {"fused": True}}
PASSES = ("step_pass", "backtrack", "grad_pass")
SMOKE_PATHS = {"copy", "adam-foreach", "adam-fused", "salsa-pkg", "alsals-reference-accepted",
               "alsals-foreach-accepted", "alsals-foreach-opt.step", "alsals-foreach-step_pass",
               "alsals-foreach-backtrack"}
BIG_LOSS = 1e6   # the trivial closure's gradient-forward loss; trials return 0: always accepted
ETA = 1e-4

try:
    from salsa.SaLSA import SaLSA
    SALSA_MISSING = None
except ImportError as exc:
    SaLSA = None
    SALSA_MISSING = f"salsa-optimizer is not installed ({exc}); pip install salsa-optimizer==0.1.0"


def _backend_skip(name: str):
    reason = available_backends(lib.DEVICE)[name]
    if reason is None and lib.DEVICE.type == "cpu" and name in ("triton", "cuda"):
        reason = "fused backends are benchmarked on a GPU only (Triton's CPU interpreter is far too slow to time)"
    return reason


def _cases():
    skips = {b: _backend_skip(b) for b in BACKENDS}
    cases = []
    for spec in lib.set_specs():
        step_paths = ["copy", *ADAM, *(f"alsals-{b}-{k}" for b in BACKENDS for k in ("accepted", "opt.step")),
                      "salsa-pkg"]
        pass_paths = ["copy", *(f"alsals-{b}-{k}" for b in BACKENDS for k in PASSES)]
        for group, paths in (("step", step_paths), ("pass", pass_paths)):
            for path in paths:
                marks = [pytest.mark.micro]
                if spec.family == "gpt2" and path in SMOKE_PATHS:
                    marks.append(pytest.mark.smoke)
                backend = path.split("-")[1] if path.startswith("alsals-") else None
                reason = skips.get(backend) if backend else None
                if path == "salsa-pkg":
                    reason = SALSA_MISSING or (
                        "not run at 1.5B parameters (it deep-copies every parameter each step; "
                        "kept out of the time budget)" if spec.family == "gpt2-xl" else None)
                if reason:
                    marks.append(pytest.mark.skip(reason=reason))
                cases.append(pytest.param(spec, group, path, marks=marks, id=f"{spec.label}/{group}/{path}"))
    return cases


def _alsals(ps: lib.ParamSet, backend: str):
    """An ALSALS optimizer over the set and a zero parameter for the model-free closure.  The set's
    fixed gradients are the benchmark's input: they are marked as seen by the optimizer (as after
    a step), so that step(closure) neither takes them for a backward run before it nor warns
    that they are the previous step's (the closure's backward touches only the zero parameter)."""
    z = torch.nn.Parameter(torch.zeros(1, device=lib.DEVICE))
    opt = ALSALS([*ps.params, z], backend=backend, init_step_size=ETA, line_search_every=1)
    opt._record_gradient_marks()
    opt._warned_stale = True   # stepping on the same gradients again is the point here
    return opt, z


def _driver(ps: lib.ParamSet, backend: str):
    """An ALSALS optimizer over the set with one step taken (plan, moments, backups, ctl exist) and
    its model-free closure.  Every row below runs the driver's own code on it: nothing here
    rebuilds the driver's scalars, control vector or decisions."""
    opt, z = _alsals(ps, backend)
    closure = _trivial_closure(z)
    with torch.enable_grad():
        opt.step(closure)
    return opt, closure


def _accepted_step(opt: ALSALS, closure, loss: torch.Tensor) -> None:
    """A searching step after its gradient, as ``ALSALS.step`` runs it (``_update``: parameter
    plan, gradient pre-pass, step pass, fallback fix-up, one accepted trial with its verdict and
    read, commit), with a model-free closure in place of the forwards and no backward.  ``loss``
    is the gradient forward's, made once by the caller (a host-to-device copy per call would be
    a synchronization of the benchmark's, counted in syncs_per_step)."""
    opt._update(closure, loss, True, opt._capture_rng())


def _one_pass(ps: lib.ParamSet, path: str):
    """(backend, buckets, step scalars, ctl) of the driver's plan, gradients loaded."""
    opt, _ = _driver(ps, path.split("-")[1])
    plan = opt._refresh_plan()
    (backend, buckets), = plan.groups
    return opt, backend, buckets, opt._step_scalars(plan, True)


def _trivial_closure(z: torch.Tensor):
    """A model-free closure: the gradient forward returns BIG_LOSS, trial forwards 0 (accepted)."""
    def closure():
        return (z * 0.0).sum() + (BIG_LOSS if torch.is_grad_enabled() else 0.0)
    return closure


@pytest.mark.parametrize("spec,group,path", _cases())
def test_micro(bench, spec, group, path):
    ps = lib.param_set(spec)
    bench.group = f"{group} {spec.label}"
    info = {"row": path, "set": spec.label, "family": spec.family, "kind": "micro",
            "params": spec.numel, "tensors": len(spec.shapes)}
    bench.extra_info.update(info)
    runner = _RUNNERS[path.rsplit("-", 1)[-1] if path.startswith("alsals-") else path]
    error = None
    try:
        with torch.no_grad():
            bench.extra_info.update(runner(bench, ps, path))
    except Exception:
        # Fail with the traceback as text: an exception object kept by pytest would keep this
        # row's tensors alive (an out-of-memory row at 1.5B would then sink the rows after it).
        error = traceback.format_exc()
    lib.free_memory()
    if error:
        pytest.fail(error, pytrace=False)


def _run_copy(bench, ps, path):
    src, dst = lib.copy_buffers(ps.numel)
    lib.run_rows(bench, lambda: dst.copy_(src))
    t = lib.time_for_bandwidth(bench)
    extra = {"bytes_per_param": lib.BYTES_PER_PARAM["copy"], "bytes_kind": "copy"}
    if t:
        gbps = lib.record_copy(ps.spec.label, ps.numel, t)
        extra.update(gbps=round(gbps, 2), copy_gbps=round(gbps, 2), frac_copy=1.0)
    return extra


def _run_adam(bench, ps, path):
    try:
        opt = torch.optim.Adam(ps.params, lr=ETA, **ADAM[path])
        opt.step()
    except (RuntimeError, ValueError) as exc:   # e.g. fused unsupported on this device/dtype
        pytest.skip(f"torch.optim.Adam({ADAM[path]}) cannot run here: {exc}")
    lib.run_rows(bench, opt.step)
    extra = lib.bandwidth_info(ps.spec, "adam", lib.time_for_bandwidth(bench))
    extra.update(lib.busy_info(opt.step))
    with torch.enable_grad():
        extra["syncs_per_step"] = lib.count_syncs(opt.step, 3)
    extra["state_bytes_per_param"] = lib.state_bytes_per_param(opt, ps.numel)
    return extra


def _run_accepted(bench, ps, path):
    opt, closure = _driver(ps, path.split("-")[1])
    work = functools.partial(_accepted_step, opt, closure, torch.tensor(BIG_LOSS, device=lib.DEVICE))
    lib.run_rows(bench, work)
    last = opt.last_step
    assert last.searched and last.accepted and last.trials == 1, last   # the path we meant
    extra = lib.bandwidth_info(ps.spec, "accepted", lib.time_for_bandwidth(bench))
    extra.update(lib.busy_info(work))     # its event span also holds host work after the read
    extra["syncs_per_step"] = lib.count_syncs(work, 3)
    extra["state_bytes_per_param"] = lib.state_bytes_per_param(opt, ps.numel)
    return extra


def _run_opt_step(bench, ps, path):
    opt, z = _alsals(ps, path.split("-")[1])
    closure = _trivial_closure(z)
    step = lambda: opt.step(closure)  # noqa: E731
    with torch.enable_grad():
        lib.run_rows(bench, step)
        last = opt.last_step
        assert last.searched and last.accepted and last.trials == 1, last   # the path we meant
        extra = lib.bandwidth_info(ps.spec, "accepted", lib.time_for_bandwidth(bench))
        extra["reads_per_step"] = opt.reads / opt.counters["steps"]
        extra["syncs_per_step"] = lib.count_syncs(step, 3)
    extra["state_bytes_per_param"] = lib.state_bytes_per_param(opt, ps.numel)
    extra["resolved_backend"] = sorted({b.name for b in getattr(opt, "_resolved", {}).values()})
    return extra


def _run_salsa(bench, ps, path):
    z = torch.nn.Parameter(torch.zeros(1, device=lib.DEVICE))
    opt = SaLSA([*ps.params, z], init_step_size=ETA, speed_up=False)

    def closure(backwards=False):
        loss = (z * 0.0).sum() + (BIG_LOSS if backwards else 0.0)
        if backwards:
            loss.backward()
        return loss

    def step():
        opt.step_size = ETA   # its step size grows 1.1x per accepted search: keep it bounded
        opt.step(closure)

    with torch.enable_grad():
        lib.run_rows(bench, step)
        extra = lib.bandwidth_info(ps.spec, "accepted", lib.time_for_bandwidth(bench))
        extra["syncs_per_step"] = lib.count_syncs(step, 3)
    # m, v as its state; it also deep-copies every parameter each searching step (4 B/param more).
    extra["state_bytes_per_param"] = lib.state_bytes_per_param(opt, ps.numel)
    return extra


def _run_step_pass(bench, ps, path):
    opt, backend, buckets, hp = _one_pass(ps, path)
    lib.run_rows(bench, lambda: backend.step_pass(buckets, hp, opt._ctl, searching=True, write_backup=True))
    return lib.bandwidth_info(ps.spec, "step_pass", lib.time_for_bandwidth(bench))


def _run_backtrack(bench, ps, path):
    opt, backend, buckets, hp = _one_pass(ps, path)
    backend.step_pass(buckets, hp, opt._ctl, searching=True, write_backup=True)   # a fresh backup
    lib.run_rows(bench, lambda: backend.move_pass(   # the move of an extra alsals trial
        buckets, hp, opt._ctl, src_eta=hp.eta, src_dir=Dir.UPDATE, dst_eta=hp.eta * 0.9,
        dst_dir=Dir.UPDATE, from_backup=True))
    return lib.bandwidth_info(ps.spec, "backtrack", lib.time_for_bandwidth(bench))


def _run_grad_pass(bench, ps, path):
    opt, backend, buckets, hp = _one_pass(ps, path)
    loss0 = torch.tensor(BIG_LOSS, dtype=torch.float64, device=lib.DEVICE)
    lib.run_rows(bench, lambda: backend.grad_pass(buckets, opt._ctl, loss0, hp))
    return lib.bandwidth_info(ps.spec, "grad_pass", lib.time_for_bandwidth(bench))


_RUNNERS = {"copy": _run_copy, **{k: _run_adam for k in ADAM}, "salsa-pkg": _run_salsa,
            "accepted": _run_accepted, "opt.step": _run_opt_step, "step_pass": _run_step_pass,
            "backtrack": _run_backtrack, "grad_pass": _run_grad_pass}
