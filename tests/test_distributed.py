"""Section 6 of docs/algorithm.md: data-parallel and sharded (FSDP2) training, distributed checkpoints.

CPU processes with gloo, spawned by torch.multiprocessing with a join deadline; every process
group has a short collective timeout, so nothing can hang: a run that overstays is killed and the
test fails.  Each spawn runs several scenarios to pay the start-up cost once:

* 2 ranks: DDP, FSDP2 (foreach and reference backends, triton under its CPU interpreter for a few
  steps), distributed checkpoint save/resume under DDP and FSDP2, one rank's closure raising in a
  trial (FSDP2).
* 4 ranks: DDP, FSDP2 on a 1-D mesh (one rank holds empty shards), HSDP on a 2x2 mesh (sums over
  the shard dimension only), one rank's closure raising in a trial (DDP).

The parent compares every run with single-process training on the concatenated batch (fp32, 20
steps, clipping active so the gradient-norm reduction matters) and checks the ranks agree bit for
bit.

FSDP2 with every sharding (root only, per layer + root, mixed) and every reshard_after_forward,
at 2 and 4 ranks (one spawn each) and at 1 rank in this process: each forward evaluates the
parameters the optimizer wrote.

Set-up and teardown are deterministic: the ranks meet through a FileStore in a fresh directory
(no TCP port to race for, no store server thread in rank 0) and leave through a barrier and
destroy_process_group, or os._exit after a broken group.
"""
import dataclasses
import datetime
import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alsals_fused import ALSALS, BackendUnavailable

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

STEPS = 20
BATCH = 8
OPT_KW = dict(init_step_size=0.5, max_grad_norm=0.05)      # clipping active on most steps
JOIN_TIMEOUT = 240                                          # seconds for a whole spawn
PG_TIMEOUT = datetime.timedelta(seconds=20)                 # any collective that waits longer fails


# -- helpers shared by the parent and the ranks ------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _batch(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 3, generator=gen)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _full(p):
    from torch.distributed.tensor import DTensor
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def _local(p):
    from torch.distributed.tensor import DTensor
    return (p.to_local() if isinstance(p, DTensor) else p).detach().clone()


def _spawn(fn, world, out_dir, *args, timeout=JOIN_TIMEOUT):
    """mp.spawn with a deadline: kills every rank and fails if they overstay.  The ranks meet
    through a FileStore in a fresh directory (no TCP port: a free port picked here could be taken
    before rank 0 binds it, and rank 0 would host a TCPStore server thread that outlives the
    other ranks' last use of it)."""
    store = os.path.join(tempfile.mkdtemp(dir=out_dir), "store")
    ctx = mp.spawn(fn, args=(world, store, out_dir) + args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _init(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=PG_TIMEOUT)


def _teardown():
    """Every rank leaves together: none destroys the group (its gloo threads) while another still
    runs a collective on it, and none exits with the group alive (its threads would be destroyed
    by the interpreter's exit, which aborts the process)."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _build(kind, world, backend="foreach", variant="alsals", **kw):
    model = _model()
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif kind in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        if kind == "fsdp":
            mesh = init_device_mesh("cpu", (world,))
        else:                                              # (replicate, shard)
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, backend=backend,
                 variant=variant, **{**OPT_KW, **kw})
    return model, opt


def _train(model, opt, rank, start, stop, record=None):
    for k in range(start, stop):
        x, y = _batch(k, rank)
        opt.zero_grad()
        opt.step(lambda x=x, y=y: _loss(model, x, y))
        if record is not None:
            record["trials"].append(opt.last_step.trials)
            record["eta"].append(opt.eta)


def _run(kind, world, rank, steps=STEPS, **kw):
    model, opt = _build(kind, world, **kw)
    rec = {"trials": [], "eta": []}
    _train(model, opt, rank, 0, steps, rec)
    rec["params"] = [_full(p) for p in model.parameters()]
    rec["counters"] = dict(opt.counters)
    return rec


def _host(opt):
    return (opt.eta, opt.t, dict(opt.counters), opt._fast, opt._slow, opt._last_search_t)


def _checkpoint_resume(kind, world, rank, path, flatten=False):
    """Save after 6 steps with torch.distributed.checkpoint, go on 6; a fresh model/optimizer
    (other init) loads the checkpoint and goes on the same 6 steps: bit-identical.  ``flatten``:
    StateDictOptions(flatten_optimizer_state_dict=True) (param-group keys stored per parameter)."""
    import functools

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict as _get
    from torch.distributed.checkpoint.state_dict import set_state_dict as _set
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    get_state_dict = functools.partial(_get, options=options)
    set_state_dict = functools.partial(_set, options=options)
    model, opt = _build(kind, world, variant="salsa")       # "auto" schedule: host state matters
    _train(model, opt, rank, 0, 6)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    _train(model, opt, rank, 6, 12)
    want = ([_local(p) for p in model.parameters()], _host(opt))

    torch.manual_seed(123)
    model2, opt2 = _build(kind, world, variant="salsa", init_step_size=0.01)
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(0.5)                                    # really another starting point
    msd2, osd2 = get_state_dict(model2, opt2)              # steps opt2 without a closure
    assert opt2.t == 0 and opt2.counters["steps"] == 0
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt2.hyper.init_step_size == OPT_KW["init_step_size"], "saved hyperparameters win"
    _train(model2, opt2, rank, 6, 12)
    got = ([_local(p) for p in model2.parameters()], _host(opt2))
    return {"same_params": all(torch.equal(a, b) for a, b in zip(want[0], got[0])),
            "want_host": want[1], "got_host": got[1]}


def _raising_trial(kind, world, rank, bad_rank, out_dir):
    """Step 3: ``bad_rank``'s closure raises in its first trial.  Every rank must end that step
    with its parameters at w0 (the others through a collective error or the group's timeout),
    then the process exits without touching the (now broken) group."""
    model, opt = _build(kind, world)
    _train(model, opt, rank, 0, 3)
    x, y = _batch(3, rank)
    w0 = [_local(p) for p in model.parameters()]
    eta0 = opt.eta
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if rank == bad_rank and calls["n"] == 2:
            raise RuntimeError("injected failure in a trial forward")
        return _loss(model, x, y)

    opt.zero_grad()
    t0 = time.monotonic()
    try:
        opt.step(closure)
        error = None
    except Exception as exc:                               # noqa: BLE001 (recorded for the parent)
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    res = {"error": error, "seconds": time.monotonic() - t0, "eta_restored": opt.eta == eta0,
           "at_w0": all(torch.equal(a, _local(p)) for a, p in zip(w0, model.parameters()))}
    torch.save(res, os.path.join(out_dir, f"raise_rank{rank}.pt"))
    os._exit(0)                                            # never wait on the broken group


def _main_2(rank, world, store, out_dir):
    _init(rank, world, store)
    res = {"ddp": _run("ddp", world, rank), "fsdp": _run("fsdp", world, rank),
           "fsdp_reference": _run("fsdp", world, rank, backend="reference")}
    try:
        res["fsdp_triton"] = _run("fsdp", world, rank, steps=3, backend="triton")
        res["fsdp_foreach_3"] = _run("fsdp", world, rank, steps=3)
    except (ImportError, BackendUnavailable) as exc:       # no triton, or not this contract yet
        res["triton_missing"] = str(exc)[:300]
    ckpt = os.path.join(out_dir, "dcp")
    res["dcp_ddp"] = _checkpoint_resume("ddp", world, rank, ckpt + "_ddp")
    res["dcp_fsdp"] = _checkpoint_resume("fsdp", world, rank, ckpt + "_fsdp")
    res["dcp_fsdp_flat"] = _checkpoint_resume("fsdp", world, rank, ckpt + "_fsdp_flat", flatten=True)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    _raising_trial("fsdp", world, rank, 1, out_dir)        # exits the process


def _main_4(rank, world, store, out_dir):
    _init(rank, world, store)
    res = {"ddp": _run("ddp", world, rank), "fsdp": _run("fsdp", world, rank),
           "hsdp": _run("hsdp", world, rank)}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    _raising_trial("ddp", world, rank, 2, out_dir)


# -- FSDP2: every sharding, every reshard_after_forward (stale unsharded copies) -------------------

SHARDINGS = ("root", "layers", "mixed")           # root only; per layer + root; one layer + root
RESHARD = (None, True, False)                      # fully_shard's reshard_after_forward (None: default)


def _stale_trials(world, rank, mesh, sharding, reshard, user_gradients=False):
    """3 searching steps (a large first step size: many trials).  Inside the closure every loss
    the module computes is compared with a plain replica holding the optimizer's parameters (the
    DTensors, gathered): FSDP2 keeps an unsharded copy after a forward that does not reshard (the
    root by default, reshard_after_forward=False, no_grad forwards) and reuses it.
    ``user_gradients``: the forward/backward in opt.micro_batch, then opt.step()."""
    from torch.distributed.fsdp import fully_shard
    model, replica = _model(), _model()
    kw = {} if reshard is None else {"reshard_after_forward": reshard}
    if sharding in ("layers", "mixed"):
        fully_shard(model[0], mesh=mesh, **kw)
    if sharding == "layers":
        fully_shard(model[2], mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, backend="foreach",
                 init_step_size=20.0)
    params = list(opt.param_groups[0]["params"])
    stale, calls, resharded = 0, 0, True
    for k in range(3):
        x, y = _batch(k, rank)

        def closure(x=x, y=y):
            nonlocal stale, calls
            loss = _loss(model, x, y)
            with torch.no_grad():
                for r, p in zip(replica.parameters(), params):
                    r.copy_(_full(p))
                calls += 1
                stale += not torch.allclose(loss, _loss(replica, x, y), rtol=1e-5, atol=1e-6)
            return loss

        opt.zero_grad()
        if user_gradients:
            with opt.micro_batch(trial=closure) as mb:
                mb.loss = closure()
                mb.loss.backward()
            opt.step()
        else:
            opt.step(closure)
        # resharded: the module holds the sharded parameters again (the next forward gathers)
        resharded &= all(a is b for a, b in zip(model.parameters(), params))
    return {"stale": stale, "calls": calls, "resharded": resharded,
            "params": [_full(p) for p in params]}


def _main_stale(rank, world, store, out_dir):
    _init(rank, world, store)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        res = {(s, r): _stale_trials(world, rank, mesh, s, r) for s in SHARDINGS for r in RESHARD}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _teardown()


@pytest.mark.slow   # process groups of gloo workers: 4-11 s each
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_trials_see_the_written_parameters_whatever_the_sharding(tmp_path, world):
    _spawn(_main_stale, world, str(tmp_path))
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    first = res[SHARDINGS[1], None]                    # the README's recipe
    for key, r in res.items():
        assert r["stale"] == 0, f"{key}: {r['stale']} of {r['calls']} forwards ran on stale parameters"
        assert r["resharded"], f"{key}: step() left the module unsharded"
        assert r["calls"] == first["calls"], f"{key}: {r['calls']} closure calls, not {first['calls']}"
        for a, b in zip(r["params"], first["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp2_one_rank_root_only_trials_see_the_written_parameters(tmp_path):
    """One rank, in this process: FSDP2 all-gathers into an unsharded copy even so."""
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for reshard in RESHARD:
            for user_gradients in (False, True):
                r = _stale_trials(1, 0, mesh, "root", reshard, user_gradients)
                key = (reshard, user_gradients)
                assert r["stale"] == 0, f"{key}: {r['stale']} of {r['calls']} forwards were stale"
                assert r["resharded"], f"{key}: step() left the module unsharded"
    finally:
        dist.destroy_process_group()


def _main_1(rank, world, store, out_dir):
    _init(rank, world, store)
    try:
        torch.save({"fsdp": _run("fsdp", world, rank)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _teardown()


def _single_process(world, steps=STEPS, **kw):
    model = _model()
    opt = ALSALS(model.parameters(), backend="foreach", **{**OPT_KW, **kw})
    rec = {"trials": [], "eta": []}
    for k in range(steps):
        batches = [_batch(k, r) for r in range(world)]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        opt.zero_grad()
        opt.step(lambda x=x, y=y: _loss(model, x, y))
        rec["trials"].append(opt.last_step.trials)
        rec["eta"].append(opt.eta)
    rec["params"] = [p.detach().clone() for p in model.parameters()]
    return rec


def _max_diff(a, b):
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def _check_world(out_dir, world, kinds):
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    single = _single_process(world)
    report = {}
    for kind in kinds:
        runs = [r[kind] for r in ranks]
        for other in runs[1:]:                             # every rank: the same bits
            assert other["trials"] == runs[0]["trials"] and other["eta"] == runs[0]["eta"], kind
            assert all(torch.equal(a, b) for a, b in zip(other["params"], runs[0]["params"])), kind
        run = runs[0]
        assert run["trials"] == single["trials"], f"{kind}: decisions differ from one process"
        for a, b in zip(run["eta"], single["eta"]):
            assert a == pytest.approx(b, rel=1e-6), kind
        for a, b in zip(run["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, kind=kind: f"{kind}: {m}")
        report[kind] = _max_diff(run["params"], single["params"])
    if "fsdp" in kinds and "ddp" in kinds:
        report["fsdp_vs_ddp"] = _max_diff(ranks[0]["fsdp"]["params"], ranks[0]["ddp"]["params"])
    print(f"\n{world} ranks, {STEPS} steps, max |param diff| vs one process:", report)
    return ranks


def _check_raising(out_dir, world, bad_rank):
    res = [torch.load(os.path.join(out_dir, f"raise_rank{r}.pt"), weights_only=False) for r in range(world)]
    assert "injected failure" in res[bad_rank]["error"]
    for r, x in enumerate(res):
        assert x["error"] is not None, f"rank {r} finished the step as if nothing happened"
        assert x["at_w0"], f"rank {r} did not end the step at w0 ({x['error']})"
        assert x["eta_restored"], f"rank {r}"
        assert x["seconds"] < PG_TIMEOUT.total_seconds() + 15, f"rank {r} waited {x['seconds']:.0f} s"
    print(f"{world} ranks, closure raising on rank {bad_rank}:",
          [(r, round(x["seconds"], 1), x["error"][:60]) for r, x in enumerate(res)])


@pytest.mark.slow   # process groups of gloo workers: 4-11 s each
def test_two_ranks_fsdp2_ddp_checkpoints_and_a_raising_closure(tmp_path):
    _spawn(_main_2, 2, str(tmp_path))
    ranks = _check_world(str(tmp_path), 2, ["ddp", "fsdp", "fsdp_reference"])
    r0 = ranks[0]
    if "triton_missing" in r0:
        print("triton backend not run:", r0["triton_missing"])
    else:
        a, b = r0["fsdp_triton"], r0["fsdp_foreach_3"]
        assert a["trials"] == b["trials"]
        for x, y in zip(a["params"], b["params"]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for kind in ("dcp_ddp", "dcp_fsdp", "dcp_fsdp_flat"):
        for r in ranks:
            assert r[kind]["same_params"], f"{kind}: the resumed run differs"
            assert r[kind]["got_host"] == r[kind]["want_host"], kind
    _check_raising(str(tmp_path), 2, 1)


@pytest.mark.slow   # process groups of gloo workers: 4-11 s each
def test_four_ranks_fsdp2_hsdp_ddp_and_a_raising_closure(tmp_path):
    _spawn(_main_4, 4, str(tmp_path))
    _check_world(str(tmp_path), 4, ["ddp", "fsdp", "hsdp"])
    _check_raising(str(tmp_path), 4, 2)


@pytest.mark.slow   # process groups of gloo workers: 4-11 s each
def test_one_rank_fsdp2_matches_one_process(tmp_path):
    """The first report: FSDP2 failed even with one rank (DTensor ops in the driver)."""
    _spawn(_main_1, 1, str(tmp_path))
    _check_world(str(tmp_path), 1, ["fsdp"])


def test_sharded_needs_a_group():
    with pytest.raises(ValueError, match="sharded=True needs process_group"):
        ALSALS([torch.nn.Parameter(torch.zeros(2))], sharded=True)


# -- the original float64 DDP check (section 6) -------------------------------------------------------

def _rank_main_fp64(rank, world, store, out_dir):
    _init(rank, world, store)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
        model = torch.nn.parallel.DistributedDataParallel(net)
        opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, init_step_size=1.0)
        x, y = _fp64_batches()[rank]
        for _ in range(6):
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        torch.save({"params": [p.detach() for p in model.parameters()], "eta": opt.eta,
                    "trials": opt.counters["trials"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _teardown()


def _fp64_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 5, generator=gen, dtype=torch.float64),
             torch.randn(8, 2, generator=gen, dtype=torch.float64)) for _ in range(2)]


@pytest.mark.slow   # process groups of gloo workers: 4-11 s each
def test_ddp_ranks_agree_and_match_the_single_process_mean_loss_fp64(tmp_path):
    _spawn(_rank_main_fp64, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["eta"] == r1["eta"] and r0["trials"] == r1["trials"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
    opt = ALSALS(model.parameters(), init_step_size=1.0)
    (x0, y0), (x1, y1) = _fp64_batches()
    for _ in range(6):
        opt.zero_grad()
        opt.step(lambda: (torch.nn.functional.mse_loss(model(x0), y0)
                          + torch.nn.functional.mse_loss(model(x1), y1)) / 2)
    assert opt.counters["trials"] == r0["trials"] and opt.eta == pytest.approx(r0["eta"], rel=1e-12)
    for a, b in zip(model.parameters(), r0["params"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


def _plateau_batches():
    """fp64 batches, cycled: rank 0 three of them (its loss soon bounces on a plateau), rank 1
    the same one at every step (its loss alone keeps falling and never drops)."""
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(8, 5, generator=gen, dtype=torch.float64),
                torch.randn(8, 2, generator=gen, dtype=torch.float64)) for _ in range(4)]
    return [batches[:3], [batches[3]] * 3]


def _plateau_run(opt, loss_at, steps=24):
    """alsals_plateau testing every 2 steps on 4+ kept losses: drops within the run."""
    opt.hyper = dataclasses.replace(opt.hyper, drop_min_samples=3, drop_every=2)
    drops = []
    for k in range(steps):
        opt.zero_grad()
        opt.step(lambda k=k: loss_at(k))
        drops.append(opt._plateau.drops)
    return drops


def _plateau_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()


def _rank_main_plateau(rank, world, store, out_dir):
    _init(rank, world, store)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_plateau_net())
        opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, variant="alsals_plateau",
                     line_search_every=1)
        mine = _plateau_batches()[rank]
        drops = _plateau_run(opt, lambda k: torch.nn.functional.mse_loss(model(mine[k % 3][0]), mine[k % 3][1]))
        torch.save({"drops": drops, "eta": opt.eta, "params": [p.detach() for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _teardown()


@pytest.mark.slow   # process groups of gloo workers
def test_ddp_ranks_drop_on_a_plateau_at_the_same_steps_as_the_mean_loss(tmp_path):
    """The plateau test reads the loss averaged over the ranks: each rank's own loss (different
    batches) would drop at other steps and leave the ranks with different step sizes."""
    _spawn(_rank_main_plateau, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["drops"] == r1["drops"] and r0["eta"] == r1["eta"] and r0["drops"][-1] > 1
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    model = _plateau_net()
    opt = ALSALS(model.parameters(), variant="alsals_plateau", line_search_every=1)
    ranks = _plateau_batches()

    def mean_loss(k):
        return sum(torch.nn.functional.mse_loss(model(x), y) for x, y in (b[k % 3] for b in ranks)) / 2
    assert _plateau_run(opt, mean_loss) == r0["drops"]


def test_dtensor_params_without_a_process_group_are_refused():
    """Checked in one process: a 1-rank mesh needs no group, so only the message is tested here."""
    from alsals_fused import distributed as d
    assert not d.needs_process_group([torch.zeros(2)])
    assert math.isfinite(float(d.mean_over(torch.tensor(2.0), None)))
