"""The quality harness's workloads: small, offline, one CPU thread each.

Every workload makes its data from a seed (or from this machine's Python standard-library sources,
like the demo), so nothing is downloaded.  A workload gives a model factory, a training set that
is sampled in mini-batches, a held-out set, the loss and a held-out metric.  Kinds: recurrent
(GRU), attention (a byte-level GPT with dropout), convolutional with BatchNorm, tabular (a
separable teacher: the loss can reach ~1e-6, where the Armijo test meets fp32 resolution), and
regression.  The sizes are chosen for a few seconds per run on one core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alsals_fused.examples.data import get_batch, load_corpus
from alsals_fused.examples.models import ByteGPT, GPTConfig, lm_loss


@dataclass
class Workload:
    name: str
    kind: str
    steps: int                      # full run's step budget
    quick_steps: int                # --quick's
    batch_size: int
    make_data: Callable[[int], "Data"]
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: str = "accuracy"        # "accuracy" or "r2" (regression)
    has_buffers: bool = False       # BatchNorm: ALSALS gets buffers=model
    split: str = "tune"             # "tune": rules are chosen on it; "confirm": only checked on it
    description: str = ""


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    batch: Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]] = None   # index -> (x, y)
    test_batches: list = field(default_factory=list)                    # [(x, y)] for evaluation

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def get(self, idx: Tensor) -> Tuple[Tensor, Tensor]:
        return self.batch(idx) if self.batch is not None else (self.x_train[idx], self.y_train[idx])

    def tests(self):
        return self.test_batches or [(self.x_test, self.y_test)]


def _split(sample: Callable[[int], Tuple[Tensor, Tensor]], n_train: int, n_test: int) -> Data:
    """A training set, then a held-out set, drawn in that order from one generator."""
    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return Data(xtr, ytr, xte, yte)


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y)


# -- recurrent: which of 4 Markov chains emitted a sequence (GRU) ---------------------------------
def _markov_data(seed: int, vocab=8, classes=4, length=24, n_train=2048, n_test=512) -> Data:
    g = torch.Generator().manual_seed(1000 + seed)
    trans = _rows(g, (classes, vocab, vocab), 0.5)

    def sample(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
        for t in range(1, length):
            probs = trans[y, x[:, t - 1]]
            x[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(1)
        return x, y
    return _split(sample, n_train, n_test)


def _rows(g: torch.Generator, shape, alpha: float) -> Tensor:
    """Random transition rows, sharpened by a power of uniforms (alpha < 1: sharper)."""
    u = torch.rand(shape, generator=g)
    w = u ** (1 / alpha)
    return w / w.sum(-1, keepdim=True)


class GRUClassifier(nn.Module):
    def __init__(self, vocab=8, emb=16, hidden=32, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(self.emb(x))
        return self.head(h[-1])


# -- attention: byte-level GPT with dropout on the standard library's sources ---------------------
_CORPUS = {}
GPT_TINY = dict(context=32, n_layer=1, n_head=4, d_model=48, dropout=0.1)
GPT_TWO = dict(GPT_TINY, n_layer=2)


def _text_data(seed: int, context: int = GPT_TINY["context"], n_test_windows=256) -> Data:
    if "c" not in _CORPUS:
        _CORPUS["c"] = load_corpus(300_000, 60_000)
    corpus = _CORPUS["c"]
    starts = torch.arange(0, len(corpus.train) - context - 1, 7)       # the training windows
    test_starts = torch.linspace(0, len(corpus.heldout) - context - 2, n_test_windows).round().long()
    xte, yte = get_batch(corpus.heldout, test_starts, context)

    def batch(idx):
        return get_batch(corpus.train, starts[idx], context)
    return Data(starts, starts, xte, yte, batch=batch)


def _lm_loss(out: Tensor, y: Tensor) -> Tensor:
    return lm_loss(out, y)


# -- convolutional with BatchNorm: shifted noisy templates ----------------------------------------
def _image_data(seed: int, classes=4, size=12, n_train=2048, n_test=512, noise=0.9) -> Data:
    g = torch.Generator().manual_seed(2000 + seed)
    base = torch.randn(classes, 1, size // 2, size // 2, generator=g)
    templates = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = templates[y].clone()
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        for i in range(n):
            x[i] = torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        x = x + noise * torch.randn(x.shape, generator=g)
        return x, y
    return _split(sample, n_train, n_test)


class SmallCNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# -- tabular: a separable teacher (loss can reach ~1e-6) ------------------------------------------
def _tabular_data(seed: int, features=16, classes=3, n_train=1024, n_test=512) -> Data:
    g = torch.Generator().manual_seed(3000 + seed)
    w1 = torch.randn(features, 16, generator=g)
    w2 = torch.randn(16, classes, generator=g)

    def sample(n):
        x = torch.randn(n, features, generator=g)
        x[:, : features // 4] = x[:, : features // 4].sign()          # a few binary columns
        y = (torch.tanh(x @ w1) @ w2).argmax(1)
        return x, y
    return _split(sample, n_train, n_test)


def _mlp(inp, out, hidden=64, act=nn.ReLU):
    return nn.Sequential(nn.Linear(inp, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, out))


# -- regression: a sum of random sinusoids plus noise -----------------------------------------------
def _regression_data(seed: int, features=8, n_train=2048, n_test=512, noise=0.05) -> Data:
    g = torch.Generator().manual_seed(4000 + seed)
    w = torch.randn(features, 6, generator=g)
    b = torch.rand(6, generator=g) * 2 * math.pi
    a = torch.randn(6, generator=g) / math.sqrt(6)

    def sample(n):
        x = torch.randn(n, features, generator=g)
        y = torch.sin(x @ w + b) @ a
        return x, (y + noise * torch.randn(n, generator=g)).unsqueeze(1)
    return _split(sample, n_train, n_test)


# -- attention: a small Transformer encoder that sorts digit sequences ------------------------------
def _sort_data(seed: int, vocab=10, length=12, n_train=4096, n_test=512) -> Data:
    """Each target position is the sorted input's symbol there: every output attends to all inputs."""
    g = torch.Generator().manual_seed(5000 + seed)

    def sample(n):
        x = torch.randint(0, vocab, (n, length), generator=g)
        return x, x.sort(dim=1).values
    return _split(sample, n_train, n_test)


class SortEncoder(nn.Module):
    def __init__(self, vocab=10, length=12, d_model=32, heads=4, layers=2, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(x) + self.pos))


def _token_ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# -- small dense net that reaches near-zero loss: two interleaved spirals ---------------------------
def _spiral_data(seed: int, n_train=1024, n_test=512, turns=1.5, noise=0.02) -> Data:
    g = torch.Generator().manual_seed(6000 + seed)

    def sample(n):
        y = torch.randint(0, 2, (n,), generator=g)
        r = torch.rand(n, generator=g)
        theta = 2 * math.pi * turns * r + math.pi * y
        x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
        return x + noise * torch.randn(x.shape, generator=g), y
    return _split(sample, n_train, n_test)


# -- convolution with BatchNorm, deeper: oriented gratings of 6 orientations ----------------------
def _grating_data(seed: int, classes=6, size=16, n_train=2048, n_test=512, noise=1.0) -> Data:
    g = torch.Generator().manual_seed(7000 + seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")

    def sample(n):
        y = torch.randint(0, classes, (n,), generator=g)
        angle = math.pi * y.float() / classes + 0.15 * torch.randn(n, generator=g)
        freq = 0.6 + 0.4 * torch.rand(n, generator=g)
        phase = 2 * math.pi * torch.rand(n, generator=g)
        proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
        x = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
        x = x + noise * torch.randn(x.shape, generator=g)
        return x.unsqueeze(1), y
    return _split(sample, n_train, n_test)


class GratingCNN(nn.Module):
    def __init__(self, classes=6):
        super().__init__()

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        self.net = nn.Sequential(*block(1, 8, 1), *block(8, 16, 2), *block(16, 16, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# -- recurrent, second kind: an LSTM counts which symbol occurs most often --------------------------
def _count_data(seed: int, vocab=5, length=20, n_train=2048, n_test=512) -> Data:
    g = torch.Generator().manual_seed(8000 + seed)

    def sample(n):
        x = torch.randint(0, vocab, (n, length), generator=g)
        counts = F.one_hot(x, vocab).sum(1).float() + 0.1 * torch.arange(vocab)   # ties: larger id
        return x, counts.argmax(1)
    return _split(sample, n_train, n_test)


class LSTMCounter(nn.Module):
    def __init__(self, vocab=5, emb=8, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


# -- regression, second kind: Friedman's function #1, ReLU MLP ------------------------------------
def _friedman_data(seed: int, features=10, n_train=2048, n_test=512, noise=0.1) -> Data:
    g = torch.Generator().manual_seed(9000 + seed)

    def sample(n):
        x = torch.rand(n, features, generator=g)
        y = (10 * torch.sin(math.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3]
             + 5 * x[:, 4]) / 5.0 - 2.9                                       # about zero mean, unit sd
        return x, (y + noise * torch.randn(n, generator=g)).unsqueeze(1)
    return _split(sample, n_train, n_test)


# -- held-out (round 9 confirmation): added after every rule's constants were fixed ----------------
# The three workloads below were added after every rule's constants (candidates.json, rounds 1-8)
# had been fixed, to check the chosen rule on workloads that no rule was tuned on.  Their sizes
# were set from Adam grid runs only.
_DIGITS = {}


def _digits() -> Tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1]."""
    if "d" not in _DIGITS:
        from sklearn.datasets import load_digits  # imported here: only these workloads need it
        d = load_digits()
        _DIGITS["d"] = (torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long))
    return _DIGITS["d"]


def _digits_split(seed: int, base: int, n_test=397) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A seeded permutation of the 1797 digits: 1400 for training, 397 held out."""
    x, y = _digits()
    g = torch.Generator().manual_seed(base + seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:-n_test], perm[-n_test:]
    return x[tr], y[tr], x[te], y[te]


# -- attention, held-out: a tiny vision transformer on the 8x8 digits ------------------------------
def _vit_digits_data(seed: int) -> Data:
    xtr, ytr, xte, yte = _digits_split(seed, 11_000)
    return Data(xtr.view(-1, 8, 8), ytr, xte.view(-1, 8, 8), yte)


class TinyViT(nn.Module):
    """2x2 patches (16 tokens), a class token, a pre-norm Transformer encoder, a linear head."""

    def __init__(self, patch=2, size=8, d_model=32, heads=4, layers=2, classes=10):
        super().__init__()
        self.patch, n = patch, (size // patch) ** 2
        self.embed = nn.Linear(patch * patch, d_model)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d_model))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        b, p = x.shape[0], self.patch
        tokens = x.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)     # (b, 16, 4)
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(tokens)], 1) + self.pos
        return self.head(self.norm(self.enc(h)[:, 0]))


# -- dense, held-out: an MLP autoencoder on the digits ---------------------------------------------
def _ae_digits_data(seed: int) -> Data:
    xtr, _, xte, _ = _digits_split(seed, 12_000)
    return Data(xtr, xtr, xte, xte)


def _autoencoder() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(),
                         nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 64))


# -- convolutional (1-D, no BatchNorm), held-out: count a motif in a noisy signal ----------------
def _motif_data(seed: int, length=64, motif_len=8, classes=4, n_train=2048, n_test=512,
                noise=0.5) -> Data:
    """Class k: a random motif is added k times (k = 0..3) to a noisy 1-D signal that also holds
    1-2 copies of a distractor motif of the same scale; the label is the count of the motif."""
    g = torch.Generator().manual_seed(13_000 + seed)
    motifs = torch.randn(2, motif_len, generator=g)
    motifs = motifs / motifs.norm(dim=1, keepdim=True) * math.sqrt(motif_len)

    def sample(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = noise * torch.randn(n, length, generator=g)
        distract = torch.randint(1, 3, (n,), generator=g)
        starts = torch.randint(0, length - motif_len + 1, (n, classes - 1 + 2), generator=g)
        for i in range(n):
            for j in range(int(y[i])):
                s = int(starts[i, j])
                x[i, s:s + motif_len] += motifs[0]
            for j in range(int(distract[i])):
                s = int(starts[i, classes - 1 + j])
                x[i, s:s + motif_len] += motifs[1]
        return x.unsqueeze(1), y
    return _split(sample, n_train, n_test)


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels at each time step of a (batch, channels, time) tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class MotifTCN(nn.Module):
    """Four dilated Conv1d layers (kernel 3, dilations 1, 2, 4, 8) with LayerNorm over channels,
    a mean over time and a linear head: no BatchNorm."""

    def __init__(self, channels=32, classes=4):
        super().__init__()
        layers, c_in = [], 1
        for d in (1, 2, 4, 8):
            layers += [nn.Conv1d(c_in, channels, 3, dilation=d, padding=d), _ChannelNorm(channels), nn.ReLU()]
            c_in = channels
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x).mean(-1))


# -- held-out (round 13): a second held-out set, added after round 12 -------------------------------
# Added after every rule had been chosen and after rounds 9-12 had read the first held-out set;
# their sizes were set from Adam grid runs only, before any line search ran on them.
def _diabetes_data(seed: int, n_test=88) -> Data:
    """scikit-learn's bundled diabetes regression (442 patients, 10 features; no download):
    features and target scaled to unit sd, a seeded split of 354 training / 88 held-out rows."""
    from sklearn.datasets import load_diabetes  # imported here: only this workload needs it
    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0), ((y - y.mean()) / y.std()).unsqueeze(1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(14_000 + seed))
    tr, te = perm[:-n_test], perm[-n_test:]
    return Data(x[tr], y[tr], x[te], y[te])


class CharLSTM(nn.Module):
    """A byte-level language model: embedding (32), one LSTM(96) layer, a linear head over bytes."""

    def __init__(self, emb=32, hidden=96):
        super().__init__()
        self.emb = nn.Embedding(256, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out)


def _digits_image_data(seed: int) -> Data:
    xtr, ytr, xte, yte = _digits_split(seed, 15_000)
    return Data(xtr.view(-1, 1, 8, 8), ytr, xte.view(-1, 1, 8, 8), yte)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (16 and 32 channels, ReLU, no normalization layer), a 2x2 max-pool
    and a linear head, on the 8x8 digits."""

    def __init__(self, classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                 nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x).flatten(1))


WORKLOADS: Dict[str, Workload] = {w.name: w for w in [
    Workload("gru_markov", "recurrent", steps=800, quick_steps=300, batch_size=32,
             make_data=_markov_data, make_model=GRUClassifier, loss_fn=_cross_entropy,
             description="GRU(32) classifies which of 4 random Markov chains (8 symbols) emitted a "
                         "24-step sequence; 2048 train / 512 held-out sequences"),
    Workload("gpt_bytes", "attention", steps=500, quick_steps=200, batch_size=16,
             make_data=_text_data, make_model=lambda: ByteGPT(GPTConfig(**GPT_TINY)),
             loss_fn=_lm_loss,
             description="1-layer byte-level GPT (d=48, 4 heads, context 32, dropout 0.1) on 300 kB "
                         "of Python standard-library sources; accuracy = next byte"),
    Workload("cnn_bn", "convolutional+BatchNorm", steps=600, quick_steps=250, batch_size=32,
             make_data=_image_data, make_model=SmallCNN, loss_fn=_cross_entropy, has_buffers=True,
             description="2-conv CNN with BatchNorm on 12x12 noisy, randomly shifted templates of "
                         "4 classes; 2048 train / 512 held-out images"),
    Workload("tabular_sep", "tabular", steps=1200, quick_steps=500, batch_size=64,
             make_data=_tabular_data, make_model=lambda: _mlp(16, 3), loss_fn=_cross_entropy,
             description="MLP 16-64-64-3 on 1024 rows labelled by a random teacher network "
                         "(separable: the training loss can approach 0)"),
    Workload("regression", "regression", steps=1000, quick_steps=400, batch_size=64,
             make_data=_regression_data, make_model=lambda: _mlp(8, 1, act=nn.Tanh), loss_fn=_mse,
             metric="r2",
             description="MLP 8-64-64-1 (tanh) regresses a sum of 6 random sinusoids of 8 inputs "
                         "plus noise (sd 0.05); metric R^2"),
    # Confirmation workloads (rules are chosen on the five above, then checked on these).
    Workload("encoder_sort", "attention", steps=800, quick_steps=300, batch_size=32,
             make_data=_sort_data, make_model=SortEncoder, loss_fn=_token_ce, split="confirm",
             description="2-layer pre-norm Transformer encoder (d=32, 4 heads) sorts 12 digits; "
                         "4096 train / 512 held-out sequences; accuracy per position"),
    Workload("gpt_bytes_long", "attention", steps=1200, quick_steps=300, batch_size=16,
             make_data=_text_data, make_model=lambda: ByteGPT(GPTConfig(**GPT_TWO)), loss_fn=_lm_loss,
             split="confirm",
             description="2-layer byte-level GPT (d=48, 4 heads, context 32, dropout 0.1) on the "
                         "standard-library sources, 1200 steps: long enough for the step size to matter"),
    Workload("spirals", "dense, near-zero loss", steps=1200, quick_steps=500, batch_size=64,
             make_data=_spiral_data, make_model=lambda: _mlp(2, 2), loss_fn=_cross_entropy, split="confirm",
             description="MLP 2-64-64-2 on two interleaved spirals (1.5 turns, noise 0.02): "
                         "separable, the training loss can approach 0"),
    Workload("cnn_bn_gratings", "convolutional+BatchNorm", steps=600, quick_steps=250, batch_size=32,
             make_data=_grating_data, make_model=GratingCNN, loss_fn=_cross_entropy, has_buffers=True,
             split="confirm",
             description="3-conv CNN with BatchNorm (no conv bias) on 16x16 noisy gratings of 6 "
                         "orientations; 2048 train / 512 held-out images"),
    Workload("lstm_count", "recurrent", steps=800, quick_steps=300, batch_size=32,
             make_data=_count_data, make_model=LSTMCounter, loss_fn=_cross_entropy, split="confirm",
             description="LSTM(32) names the most frequent of 5 symbols in a 20-symbol sequence; "
                         "2048 train / 512 held-out"),
    Workload("friedman", "regression", steps=1000, quick_steps=400, batch_size=64,
             make_data=_friedman_data, make_model=lambda: _mlp(10, 1), loss_fn=_mse, metric="r2",
             split="confirm",
             description="MLP 10-64-64-1 (ReLU) regresses Friedman's function #1 (noise sd 0.1 on a "
                         "unit-scale target); metric R^2"),
    # Held-out (round 9 confirmation): added after every rule's constants were fixed; no rule was
    # chosen or tuned on these three (split "confirm").
    Workload("vit_digits", "attention", steps=800, quick_steps=300, batch_size=32,
             make_data=_vit_digits_data, make_model=TinyViT, loss_fn=_cross_entropy, split="confirm",
             description="held-out: tiny ViT (2x2 patches, 16 tokens + class token, d=32, 4 heads, 2 pre-norm "
                         "layers) classifies scikit-learn's 8x8 digits; 1400 train / 397 held-out"),
    Workload("ae_digits", "dense autoencoder", steps=1200, quick_steps=500, batch_size=16,
             make_data=_ae_digits_data, make_model=_autoencoder, loss_fn=_mse, metric="r2", split="confirm",
             description="held-out: tanh MLP autoencoder 64-32-8-32-64 reconstructs scikit-learn's 8x8 digits "
                         "(pixels in [0, 1]), MSE; 1400 train / 397 held-out; metric R^2"),
    Workload("tcn_motif", "convolutional 1-D (LayerNorm)", steps=800, quick_steps=300, batch_size=32,
             make_data=_motif_data, make_model=MotifTCN, loss_fn=_cross_entropy, split="confirm",
             description="held-out: 4 dilated Conv1d layers (32 channels, LayerNorm, no BatchNorm) count "
                         "(0-3) a random motif in a noisy (sd 0.5) 64-step signal with 1-2 distractor motifs; "
                         "2048 train / 512 held-out"),
    # Held-out, second set (round 13): added after round 12; no rule was chosen on these.
    Workload("diabetes_mlp", "regression (real data)", steps=800, quick_steps=300, batch_size=32,
             make_data=_diabetes_data, make_model=lambda: _mlp(10, 1), loss_fn=_mse, metric="r2",
             split="confirm",
             description="held-out 2: MLP 10-64-64-1 (ReLU) on scikit-learn's diabetes data (10 features, "
                         "target scaled to unit sd); 354 train / 88 held-out; metric R^2"),
    Workload("char_lstm", "recurrent language model", steps=800, quick_steps=300, batch_size=16,
             make_data=_text_data, make_model=CharLSTM, loss_fn=_lm_loss, split="confirm",
             description="held-out 2: byte-level LSTM(96) language model (embedding 32, context 32) on the "
                         "standard-library sources; accuracy = next byte"),
    Workload("cnn_digits", "convolutional (no normalization)", steps=800, quick_steps=300, batch_size=32,
             make_data=_digits_image_data, make_model=DigitsCNN, loss_fn=_cross_entropy, split="confirm",
             description="held-out 2: 2-conv CNN (16, 32 channels, ReLU, max-pool, no normalization layer) "
                         "classifies scikit-learn's 8x8 digits; 1400 train / 397 held-out"),
]}
