"""The foreach backend against the reference: same decisions, same numbers, every dtype.

On CPU foreach applies the reference's element-wise operations in the same order, so params and
moments agree to fp32 rounding (in practice to the bit); only the fp64 slope sums differ in order.
"""
import pytest
import torch

from alsals_fused import ALSALS
from alsals_fused.backends import get_backend
from alsals_fused.backends.base import Bucket, Ctl, Dir, StepScalars, new_ctl
from alsals_fused.backends.reference import resolve
from helpers import OddModel, assert_same_trajectory, make_data, trajectory

TOL = {  # (rtol, atol) for moments; params of 16-bit dtypes may differ by one ulp
    torch.float32: (1e-6, 1e-7),
    torch.float64: (1e-12, 1e-14),
    torch.bfloat16: (1e-6, 1e-7),
    torch.float16: (1e-6, 1e-7),
}
ULP = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.mark.parametrize("variant", ["alsals", "adam_sls", "salsa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_trajectories_agree(variant, dtype):
    kw = dict(steps=22, dtype=dtype, variant=variant, weight_decay=0.01, init_step_size=0.5)
    ref = trajectory("reference", **kw)
    fe = trajectory("foreach", **kw)
    rtol, atol = TOL[dtype]
    assert_same_trajectory(ref, fe, rtol=rtol, atol=atol, param_atol=ULP.get(dtype, atol))
    assert sum(ref["trials"]) > len(ref["trials"]) or variant == "salsa", "the test should backtrack"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["alsals", "adam_sls"])
def test_memory_efficient_trajectories_agree(variant, dtype):
    kw = dict(steps=22, dtype=dtype, variant=variant, init_step_size=0.5, memory_efficient=True)
    ref = trajectory("reference", **kw)
    fe = trajectory("foreach", **kw)
    rtol, atol = TOL[dtype]
    assert_same_trajectory(ref, fe, rtol=rtol, atol=atol)


@pytest.mark.parametrize("variant", ["alsals", "adam_sls"])
def test_memory_efficient_stays_close_to_the_backup_path(variant):
    # In-place trial moves drift by a few ulp per move; decisions should not change here.
    kw = dict(steps=22, variant=variant, init_step_size=0.5, weight_decay=0.01)
    exact = trajectory("reference", **kw)
    inplace = trajectory("reference", memory_efficient=True, **kw)
    assert exact["trials"] == inplace["trials"]
    for x, y in zip(exact["params"][-1], inplace["params"][-1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_unused_parameter_is_neither_updated_nor_decayed(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS([{"params": [p for n, p in model.named_parameters() if n != "unused"]},
                  {"params": [model.unused], "weight_decay": 0.5}], backend=backend, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert model.unused not in opt.state
    assert torch.equal(model.unused.detach(), OddModel().unused.detach())
    assert not torch.equal(model.w1.detach(), OddModel().w1.detach()), "the others did move"



# -- pass-level comparison on random buckets ------------------------------------------------------

SIZES = [0, 1, 2, 3, 7, 31, 127, 1000, 4099]


def random_bucket(dtype, sizes=SIZES, seed=0, memory_efficient=False):
    gen = torch.Generator().manual_seed(seed)
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    b = Bucket(device=torch.device("cpu"), dtype=dtype)
    for i, n in enumerate(sizes):
        b.params.append(torch.randn(n, generator=gen).to(dtype))
        b.grads.append((torch.randn(n, generator=gen) * 0.1).to(dtype))
        b.exp_avgs.append((torch.randn(n, generator=gen) * 0.01).to(mt))
        b.exp_avg_sqs.append((torch.rand(n, generator=gen) * 1e-3).to(mt))
        if not memory_efficient:
            b.backups.append(torch.zeros_like(b.params[-1]))
        b.weight_decays.append([0.0, 0.01, 0.1][i % 3])
    return b


def clone_bucket(b):
    return Bucket(device=b.device, dtype=b.dtype, params=[t.clone() for t in b.params],
                  grads=[t.clone() for t in b.grads], exp_avgs=[t.clone() for t in b.exp_avgs],
                  exp_avg_sqs=[t.clone() for t in b.exp_avg_sqs],
                  backups=[t.clone() for t in b.backups], weight_decays=list(b.weight_decays))


def ctrl(scale=1.0, skip=0.0, fallback=0.0):
    c = new_ctl("cpu")
    c[Ctl.SCALE], c[Ctl.SKIP], c[Ctl.FALLBACK] = scale, skip, fallback
    return c


HP = dict(eta=0.05, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9 ** 3,
          bias_correction2=1 - 0.999 ** 3, smoothing=0.99)


def step_scalars(momentum_search):
    return StepScalars(search_dir=Dir.MOMENTUM if momentum_search else Dir.GRAD, **HP)


def assert_buckets_close(a, b, rtol=1e-6, atol=1e-7):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "backups"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum_search", [True, False])
@pytest.mark.parametrize("searching", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_step_pass_agrees(dtype, momentum_search, searching, scale):
    ref_b = random_bucket(dtype)
    fe_b = clone_bucket(ref_b)
    hp = step_scalars(momentum_search)
    ref, fe = get_backend("reference", "cpu"), get_backend("foreach", "cpu")
    d_ref = ref.step_pass([ref_b], hp, ctrl(scale), searching=searching, write_backup=searching,
                          finish=False)
    d_fe = fe.step_pass([fe_b], hp, ctrl(scale), searching=searching, write_backup=searching,
                        finish=False)
    assert_buckets_close(ref_b, fe_b)
    if searching:
        torch.testing.assert_close(d_ref, d_fe, rtol=1e-6, atol=1e-12)  # sums in another order
        assert d_ref[1] > 0
    else:
        assert d_ref is None and d_fe is None
    loss0 = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(ref.grad_pass([ref_b], ctrl(), loss0, hp, finish=False),
                               fe.grad_pass([fe_b], ctrl(), loss0, hp, finish=False), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_skip_flag_writes_nothing(backend):
    b = random_bucket(torch.float32)
    before = clone_bucket(b)
    be = get_backend(backend, "cpu")
    hp = step_scalars(True)
    be.step_pass([b], hp, ctrl(skip=1.0), searching=True, write_backup=True)
    be.move_pass([b], hp, ctrl(skip=1.0), src_eta=0.05, src_dir=Dir.UPDATE, dst_eta=0.0,
                 dst_dir=Dir.UPDATE, from_backup=True)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "backups"):
        for x, y in zip(getattr(b, name), getattr(before, name)):
            assert torch.equal(x, y) or x.numel() == 0 and name == "backups"


MOVES = [  # (src_dir, dst_dir, dst_eta, only_if_fallback) as the driver issues them; None: the
    # search direction (UPDATE for alsals, GRAD for adam_sls/salsa)
    (Dir.MOMENTUM, Dir.UPDATE, 0.05, True),     # fixup after the fallback decision (alsals)
    (None, None, 0.045, False),                 # backtrack
    (None, None, 0.0, False),                   # restore to w0
    (None, Dir.UPDATE, 0.05, False),            # adam_sls/salsa final update
]


# Only the combinations the driver issues: memory_efficient is fp32/fp64 only, and the fixup
# (source MOMENTUM) follows a step pass that wrote m_hat*p, i.e. momentum_search.
MOVE_CASES = [(dtype, me, ms, fb, mv)
              for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
              for me in (False, True) for ms in (True, False) for fb in (0.0, 1.0) for mv in MOVES
              if not (me and dtype not in (torch.float32, torch.float64))
              and not (mv[0] is Dir.MOMENTUM and not ms)]


@pytest.mark.parametrize("dtype, memory_efficient, momentum_search, fallback, move", MOVE_CASES)
def test_move_pass_agrees_and_lands_on_the_candidate(dtype, memory_efficient, momentum_search, fallback, move):
    src_dir, dst_dir, dst_eta, only_if_fallback = move
    search = Dir.UPDATE if momentum_search else Dir.GRAD
    src_dir, dst_dir = src_dir or search, dst_dir or search
    hp = step_scalars(momentum_search)
    ref, fe = get_backend("reference", "cpu"), get_backend("foreach", "cpu")
    base = random_bucket(dtype, memory_efficient=memory_efficient)
    w0 = [p.clone() for p in base.params]
    # Put the params at cand(0.05) along the source direction, then move.
    c = ctrl(scale=0.5, fallback=fallback)
    ref.step_pass([base], hp, ctrl(scale=0.5), searching=True, write_backup=not memory_efficient,
                  finish=False)
    if src_dir is not Dir.MOMENTUM:   # the step pass wrote hp.search_dir; make it the search dir
        ref.move_pass([base], hp, c, src_eta=0.05, src_dir=hp.search_dir, dst_eta=0.05,
                      dst_dir=src_dir, from_backup=not memory_efficient)
    a, b = clone_bucket(base), clone_bucket(base)
    kw = dict(src_eta=0.05, src_dir=src_dir, dst_eta=dst_eta, dst_dir=dst_dir,
              from_backup=not memory_efficient, only_if_fallback=only_if_fallback)
    ref.move_pass([a], hp, c, **kw)
    fe.move_pass([b], hp, c, **kw)
    assert_buckets_close(a, b)
    if only_if_fallback and not fallback:
        assert_buckets_close(a, base, rtol=0, atol=0)
        return
    # Independent check: the params are at w0 - eta*(d + wd*w0) for the resolved direction.
    resolved = resolve(dst_dir, bool(fallback))
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    for i, p in enumerate(a.params):
        g = base.grads[i].to(mt) * 0.5
        denom = (a.exp_avg_sqs[i] / hp.bias_correction2).sqrt() + hp.eps
        d = (a.exp_avgs[i] / hp.bias_correction1) / denom if resolved is Dir.MOMENTUM else g / denom
        wd = a.weight_decays[i]
        want = w0[i].to(mt) - dst_eta * (d + wd * w0[i].to(mt))
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
        torch.testing.assert_close(p.to(mt), want, rtol=tol, atol=tol)
