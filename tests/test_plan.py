"""The persistent parameter plan: built once, rebuilt only when what it describes changes."""
import pytest
import torch

from alsals_fused import ALSALS
from helpers import OddModel, make_data

BACKENDS = ["reference", "foreach"]


def step(opt, model, x, y, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    return opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y.float()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_plan_is_built_once(backend, set_to_none):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.groups(), backend=backend, line_search_every=2)
    step(opt, model, x, y, set_to_none)
    plan = opt._plan
    uids = [b.uid for b in plan.buckets]
    for _ in range(5):
        step(opt, model, x, y, set_to_none)
    assert opt._plan is plan and [b.uid for b in plan.buckets] == uids
    assert all(b.grads == [] for b in plan.buckets), "grads are released after each step"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_at_a_new_address_refreshes_only_the_gradients(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend)
    step(opt, model, x, y)
    plan = opt._plan
    version = plan.buckets[0].grads_version
    step(opt, model, x, y, set_to_none=False)      # the same gradient tensors, accumulated into
    assert plan.buckets[0].grads_version == version
    held = [p.grad for p in model.parameters()]    # keep the old ones alive: new addresses
    step(opt, model, x, y)
    assert opt._plan is plan
    assert plan.buckets[0].grads_version == version + 1
    del held


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_that_gains_a_gradient_rebuilds_the_plan(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend)
    step(opt, model, x, y)
    plan = opt._plan
    assert model.unused not in opt.state
    opt.zero_grad()
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y) + model.unused.sum() ** 2)
    assert opt._plan is not plan and model.unused in opt.state
    assert any(p is model.unused for b in opt._plan.buckets for p in b.params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_to_float64_after_construction_gets_fp64_moments(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend)
    step(opt, model, x, y)
    m_before = {id(p): opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state}
    model.to(torch.float64)
    loss = step(opt, model, x.double(), y.double())
    assert torch.isfinite(loss)
    for p in model.parameters():
        if p in opt.state:
            assert opt.state[p]["exp_avg"].dtype == torch.float64 == opt.state[p]["exp_avg_sq"].dtype
    assert opt._plan.buckets[0].dtype == torch.float64
    assert all(torch.isfinite(opt.state[p]["exp_avg"]).all() for p in opt.state)
    assert m_before, "the first step created moments"


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_parameter_storage_rebuilds_the_plan(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend)
    step(opt, model, x, y)
    plan = opt._plan
    model.w1.data = model.w1.data.clone()          # same Parameter, new storage
    step(opt, model, x, y)
    assert opt._plan is not plan
    w1_bucket = next(b for b in opt._plan.buckets for p in b.params if p is model.w1)
    i = next(i for i, p in enumerate(w1_bucket.params) if p is model.w1)
    assert w1_bucket.backups[i].data_ptr() != model.w1.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_weight_decay_rebuilds_the_plan_and_is_used(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.groups(decay=0.0), backend=backend, line_search_every=10 ** 6)
    step(opt, model, x, y)
    plan = opt._plan
    opt.param_groups[0]["weight_decay"] = 0.5
    step(opt, model, x, y)
    assert opt._plan is not plan
    assert 0.5 in opt._plan.buckets[0].weight_decays


def test_load_state_dict_rebuilds_the_plan_and_old_format_loads():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters())
    for _ in range(3):
        step(opt, model, x, y)
    sd = opt.state_dict()
    host = sd["param_groups"][0]["alsals"]          # format 2 (checkpoint.py); format 1 tests there
    assert set(("h", "s", "pending_skips")) <= set(host), "the keys of every format so far"
    assert isinstance(host["h"], float) and host["h"] == opt._h.item()
    # Format 1 stored the same keys as 0-dim tensors, pending_skips maybe None.
    host["pending_skips"] = None
    opt2 = ALSALS(model.parameters())
    opt2.load_state_dict(sd)
    assert opt2._plan is None
    assert opt2._h.item() == opt._h.item() and opt2._s.item() == opt._s.item()
    assert opt2._pending_skips.item() == 0
    step(opt2, model, x, y)
    assert opt2._plan is not None


def test_params_on_two_devices_are_refused_with_the_reason():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2, device="meta"))
    opt = ALSALS([a, b])
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="must share a device"):
        opt._refresh_plan()


def _run(opt, model, data, steps=8):
    for k in range(steps):
        x, y = data[k % len(data)]
        step(opt, model, x, y)
        yield opt.last_step.trials, opt.eta


class MixedModel(torch.nn.Module):
    """fp32 and bf16 parameters: two buckets on one device."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(7, 5, generator=gen) * 0.3)
        self.b = torch.nn.Parameter((torch.randn(5, 3, generator=gen) * 0.3).bfloat16())

    def forward(self, x):
        return (x[:, :7] @ self.a).bfloat16() @ self.b


def test_mixed_backends_on_one_device_take_the_generic_path():
    data = [(torch.randn(16, 7, generator=torch.Generator().manual_seed(s)),
             torch.randn(16, 3, generator=torch.Generator().manual_seed(s + 9))) for s in range(2)]
    single, mixed = MixedModel(), MixedModel()
    opt1 = ALSALS(single.parameters(), backend="reference", init_step_size=0.5)
    opt2 = ALSALS(mixed.parameters(), backend="reference", init_step_size=0.5)
    from alsals_fused.backends import get_backend
    opt2._resolved[(torch.device("cpu"), torch.bfloat16)] = get_backend("foreach", "cpu")
    got1, got2 = list(_run(opt1, single, data)), list(_run(opt2, mixed, data))
    assert not opt1._plan.generic and opt2._plan.generic and len(opt2._plan.groups) == 2
    assert [t for t, _ in got1] == [t for t, _ in got2]
    assert sum(t for t, _ in got1) > len(got1), "the comparison should include backtracking"
    for (_, e1), (_, e2) in zip(got1, got2):
        assert e1 == pytest.approx(e2, rel=1e-12)
    for p, q in zip(single.parameters(), mixed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2 ** -7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_with_one_rank_equals_unsharded(tmp_path, backend):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        x, y = make_data()
        results = []
        for sharded in (False, True):
            torch.manual_seed(0)                   # the same dropout masks in both runs
            model = OddModel()
            opt = ALSALS(model.parameters(), backend=backend, process_group=group, sharded=sharded,
                         init_step_size=0.5)
            results.append((list(_run(opt, model, [(x, y)])), [p.detach().clone() for p in model.parameters()]))
            assert opt._plan.generic == sharded
        assert results[0][0] == results[1][0]
        for p, q in zip(results[0][1], results[1][1]):
            assert torch.equal(p, q)
    finally:
        dist.destroy_process_group()


# -- what a fused backend cannot take: one rule, decided by the driver (ALSALS._backend_for) ------
def _triton_or_skip():
    from alsals_fused.backends import unavailable_reason
    reason = unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def _cannot_take(caught):
    return [str(c.message) for c in caught if "cannot take" in str(c.message)]


def test_fp64_on_a_named_fused_backend_runs_on_foreach_with_one_warning():
    """fp64 follows the same rule as a layout the kernels cannot walk: foreach, shown in
    chosen_backends, one warning because the user named the backend."""
    _triton_or_skip()
    import warnings
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    v = torch.nn.Parameter(torch.randn(5))
    opt = ALSALS([w, v], backend="triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            opt.step(lambda: w.square().sum() + v.double().square().sum())
    assert opt.chosen_backends == {(torch.device("cpu"), torch.float64): "foreach",
                                   (torch.device("cpu"), torch.float32): "triton"}
    warned = _cannot_take(caught)
    assert len(warned) == 1 and "backend='triton'" in warned[0] and "float64" in warned[0]


def test_a_gradient_that_changes_layout_mid_run_moves_its_bucket_to_foreach():
    """A gradient in another layout than its parameter after the plan was built (here a
    column-major .grad of a row-major weight) makes a new plan, which asks the rule again: the
    bucket runs on foreach from then on (one warning), and the step matches foreach's."""
    _triton_or_skip()
    import warnings
    runs = {}
    for backend in ("triton", "foreach"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 4))
        x = torch.randn(3, 6)
        opt = ALSALS([w], backend=backend, init_step_size=0.5)

        def closure(x=x, w=w):
            return ((x @ w) ** 2).mean()

        def column_major(p):                              # same values, other strides
            p.grad = p.grad.t().contiguous().t()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(closure)
            chosen_before = dict(opt.chosen_backends)
            w.register_post_accumulate_grad_hook(column_major)
            for _ in range(2):
                opt.zero_grad()
                opt.step(closure)
            assert w.grad.stride() == (1, 6)
        runs[backend] = (w.detach().clone(), chosen_before, opt.chosen_backends, _cannot_take(caught))
    (w_tri, before, after, warned), (w_fe, _, _, none) = runs["triton"], runs["foreach"]
    assert set(before.values()) == {"triton"} and set(after.values()) == {"foreach"}
    assert len(warned) == 1 and "strides" in warned[0] and not none
    torch.testing.assert_close(w_tri, w_fe, rtol=1e-5, atol=1e-6)
