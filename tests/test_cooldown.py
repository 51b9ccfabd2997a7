"""The end-of-run cooldown (``total_steps=``, docs/algorithm.md section 3): the schedule, what it
does not do (trial forwards), its arguments, and checkpoints taken inside it.  That every backend
takes the reference's decisions through a cooldown is test_contract.py's "alsals-cooldown"
trajectory."""
import copy
import warnings

import numpy as np
import pytest
import torch

from alsals_fused import ALSALS
from alsals_fused.checkpoint import CheckpointError
from helpers import OddModel, make_data


def _run(opt, model, steps, x, y):
    torch.manual_seed(1)                             # OddModel's dropout: the same masks per run
    etas, trials = [], []
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        etas.append(opt.eta)
        trials.append(opt.last_step.trials)
    return etas, trials


def _setup(**kwargs):
    torch.manual_seed(0)
    model = OddModel()
    opt = ALSALS(model.groups(), backend="foreach", init_step_size=0.5, **kwargs)
    return model, opt, *make_data()


@pytest.mark.parametrize("variant", ["alsals", "adaptive"])
def test_the_last_fraction_of_the_budget_decays_linearly_without_trials(variant):
    model, opt, x, y = _setup(variant=variant, total_steps=10, cooldown_fraction=0.3)
    etas, trials = _run(opt, model, 10, x, y)
    start = etas[6]                                  # eta as the searches left it (step 7)
    assert etas[7:] == [start * 3 / 4, start * 2 / 4, start * 1 / 4]
    assert trials[7:] == [0, 0, 0] and opt.counters["searches"] <= 7
    assert [g["lr"] for g in opt.param_groups] == [opt.eta] * len(opt.param_groups)


def test_past_the_budget_the_last_step_size_stays_and_a_warning_says_so():
    model, opt, x, y = _setup(total_steps=4, cooldown_fraction=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        etas, trials = _run(opt, model, 7, x, y)
    past = [w for w in caught if "past total_steps=4" in str(w.message)]
    assert len(past) == 1 and past[0].filename == __file__   # once, at step 5, naming the caller
    assert etas[4:] == [etas[3]] * 3 and trials[4:] == [0, 0, 0]


def test_without_total_steps_nothing_changes():
    model_a, plain, x, y = _setup()
    model_b, budget, _, _ = _setup(total_steps=1000)   # its cooldown starts after step 800
    assert _run(plain, model_a, 8, x, y) == _run(budget, model_b, 8, x, y)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cooldown_fraction=0.3), "cooldown_fraction= needs total_steps="),
    (dict(total_steps=0), "total_steps=0 is invalid"),
    (dict(total_steps=10.0), "total_steps=10.0 is invalid"),
    (dict(total_steps=10, cooldown_fraction=0.0), "cooldown_fraction=0.0 is invalid"),
    (dict(total_steps=10, cooldown_fraction=1.5), "cooldown_fraction=1.5 is invalid"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ALSALS(OddModel().groups(), **kwargs)


@pytest.mark.parametrize("budget", [np.int64(10), torch.tensor(10)], ids=["numpy-int", "int-tensor"])
def test_integer_like_budgets_are_taken_as_ints(budget):
    """A budget computed with numpy or torch (len(loader) * epochs) is an int to the optimizer:
    stored as a plain int, so its checkpoint holds no numpy or tensor object."""
    opt = ALSALS(OddModel().groups(), total_steps=budget, line_search_every=np.int64(2),
                 max_trials=torch.tensor(5))
    assert type(opt.hyper.total_steps) is int and opt.hyper.total_steps == 10
    assert type(opt.hyper.line_search_every) is int and type(opt.hyper.max_trials) is int
    with pytest.raises(ValueError, match="total_steps=tensor"):
        ALSALS(OddModel().groups(), total_steps=torch.tensor(10.0))


def test_a_checkpoint_inside_the_cooldown_resumes_bit_identically():
    model, opt, x, y = _setup(total_steps=14, cooldown_fraction=0.5)
    _run(opt, model, 8, x, y)                        # one step into the cooldown (steps 8-14)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    want = _run(opt, model, 6, x, y)
    want_params = [p.detach().clone() for p in model.parameters()]

    model2, opt2, _, _ = _setup()                    # constructed without total_steps:
    model2.load_state_dict(saved_model)              # the checkpoint's hyperparameters win
    opt2.load_state_dict(saved_opt)
    assert opt2.hyper.total_steps == 14 and opt2._cooldown_from == opt._cooldown_from
    assert _run(opt2, model2, 6, x, y) == want
    for a, b in zip(model2.parameters(), want_params):
        assert torch.equal(a, b)


def test_a_checkpoint_from_before_the_option_loads_without_a_cooldown():
    model, opt, x, y = _setup()
    _run(opt, model, 3, x, y)
    sd = opt.state_dict()
    host = sd["param_groups"][0]["alsals"]
    del host["cooldown_from"], host["hyper"]["total_steps"], host["hyper"]["cooldown_fraction"]
    _, fresh, _, _ = _setup()
    fresh.load_state_dict(sd)
    assert fresh.hyper.total_steps is None and fresh._cooldown_from is None and fresh.t == 3


@pytest.mark.parametrize("value", [-1.0, float("nan"), "0.1"])
def test_a_corrupt_cooldown_start_is_refused_and_changes_nothing(value):
    model, opt, x, y = _setup(total_steps=6)
    _run(opt, model, 2, x, y)
    sd = opt.state_dict()
    sd["param_groups"][0]["alsals"]["cooldown_from"] = value
    before = (opt.eta, opt.t, opt._cooldown_from, opt.hyper)
    with pytest.raises(CheckpointError, match="cooldown_from"):
        opt.load_state_dict(sd)
    assert (opt.eta, opt.t, opt._cooldown_from, opt.hyper) == before


def test_steps_on_user_gradients_cool_down_too():
    """step() without a closure (micro_batch: gradients the user computed) takes the same schedule."""
    model, opt, x, y = _setup(total_steps=4, cooldown_fraction=0.5, line_search_every=100)
    etas = []
    for _ in range(4):
        opt.zero_grad()
        with opt.micro_batch(lambda: torch.nn.functional.mse_loss(model(x), y)) as mb:
            mb.loss = torch.nn.functional.mse_loss(model(x), y)
            mb.loss.backward()
        opt.step()
        etas.append(opt.eta)
    start = etas[1]                                  # after the one search (step 1)
    assert etas[2:] == [start * 2 / 3, start * 1 / 3] and opt.counters["searches"] == 1



def test_a_budget_set_after_construction_runs_as_one_given_at_construction():
    """set_total_steps: for frameworks that count their steps after building the optimizer."""
    model_a, given, x, y = _setup(total_steps=10, cooldown_fraction=0.3)
    model_b, later, _, _ = _setup()
    assert _run(given, model_a, 2, x, y) == _run(later, model_b, 2, x, y)
    later.set_total_steps(10, cooldown_fraction=0.3)
    assert later.hyper == given.hyper
    want, got = _run(given, model_a, 8, x, y), _run(later, model_b, 8, x, y)
    assert got == want and got[1][5:] == [0, 0, 0]          # steps 8-10 cooled, without trials
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_set_total_steps_refuses_what_it_cannot_honour_and_changes_nothing():
    model, opt, x, y = _setup()
    _run(opt, model, 3, x, y)
    for args, error, match in (((3,), ValueError, "already taken 3 steps"),
                               ((0,), ValueError, "total_steps=0 is invalid"),
                               ((10.0,), ValueError, "total_steps=10.0 is invalid"),
                               ((None, 0.5), ValueError, "cooldown_fraction= needs total_steps="),
                               ((10, 1.5), ValueError, "cooldown_fraction=1.5 is invalid")):
        with pytest.raises(error, match=match):
            opt.set_total_steps(*args)
        assert opt.hyper.total_steps is None
    opt.set_total_steps(np.int64(5))                 # cooldown: step 5 (20% of 5, at least one)
    assert type(opt.hyper.total_steps) is int and opt.hyper.total_steps == 5
    opt.set_total_steps(8, cooldown_fraction=0.5)
    opt.set_total_steps(None)                        # removed before it began: no cooldown
    assert opt.hyper == ALSALS(model.groups(), backend="foreach", init_step_size=0.5).hyper
    opt.set_total_steps(5)
    _run(opt, model, 2, x, y)                        # step 5 has begun the cooldown
    with pytest.raises(RuntimeError, match="cooldown of total_steps=5 has begun"):
        opt.set_total_steps(50)
    assert opt.hyper.total_steps == 5
