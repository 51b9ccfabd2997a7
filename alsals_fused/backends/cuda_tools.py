"""Host-side tools of the CUDA backend (no extension, no GPU needed; they run anywhere).

- The layout header: ``csrc/alsals_layout.h`` holds the constants of ``base.py`` for C++
  (``layout_header``); ``layout_digest`` lets the backend refuse an extension built from
  another layout.
- The launch description: ``describe_launches`` says what the kernels launch for one bucket;
  ``extension_calls_per_step`` what one optimizer step issues.
- The command line: ``python -m alsals_fused.backends.cuda_tools --write-header`` regenerates
  the header; ``--check-header`` checks it; ``--describe-launches N`` prints
  ``describe_launches`` for N fp32 tensors of GPT-2-like sizes.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Optional

import torch

from .._source_tree import CSRC
from ..config import MOMENTUM_VARIANTS
from .base import CHUNK, CTL_SIZE, TABLE_COLS, VERDICT_SIZE, Ctl, Dir, TableCol, Verdict
from .fused_tables import FUSED_DTYPES, MAX_PROGRAMS

# Launch geometry of csrc/kernels.cu (checked against the built module: ext.THREADS).
THREADS = 256          # threads per program
VECTOR_BYTES = 16      # bytes per access on the vector path

LAYOUT_HEADER = CSRC / "alsals_layout.h"


# ---- the layout header (base.py -> C++) ---------------------------------------------------
def _layout_body() -> List[str]:
    lines = [f"constexpr int CHUNK = {CHUNK};", f"constexpr int CTL_SIZE = {CTL_SIZE};",
             f"constexpr int VERDICT_SIZE = {VERDICT_SIZE};", f"constexpr int TABLE_COLS = {TABLE_COLS};"]
    for enum in (Ctl, Verdict, Dir, TableCol):
        members = " ".join(f"{m.name} = {int(m)}," for m in enum)
        lines.append(f"namespace {enum.__name__} {{ enum : int {{ {members} }}; }}")
    return lines


def layout_digest() -> str:
    return hashlib.sha256("\n".join(_layout_body()).encode()).hexdigest()[:16]


def layout_header() -> str:
    """The text of csrc/alsals_layout.h, generated from base.py."""
    return "\n".join([
        "// GENERATED from alsals_fused/backends/base.py by",
        "//   python -m alsals_fused.backends.cuda_tools --write-header",
        "// Do not edit: tests/test_cuda.py checks that it is current.  The names are base.py's",
        "// (Ctl::SCALE is Ctl.SCALE); LAYOUT_DIGEST lets the Python backend refuse a stale build.",
        "#pragma once",
        "",
        "namespace alsals {",
        *_layout_body(),
        f'constexpr const char* LAYOUT_DIGEST = "{layout_digest()}";',
        "}  // namespace alsals",
        "",
    ])


# ---- the launch description (host only, runs anywhere) --------------------------------------
def chunks_of(numel: int) -> int:
    return -(-int(numel) // CHUNK)


def describe_launches(numels: Iterable[int], dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """What the extension launches for one bucket of tensors with these element counts.

    Host arithmetic only (no extension, no GPU).  Keys: ``tensors``, ``empty_tensors``,
    ``chunk``, ``chunks`` (per tensor), ``programs`` (grid of each pass), ``full_chunks`` and
    ``tail_chunks`` (vector path when aligned / scalar loop), ``launches`` and
    ``extension_calls`` per pass, ``partials`` per summing pass (fp32), ``table_bytes``,
    ``sched_bytes``, ``max_numel`` and ``int64_offsets`` (element offsets are int64, so tensors
    above 2**31 elements need no split), and the per-thread vector loop of each pass
    (``elements_per_access``, ``groups_per_thread``, ``loads_in_flight``: 16-byte accesses a
    thread issues before it uses the first).
    """
    numels = [int(n) for n in numels]
    if any(n < 0 for n in numels):
        raise ValueError("negative numel")
    if dtype not in FUSED_DTYPES:
        raise ValueError(f"the CUDA kernels take float32, bfloat16 and float16, not {dtype}")
    chunks = [chunks_of(n) for n in numels]
    total = sum(chunks)
    programs = max(1, total)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{programs} programs exceed one launch's grid")
    esize = dtype.itemsize
    vec = VECTOR_BYTES // esize                     # param elements per 16-byte access
    groups = CHUNK // (THREADS * vec)               # accesses per thread per tensor of params
    fp32_per_group = max(1, vec * 4 // VECTOR_BYTES)  # 16-byte accesses of m (or v) per group
    full = sum(n // CHUNK for n in numels)
    one = {"grad_pass": 1, "step_pass": 1, "move_pass": 1, "verdict": 1}
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(numels),
        "empty_tensors": sum(1 for n in numels if n == 0),
        "elements": sum(numels),
        "chunk": CHUNK,
        "chunks": chunks,
        "programs": programs,
        "full_chunks": full,
        "tail_chunks": total - full,
        "launches": dict(one),
        "extension_calls": dict(one),
        "partials": {"grad_pass": programs, "step_pass": 2 * programs},
        "table_bytes": 8 * TABLE_COLS * len(numels),
        "sched_bytes": 8 * programs,
        "max_numel": max(numels, default=0),
        "int64_offsets": True,
        "threads_per_program": THREADS,
        "vector_bytes": VECTOR_BYTES,
        "elements_per_access": vec,
        "groups_per_thread": groups,
        "loads_in_flight": {"grad_pass": groups,                                   # g
                            "step_pass": groups * (2 + 2 * fp32_per_group),        # g, w, m, v
                            "move_pass": groups * (2 + 2 * fp32_per_group)},       # v, w0, m|g
    }


def extension_calls_per_step(*, searching: bool, trials: int = 1, accepted: bool = True,
                             variant: str = "alsals") -> Dict[str, int]:
    """Extension calls (= kernel launches with one bucket) of one optimizer step as the v2
    driver issues the passes, and the device-to-host copies (one per trial).

    Not searching: grad_pass + step_pass.  Searching, k trials: grad_pass, step_pass, k
    verdicts, k-1 moves between trials, then for alsals the fallback fix-up move after the step
    pass (a no-op on the device without fallback; the accepted trial point is the update), for
    adam_sls/salsa the update from w0 once accepted; a step rejected after its trials restores
    w0 with one more move.  So alsals, first trial accepted: 4 calls + 1 copy = 5 device ops;
    each extra trial: 2 calls + 1 copy; not searching: 2 calls.
    """
    if not searching:
        calls = {"grad_pass": 1, "step_pass": 1, "move_pass": 0, "verdict": 0}
        calls["total"] = 2
        calls["d2h_copies"] = 0
        return calls
    if trials < 1:
        raise ValueError("a searching step makes at least one trial")
    momentum = variant in MOMENTUM_VARIANTS        # alsals and alsals_plateau keep the trial point
    moves = (trials - 1) + (1 if momentum else 0) + (0 if momentum and accepted else 1)
    calls = {"grad_pass": 1, "step_pass": 1, "move_pass": moves, "verdict": trials}
    calls["total"] = sum(calls.values())
    calls["d2h_copies"] = trials
    return calls


# ---- command line -------------------------------------------------------------------------
def _gpt2_like_numels(n: int) -> List[int]:
    """n tensor sizes shaped like GPT-2's (embeddings, 12 per block: ln, attn, mlp, biases)."""
    d = 768
    block = [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    sizes = [50257 * d, 1024 * d]
    while len(sizes) < n - 2:
        sizes += block
    return (sizes[: n - 2] + [d, d])[:n]


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m alsals_fused.backends.cuda_tools")
    parser.add_argument("--write-header", action="store_true", help=f"regenerate {LAYOUT_HEADER}")
    parser.add_argument("--check-header", action="store_true", help="exit 1 if the header is stale")
    parser.add_argument("--describe-launches", type=int, metavar="N",
                        help="describe_launches for N GPT-2-like fp32 tensors")
    args = parser.parse_args(argv)
    if args.write_header:
        LAYOUT_HEADER.write_text(layout_header())
        print(f"wrote {LAYOUT_HEADER}")
    if args.check_header:
        current = LAYOUT_HEADER.read_text() if LAYOUT_HEADER.is_file() else ""
        if current != layout_header():
            print(f"{LAYOUT_HEADER} is stale: run python -m alsals_fused.backends.cuda_tools --write-header")
            return 1
        print(f"{LAYOUT_HEADER} is current")
    if args.describe_launches:
        launches = describe_launches(_gpt2_like_numels(args.describe_launches))
        launches.pop("chunks")
        print(json.dumps(launches, indent=1))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
