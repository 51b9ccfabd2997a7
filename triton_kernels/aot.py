"""Compile every Triton kernel specialization ahead of time and report registers and spills.

    python -m alsals_fused.triton_kernels.aot --arch 80 90

Needs no GPU (Triton's bundled ptxas/cuobjdump do the work) and must run with TRITON_INTERPRET
unset: the CPU interpreter accepts code that the compiler rejects, so CI runs this to catch it.
Exits 1 if any specialization fails to compile (or spills with --fail-on-spill, or uses more
registers than --max-regs allows for the kernels it names).

Registers come from the cubin (cuobjdump --dump-resource-usage) and spills from ``ptxas -v`` run
again on Triton's PTX.  That second ptxas must be one that accepts the PTX ISA version Triton
emitted: Triton derives ``.version`` from the ptxas *it* uses for the target, and which bundled
binary that is changed across releases (Triton 3.9 compiles sm_90 with its CUDA 13.x
``ptxas-blackwell`` and emits ``.version 9.4``, which the CUDA 12.9 ``ptxas`` beside it rejects:
"Unsupported .version 9.4").  So the tool is taken from Triton's own selection
(``triton.backends.nvidia.compiler.get_ptxas``) when it exists, and in any case checked against
the PTX's ``.version``: the first candidate whose CUDA release supports it is used.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from typing import List, Optional, Tuple


def _bin_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _knob_path(name: str) -> Optional[str]:
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name.replace("-", "_")).path
        return path or None
    except Exception:  # noqa: BLE001  (knobs layout differs across Triton versions)
        return None


def _tool(name: str) -> str:
    return _knob_path(name) or os.path.join(_bin_dir(), name)


@lru_cache(maxsize=None)
def _cuda_release(ptxas: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a ptxas binary's CUDA release, None if it does not run."""
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _max_ptx_isa(release: Tuple[int, int]) -> int:
    """The highest PTX ISA version (as 10*major + minor) a CUDA release's ptxas accepts."""
    try:   # Triton's own table, when this Triton has it
        from triton.backends.nvidia.compiler import ptx_get_version
        return int(ptx_get_version(f"{release[0]}.{release[1]}"))
    except Exception:  # noqa: BLE001
        pass
    major, minor = release
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor - (1 if minor >= 6 else 0)
    if major == 11:
        return 70 + minor
    return 63 + minor


def _ptxas_candidates(arch: int) -> List[str]:
    cands: List[str] = []
    try:   # exactly the binary Triton compiled this target with
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path:
            cands.append(path)
    except Exception:  # noqa: BLE001
        pass
    for name in ("ptxas-blackwell", "ptxas") if arch >= 90 else ("ptxas", "ptxas-blackwell"):
        path = _knob_path(name)
        if path:
            cands.append(path)
    cands += sorted(glob.glob(os.path.join(_bin_dir(), "ptxas*")), reverse=True)
    system = shutil.which("ptxas")
    if system:
        cands.append(system)
    seen, out = set(), []
    for c in cands:
        if c not in seen and os.path.isfile(c):
            seen.add(c)
            out.append(c)
    return out


@lru_cache(maxsize=None)
def pick_ptxas(arch: int, ptx_isa: int) -> str:
    """The first ptxas (Triton's own choice first) whose CUDA release accepts PTX ISA
    ``ptx_isa`` (10*major + minor, e.g. 94 for ``.version 9.4``)."""
    tried = []
    for cand in _ptxas_candidates(arch):
        release = _cuda_release(cand)
        tried.append(f"{cand} (CUDA {'.'.join(map(str, release)) if release else '?'})")
        if release is not None and _max_ptx_isa(release) >= ptx_isa:
            return cand
    raise RuntimeError(f"no ptxas accepts PTX ISA {ptx_isa // 10}.{ptx_isa % 10} for sm_{arch}; "
                       f"tried: {', '.join(tried) or 'none found'}")


def _ptx_isa(ptx: str) -> int:
    m = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, re.M)
    if not m:
        raise ValueError("the PTX has no .version line")
    return 10 * int(m.group(1)) + int(m.group(2))


def _variant(constexprs: dict, signature: dict) -> str:
    parts = []
    for k, v in constexprs.items():
        if k in ("BLOCK", "ITERS"):
            continue
        v = getattr(v, "name", v)  # tl.dtype -> its short name
        parts.append(f"{k}={int(v) if isinstance(v, bool) else v}")
    for loss in ("loss0", "loss_try"):
        if loss in signature:
            parts.append(f"loss={signature[loss].lstrip('*')}")
    return ",".join(parts)


def _resource_usage(cubin: bytes, ptx: str, arch: int):
    """(registers, stack bytes, spill-store bytes, spill-load bytes, ptxas used)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        gpu = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
        ptxas = pick_ptxas(arch, _ptx_isa(ptx))
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx_path, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
        text = log.stdout + log.stderr
        if log.returncode != 0:
            raise RuntimeError(f"{os.path.basename(ptxas)} -v failed: "
                               f"{text.strip().splitlines()[-1] if text.strip() else log.returncode}")
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        spill_st, spill_ld = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
        stack = re.search(r"(\d+) bytes stack frame", text)
        stack = int(stack.group(1)) if stack else 0
        used = re.search(r"Used (\d+) registers", text)
        regs = int(used.group(1)) if used else None
        # The cubin Triton built is what runs: take its register count when cuobjdump reads it.
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                                 capture_output=True, text=True, check=True).stdout
            regs = int(re.search(r"REG:(\d+)", out).group(1))
        except (OSError, subprocess.CalledProcessError, AttributeError):
            if regs is None:
                raise
    return regs, stack, spill_st, spill_ld, ptxas


def compile_one(kernel, signature: dict, constexprs: dict, num_warps: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    full_sig = dict(signature)
    full_sig.update({name: "constexpr" for name in constexprs})
    names = kernel.arg_names
    missing = [n for n in names if n not in full_sig]
    if missing:
        raise ValueError(f"specialization of {kernel.__name__} lacks arguments {missing}")
    # Pointer arguments are 16-byte aligned torch allocations, as the JIT specializes them.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*")}
    src = triton.compiler.ASTSource(fn=kernel, signature={n: full_sig[n] for n in names},
                                    constexprs=constexprs, attrs=attrs)
    from .kernels import COMPILE_OPTIONS
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, **COMPILE_OPTIONS})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="CUDA compute capabilities, e.g. 80 90")
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any kernel spills")
    parser.add_argument("--max-regs", action="append", default=[], metavar="KERNEL:VARIANT=N",
                        help="exit 1 if a specialization whose name and variant contain these "
                             "substrings uses more than N registers, e.g. "
                             "'step_kernel:W_DTYPE=fp32,SEARCHING=1=96' (repeatable)")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET: the interpreter does not compile kernels",
              file=sys.stderr)
        return 2
    limits = []
    for spec in args.max_regs:
        where, _, n = spec.rpartition("=")
        name, _, variant = where.partition(":")
        limits.append((name, variant, int(n)))
    import triton

    from .kernels import specializations
    specs = [s for s in specializations() if args.only in s[0].__name__]
    failures = spilled = over = 0
    rows = []
    header = (f"{'kernel':<15} {'arch':>4} {'regs':>4} {'spill_st':>8} {'spill_ld':>8} "
              f"{'stack':>5}  variant")
    print(f"Triton {triton.__version__}")
    print(header)
    print("-" * len(header))
    t0 = time.time()
    ptxas_used = set()
    for arch in args.arch:
        for kernel, signature, constexprs, num_warps in specs:
            name = kernel.__name__
            variant = _variant(constexprs, signature)
            try:
                compiled = compile_one(kernel, signature, constexprs, num_warps, arch)
                regs, stack, st, ld, ptxas = _resource_usage(compiled.asm["cubin"],
                                                             compiled.asm["ptx"], arch)
            except Exception as exc:  # noqa: BLE001  (report every failure, then exit 1)
                failures += 1
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"{name:<15} {arch:>4} FAILED: {type(exc).__name__}: {first}  [{variant}]")
                continue
            ptxas_used.add(f"sm_{arch}: {ptxas} (CUDA {'.'.join(map(str, _cuda_release(ptxas)))})")
            spilled += bool(st or ld)
            flag = ""
            for lname, lvariant, n in limits:
                if lname in name and lvariant in variant and regs > n:
                    over += 1
                    flag = f"  > {n} registers"
            rows.append(dict(kernel=name, arch=arch, regs=regs, spill_stores=st, spill_loads=ld,
                             stack=stack, variant=variant, num_warps=num_warps))
            print(f"{name:<15} {arch:>4} {regs:>4} {st:>8} {ld:>8} {stack:>5}  {variant}{flag}")
    total = len(specs) * len(args.arch)
    for line in sorted(ptxas_used):
        print(f"ptxas for {line}")
    print(f"\n{total - failures}/{total} specializations compiled for sm_"
          f"{', sm_'.join(map(str, args.arch))} with Triton {triton.__version__} in "
          f"{time.time() - t0:.0f}s; {spilled} spill; {over} over a register limit; "
          f"{failures} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    if failures or over or (args.fail_on_spill and spilled):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
