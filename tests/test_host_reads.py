"""A searching step reads the device exactly once per trial; a step that does not search, never.

On CPU the fused Triton backend runs through the driver with its kernel launches stubbed out (the
interpreter itself converts arguments on the host), and every way Python can read a tensor's value
(.item, .tolist, bool, float, int, index) is counted.  On a GPU the same is checked with torch's
sync debug mode, kernels included.
"""
import warnings

import pytest
import torch

from alsals_fused import ALSALS, available_backends
from helpers import OddModel, make_data

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _steps(opt, model, x, y, n=6):
    """(trials, reads) per step, with reads counted by ``count()`` around each step."""
    for _ in range(n):
        opt.zero_grad()
        yield lambda: opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))


def _hot_path():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "hot_path.py")
    spec = importlib.util.spec_from_file_location("hot_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(available_backends("cpu")["triton"] is not None or torch.cuda.is_available(),
                    reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("variant", ["alsals", "adam_sls", "salsa"])
def test_driver_with_the_triton_backend_reads_once_per_trial(monkeypatch, variant):
    # Launches go through TritonBackend._launch (contract v2); benchmarks/hot_path.py's stubs
    # count them and fill what the finishers and the verdict kernel would write.
    why = _hot_path().stub_triton([None], setattr=monkeypatch.setattr)
    if why is not None:
        pytest.skip(why)
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend="triton", variant=variant, max_trials=3,
                 line_search_every=2)
    reads = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    seen_search = seen_plain = False
    for step in _steps(opt, model, x, y, n=4):
        before = reads["n"]
        step()
        info = opt.last_step
        assert reads["n"] - before == info.trials, f"{reads['n'] - before} reads, {info.trials} trials"
        seen_search |= info.searched
        seen_plain |= not info.searched
    assert seen_search and seen_plain


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_step_syncs_once_per_trial(backend):
    if available_backends("cuda")[backend] is not None:
        pytest.skip(available_backends("cuda")[backend])
    model = OddModel().cuda()
    x, y = (t.cuda() for t in make_data())
    opt = ALSALS(model.parameters(), backend=backend, line_search_every=2, init_step_size=5.0)
    for step in _steps(opt, model, x, y):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == opt.last_step.trials
