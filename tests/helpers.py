"""Small models and trajectory runners shared by the backend comparison tests."""
from __future__ import annotations

from typing import Any, Dict

import torch

from alsals_fused import ALSALS

ODD_SHAPES = [(7, 13), (13,), (1,), (0,), (3, 5, 2), (31,), (129, 3)]


class OddModel(torch.nn.Module):
    """Parameters of odd shapes (primes, an empty tensor, a 1-element one) and dropout."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(7, 13, generator=gen, dtype=dtype) * 0.3)
        self.b1 = torch.nn.Parameter(torch.randn(13, generator=gen, dtype=dtype) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(13, 3, generator=gen, dtype=dtype) * 0.3)
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=dtype))
        self.empty = torch.nn.Parameter(torch.zeros(0, dtype=dtype))
        self.big = torch.nn.Parameter(torch.randn(131, 3, generator=gen, dtype=dtype) * 0.05)
        self.unused = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=dtype))  # never gets a grad
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        h = torch.tanh(self.drop(x @ self.w1 + self.b1))
        out = (h @ self.w2) * self.scale + self.empty.sum()
        return out + 0.01 * self.big.sum(0)

    def groups(self, decay=0.01):
        """Two param groups with different weight decay."""
        return [{"params": [self.w1, self.w2, self.big], "weight_decay": decay},
                {"params": [self.b1, self.scale, self.empty, self.unused], "weight_decay": 0.0}]


def make_data(n=24, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=gen, dtype=dtype), torch.randn(n, 3, generator=gen, dtype=dtype)


def trajectory(backend: str, *, steps=22, dtype=torch.float32, variant="alsals", seed=0,
               batches=4, **opt_kwargs) -> Dict[str, Any]:
    """Train OddModel for ``steps`` steps; record everything a backend is responsible for."""
    model = OddModel(dtype, seed)
    opt = ALSALS(model.groups(), variant=variant, backend=backend, **opt_kwargs)
    data = [make_data(dtype=dtype, seed=seed + 10 + i) for i in range(batches)]
    torch.manual_seed(seed)
    rec: Dict[str, Any] = {"eta": [], "trials": [], "accepted": [], "params": [], "m": [], "v": [], "loss": []}
    for k in range(steps):
        x, y = data[k % batches]

        def closure(x=x, y=y):
            return torch.nn.functional.mse_loss(model(x).float(), y.float())

        opt.zero_grad()
        loss = opt.step(closure)
        rec["loss"].append(float(loss))
        rec["eta"].append(opt.eta)
        info = opt.last_step
        assert info is not None
        rec["trials"].append(info.trials)
        rec["accepted"].append(info.accepted)
        rec["params"].append([p.detach().clone() for p in model.parameters()])
        rec["m"].append([opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state])
        rec["v"].append([opt.state[p]["exp_avg_sq"].clone() for p in model.parameters() if p in opt.state])
    rec["model"], rec["opt"] = model, opt
    return rec


def assert_same_trajectory(a, b, *, rtol, atol, param_atol=None):
    """Identical decisions at every step; params and moments equal within the tolerances."""
    assert a["trials"] == b["trials"], "different number of trials"
    assert a["accepted"] == b["accepted"]
    for step in range(len(a["eta"])):
        assert abs(a["eta"][step] - b["eta"][step]) <= 1e-12 * abs(a["eta"][step]), f"eta at {step}"
        for key, tol in (("params", param_atol), ("m", None), ("v", None)):
            assert len(a[key][step]) == len(b[key][step]), f"{key} at {step}: different tensor counts"
            where = f"{key} at step {step}"
            for x, y in zip(a[key][step], b[key][step], strict=True):
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol if tol is None else tol,
                                           msg=lambda s, where=where: f"{where}: {s}")
