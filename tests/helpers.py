"""The small model and data the tests share (backend_suite.run_trajectory trains it)."""
from __future__ import annotations

import torch


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
