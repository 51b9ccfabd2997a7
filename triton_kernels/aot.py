"""Compile every Triton kernel specialization ahead of time and report registers and spills.

    python -m alsals_fused.triton_kernels.aot --arch 80 90

Needs no GPU (Triton's bundled ptxas/cuobjdump do the work) and must run with TRITON_INTERPRET
unset: the CPU interpreter accepts code that the compiler rejects, so CI runs this to catch it.
Exits 1 if any specialization fails to compile (or spills with --fail-on-spill).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def _tool(name: str) -> str:
    import triton
    from triton import knobs
    try:
        path = getattr(knobs.nvidia, name).path
        if path:
            return path
    except Exception:  # noqa: BLE001  (knobs layout differs across Triton versions)
        pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _variant(constexprs: dict) -> str:
    parts = []
    for k, v in constexprs.items():
        if k in ("BLOCK", "ITERS"):
            continue
        v = getattr(v, "name", v)  # tl.dtype -> its short name
        parts.append(f"{k}={int(v) if isinstance(v, bool) else v}")
    return ",".join(parts)


def _resource_usage(cubin: bytes, ptx: str, arch: int):
    """(registers, local bytes) from cuobjdump on the cubin; spill bytes from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                             capture_output=True, text=True, check=True).stdout
        regs = int(re.search(r"REG:(\d+)", out).group(1))
        local = int(re.search(r"LOCAL:(\d+)", out).group(1))
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        ptxas = _tool("ptxas-blackwell" if arch >= 100 else "ptxas")
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx_path, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                           log.stdout + log.stderr)
        spill_st, spill_ld = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
    return regs, local, spill_st, spill_ld


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
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    return compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="CUDA compute capabilities, e.g. 80 90")
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any kernel spills")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET: the interpreter does not compile kernels",
              file=sys.stderr)
        return 2
    from .kernels import specializations
    specs = specializations()
    failures = 0
    spilled = 0
    header = f"{'kernel':<18} {'arch':>4} {'regs':>4} {'spill_st':>8} {'spill_ld':>8} {'local':>5}  variant"
    print(header)
    print("-" * len(header))
    t0 = time.time()
    for arch in args.arch:
        for kernel, signature, constexprs, num_warps in specs:
            name = kernel.__name__
            variant = _variant(constexprs)
            try:
                compiled = compile_one(kernel, signature, constexprs, num_warps, arch)
                regs, local, st, ld = _resource_usage(compiled.asm["cubin"], compiled.asm["ptx"],
                                                      arch)
            except Exception as exc:  # noqa: BLE001  (report every failure, then exit 1)
                failures += 1
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"{name:<18} {arch:>4} FAILED: {type(exc).__name__}: {first}  [{variant}]")
                continue
            spilled += bool(st or ld)
            print(f"{name:<18} {arch:>4} {regs:>4} {st:>8} {ld:>8} {local:>5}  {variant}")
    total = len(specs) * len(args.arch)
    print(f"\n{total - failures}/{total} specializations compiled for sm_{', sm_'.join(map(str, args.arch))}"
          f" in {time.time() - t0:.0f}s; {spilled} spill; {failures} failed")
    if failures or (args.fail_on_spill and spilled):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
