"""Real text that every machine has: the running Python's standard-library sources, as bytes.

Nothing is downloaded.  The corpus is deterministic for a given Python installation (a different
Python version has different sources, hence a different corpus):

- files: every ``.py`` under ``sysconfig.get_paths()["stdlib"]``, minus third-party and cache
  directories (``site-packages`` differs from machine to machine);
- order: sorted by a CRC32 of the relative path (ties by the path), so a byte budget samples the
  whole library instead of the alphabetically first packages, and the order does not depend on
  the file system's listing order;
- split: by file, from another CRC32 of the path, so no file contributes to both sides and a
  file's side does not change when other files come or go;
- budget: files are taken in that order until each side holds its fixed number of bytes (the last
  file of a side is cut to fit).
"""
from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

# Directory names never taken: installed third-party packages and bytecode caches.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SEPARATOR = b"\n"          # between files, so a file's last line does not run into the next one


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_source_files(root: Optional[str] = None) -> List[str]:
    """Relative POSIX paths of the ``.py`` files under ``root``, sorted by path."""
    root = stdlib_root() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):   # symlinked directories are not followed
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _crc(tag: bytes, rel: str) -> int:
    return zlib.crc32(tag + rel.encode("utf-8", "surrogateescape"))


def is_heldout_file(rel: str, heldout_percent: int = 10) -> bool:
    """The file's side of the split: a function of its relative path alone."""
    return _crc(b"split:", rel) % 100 < heldout_percent


@dataclass
class TextCorpus:
    train: Tensor                                   # uint8, 1-D: the training bytes
    heldout: Tensor                                 # uint8, 1-D: the held-out bytes
    train_files: List[str] = field(default_factory=list)
    heldout_files: List[str] = field(default_factory=list)
    root: str = ""

    def describe(self) -> str:
        return (f"{len(self.train):,} train bytes from {len(self.train_files)} files, "
                f"{len(self.heldout):,} held-out bytes from {len(self.heldout_files)} files "
                f"(Python standard library at {self.root})")


def load_corpus(train_bytes: int = 2_000_000, heldout_bytes: int = 200_000,
                heldout_percent: int = 10, root: Optional[str] = None) -> TextCorpus:
    """The standard-library corpus with a fixed byte budget per side (see the module docstring)."""
    if train_bytes <= 0 or heldout_bytes <= 0:
        raise ValueError("train_bytes and heldout_bytes must be positive")
    root = stdlib_root() if root is None else root
    files = sorted(list_source_files(root), key=lambda rel: (_crc(b"order:", rel), rel))
    # is_heldout_file(rel) -> (the side's bytes, its files, its byte budget)
    sides: Dict[bool, Tuple[bytearray, List[str], int]] = {
        False: (bytearray(), [], train_bytes), True: (bytearray(), [], heldout_bytes)}
    for rel in files:
        buf, names, budget = sides[is_heldout_file(rel, heldout_percent)]
        if len(buf) >= budget:
            if all(len(b) >= cap for b, _, cap in sides.values()):
                break
            continue
        try:
            with open(os.path.join(root, *rel.split("/")), "rb") as f:
                content = f.read()
        except OSError:                              # unreadable file: skip it, stay deterministic
            continue
        if not content:
            continue
        buf += content[: budget - len(buf)]
        names.append(rel)
        if len(buf) < budget:
            buf += _SEPARATOR[: budget - len(buf)]
    train, heldout = sides[False][0], sides[True][0]
    if len(train) < 1024 or len(heldout) < 1024:
        raise RuntimeError(f"too little Python source under {root!r} to build the corpus "
                           f"({len(train)} train and {len(heldout)} held-out bytes)")
    return TextCorpus(train=torch.frombuffer(train, dtype=torch.uint8).clone(),
                      heldout=torch.frombuffer(heldout, dtype=torch.uint8).clone(),
                      train_files=sides[False][1], heldout_files=sides[True][1], root=root)


# -- batches -----------------------------------------------------------------------------------
def random_starts(n_bytes: int, context: int, batch_size: int, n_batches: int,
                  seed: int) -> Tensor:
    """Start offsets (n_batches, batch_size) of random windows, from their own generator so that
    every optimizer of a comparison sees exactly the same batches."""
    if n_bytes < context + 2:
        raise ValueError(f"the text ({n_bytes} bytes) is shorter than one window ({context + 1})")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - context - 1, (n_batches, batch_size), generator=gen)


def fixed_starts(n_bytes: int, context: int, count: int) -> Tensor:
    """``count`` evenly spaced windows over the whole text: a fixed evaluation set."""
    if n_bytes < context + 2:
        raise ValueError(f"the text ({n_bytes} bytes) is shorter than one window ({context + 1})")
    return torch.linspace(0, n_bytes - context - 2, count).round().long()


def get_batch(data: Tensor, starts: Tensor, context: int) -> Tuple[Tensor, Tensor]:
    """Inputs and next-byte targets (both int64, shape starts.shape + (context,))."""
    idx = starts.unsqueeze(-1) + torch.arange(context + 1)
    window = data[idx].long()
    return window[..., :-1], window[..., 1:]
