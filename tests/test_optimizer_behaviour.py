"""Driver behaviour that does not depend on the backend: argument errors, search schedules,
state_dict hyperparameters, moment dtypes, clipping.

What every backend must keep (non-finite steps, NaN trials, a raising closure, rejected steps,
reads per trial, RNG replay, buffers, state_dict round trips) is in test_contract.py, run on each.
"""
import math

import pytest
import torch

from alsals_fused import ALSALS, BackendUnavailable
from helpers import OddModel, make_data


def mse_closure(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x), y)


# -- argument validation --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"variant": "adam"}, "variant"), ({"init_step_size": 0}, "init_step_size"),
    ({"init_step_size": math.inf}, "init_step_size"), ({"c": 1.0}, "c"), ({"c": 0}, "c"),
    ({"betas": (0.9, 1.0)}, "betas"), ({"betas": (0.9,)}, "betas"), ({"eps": 0.0}, "eps"),
    ({"smoothing": 1.0}, "smoothing"), ({"growth": 0.99}, "growth"), ({"backtrack": 1.0}, "backtrack"),
    ({"max_trials": 0}, "max_trials"), ({"max_trials": 2.5}, "max_trials"),
    ({"line_search_every": 0}, "line_search_every"), ({"line_search_every": "sometimes"}, "line_search_every"),
    ({"weight_decay": -1e-3}, "weight_decay"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"memory_efficient": "yes"}, "memory_efficient"), ({"backend": "cudnn"}, "backend"),
])
def test_invalid_arguments_name_the_argument_and_the_range(kwargs, name):
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=rf"{name}=.*accepted"):
        ALSALS([w], **kwargs)


def test_invalid_group_weight_decay():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="weight_decay"):
        ALSALS([{"params": [w], "weight_decay": -1.0}])


def test_variant_defaults_and_explicit_overrides():
    w = torch.nn.Parameter(torch.zeros(3))
    assert ALSALS([w]).hyper.c == 0.5 and ALSALS([w]).hyper.smoothing == 0.99
    sls = ALSALS([w], variant="adam_sls")
    assert (sls.hyper.c, sls.hyper.smoothing, sls.hyper.growth) == (0.1, 0.0, 2 ** (1 / 500))
    assert ALSALS([w], variant="salsa").hyper.line_search_every == "auto"
    assert ALSALS([w], variant="salsa", line_search_every=3, c=0.2).hyper.line_search_every == 3


def test_memory_efficient_rejects_16_bit_params():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="memory_efficient=True supports fp32 and fp64"):
        ALSALS([w], memory_efficient=True)


def test_integer_params_rejected():
    with pytest.raises(ValueError, match="real floating point"):
        ALSALS([torch.zeros(3, dtype=torch.int64)])


def test_step_without_closure_shows_the_pattern():
    opt = ALSALS([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="def closure"):
        opt.step()


@pytest.mark.parametrize("value, exc, match", [
    (1.5, TypeError, "must return the loss as a torch.Tensor"),
    (torch.ones(2, requires_grad=True), ValueError, "scalar loss"),
])
def test_closure_must_return_a_scalar_tensor(value, exc, match):
    opt = ALSALS([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(exc, match=match):
        opt.step(lambda: value)


def test_loss_without_grad_is_explained():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w])
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda: w.detach().sum())


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ALSALS(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum())


def test_unavailable_backend_says_why():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w], backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend='cuda' cannot run on cpu"):
        opt.step(lambda: (w ** 2).sum())


# -- schedules ------------------------------------------------------------------------------------

def test_a_deferred_skip_does_not_make_two_searches_in_a_row():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), line_search_every=3)
    searched = []
    for k in range(8):
        opt.zero_grad()
        nan = float("nan") if k == 1 else 1.0   # the second step is skipped on the device
        opt.step(lambda nan=nan: torch.nn.functional.mse_loss(model(x), y) * nan)
        searched.append(opt.last_step.searched)
    assert opt.counters["skipped"] == 1
    assert not any(a and b for a, b in zip(searched, searched[1:])), searched
    assert searched == [True, False, False, True, False, False, True, False]


def test_memory_efficient_refuses_an_unrecoverable_eta_times_weight_decay():
    w = torch.nn.Parameter(torch.ones(3))
    opt = ALSALS([w], memory_efficient=True, weight_decay=1.0, init_step_size=1.0)
    with pytest.raises(ValueError, match="eta\\*weight_decay"):
        opt.step(lambda: (w ** 2).sum())
    assert torch.equal(w.detach(), torch.ones(3))


def test_line_search_every_k_searches_at_1_k_plus_1():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), line_search_every=3)
    searched = []
    for _ in range(7):
        eta = opt.eta
        opt.step(mse_closure(model, x, y))
        searched.append(opt.last_step.searched)
        if not opt.last_step.searched:
            assert opt.eta == eta, "no growth without a search"
    assert searched == [True, False, False, True, False, False, True]


def test_auto_interval_formula():
    opt = ALSALS([torch.nn.Parameter(torch.zeros(1))])
    for fast, slow, want in [(1.0, 1.0, 10), (1.1, 1.0, 10), (1.5, 1.0, 2), (1.0, 1.5, 2),
                             (1.25, 1.0, 4), (3.0, 1.0, 1), (1.0001, 1.0, 10)]:
        opt._fast, opt._slow = fast, slow
        assert opt._auto_interval() == want, (fast, slow)


def test_auto_schedule_searches_every_step_up_to_t_10_then_by_the_rule():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), variant="salsa")
    pattern, etas = [], []
    for _ in range(40):
        opt.zero_grad()
        opt.step(mse_closure(model, x, y))
        pattern.append(opt.last_step.searched)
        etas.append(opt.eta)
    # Re-derive the pattern from the recorded step sizes with section 3's rule, by hand.
    fast = slow = None
    last, want = 0, []
    for t, eta in enumerate(etas, start=1):
        if t <= 10 or fast is None:
            search = True
        else:
            r = fast / slow
            r = 1 / r if r < 1 else r
            interval = 10 if r == 1 else min(10, max(1, int(1 / (r - 1) + 0.5)))
            search = t - last >= interval
        want.append(search)
        if search:
            fast = eta if fast is None else 0.9 * fast + 0.1 * eta
            slow = eta if slow is None else 0.99 * slow + 0.01 * eta
            last = t
    assert pattern == want
    assert all(pattern[:10]) and not all(pattern[10:]), "a steady eta should thin the searches out"
    assert opt.counters["searches"] == sum(pattern)


# -- state_dict ------------------------------------------------------------------------------------

def test_load_state_dict_restores_hyperparameters_as_torch_optimizers_do():
    w = torch.nn.Parameter(torch.ones(3))
    saved = ALSALS([w], c=0.2, max_trials=7, betas=(0.8, 0.99)).state_dict()
    opt = ALSALS([w])
    opt.load_state_dict(saved)
    assert (opt.hyper.c, opt.hyper.max_trials, opt.hyper.betas) == (0.2, 7, (0.8, 0.99))


def test_load_state_dict_rejects_foreign_or_mismatched_dicts():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w])
    with pytest.raises(ValueError, match="not saved by ALSALS"):
        opt.load_state_dict(torch.optim.Adam([w]).state_dict())
    with pytest.raises(ValueError, match="variant"):
        opt.load_state_dict(ALSALS([w], variant="salsa").state_dict())


# -- dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, moment", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_moment_dtypes(dtype, moment):
    model = OddModel(dtype)
    x, y = make_data(dtype=dtype)
    opt = ALSALS(model.parameters())
    opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y.float()))
    assert all(s["exp_avg"].dtype == moment == s["exp_avg_sq"].dtype for s in opt.state.values())
    assert all(p.dtype == dtype for p in model.parameters())


def test_gradient_clipping_matches_clip_grad_norm():
    # One step without a search: params = w0 - eta * m_hat*p, and at t=1 m_hat*p = g/(|g|+eps)
    # is invariant to scaling g, so compare moments instead: m = (1-b1) * clipped g.
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = ALSALS([w], max_grad_norm=1.0)
    opt.step(lambda: (w * torch.tensor([1.0, 1.0])).pow(2).sum() / 2)   # g = w, |g| = 5
    want = torch.tensor([3.0, -4.0]) / (5 + 1e-6) * 0.1
    torch.testing.assert_close(opt.state[w]["exp_avg"], want)
