#!/usr/bin/env bash
# CI step for the C++/CUDA extension (no GPU needed): run from the repository root.
#   1. a venv with a CUDA build of torch (torch==2.14.1 + ninja, setuptools, wheel, numpy); reused if present
#   2. build alsals_fused._C (and the C++ host helper alsals_fused._host) with the command the
#      README gives users,
#        pip install --no-build-isolation -e .
#      with CUDA_HOME and CUDA_PATH unset (setup.py finds the toolkit itself, also when the nvcc on
#      PATH is a wrapper script), for the architectures of csrc/build_settings.py (clean build,
#      MAX_JOBS=2, -Xptxas -v)
#   3. import it with that venv's python and check every op is registered under torch.ops.alsals_fused
#      and that the layout compiled in is base.py's (csrc/alsals_layout.h is current)
#   4. print registers / spills per kernel and architecture (from ptxas)
#   5. configure, build and run the host-only ctests (math header; kernels under host emulation)
# Exits non-zero on any failure; prints the time of each step.
# Knobs: ALSALS_CUDA_VENV (default .venv-cuda, gitignored), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo; echo "=== cuda_build [$(( $(date +%s) - t0 ))s] $*"; }

VENV=${ALSALS_CUDA_VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p build
LOG=build/cuda_build.log

step "1. venv $VENV with torch==2.14.1 (CUDA build)"
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import torch, ninja, setuptools, wheel, numpy  # noqa: F401
assert torch.__version__.split("+")[0] == "2.14.1" and torch.version.cuda, torch.__version__
EOF
}
if venv_ok; then
  echo "reusing $VENV"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.14.1 ninja setuptools wheel numpy
  venv_ok || { echo "the venv has no CUDA build of torch 2.14.1"; exit 1; }
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PYTHON" csrc/build_settings.py
ARCHS=$("$PYTHON" csrc/build_settings.py | sed -n 's/^ARCHS=//p')

step "2. pip install --no-build-isolation -e . (CUDA_HOME unset; archs $ARCHS)"
rm -rf build/temp.* build/lib.* alsals_fused/_C*.so alsals_fused/_host*.so
b0=$(date +%s)
set +e
env -u CUDA_HOME -u CUDA_PATH -u TORCH_CUDA_ARCH_LIST MAX_JOBS=2 ALSALS_FUSED_PTXAS_VERBOSE=1 \
  CFLAGS="${CFLAGS:-} -g0" "$VENV/bin/pip" install -v --no-build-isolation -e . > "$LOG" 2>&1
rc=$?
set -e
if [ "$rc" -ne 0 ] || ! ls alsals_fused/_C*.so alsals_fused/_host*.so > /dev/null 2>&1; then
  grep -v -E "^ptxas info|bytes stack frame" "$LOG" | tail -60
  echo "extension build failed (exit $rc); full log in $LOG"
  exit 1
fi
echo "built $(ls alsals_fused/_C*.so alsals_fused/_host*.so | tr '\n' ' ')in $(( $(date +%s) - b0 ))s"

step "3. import and op registration"
"$VENV/bin/python" - <<'EOF'
import warnings
import torch
import alsals_fused._C as C
from alsals_fused import host_ext
from alsals_fused.backends import cuda_backend

assert host_ext.grad_reader_class() is not None, host_ext.status()
print("host helper:", host_ext.status())

expected = ["grad_pass", "step_pass", "move_pass", "verdict"]
assert sorted(C.registered_ops()) == sorted(expected), C.registered_ops()
for op in expected:
    packet = getattr(torch.ops.alsals_fused, op)           # raises if not registered
    schema = packet.default._schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"alsals_fused::{op}", "CUDA"), op
    print("registered:", schema)
assert cuda_backend.load_extension() is C, cuda_backend._load_error   # layout digest checked too
assert C.LAYOUT_DIGEST == cuda_backend.layout_digest() and C.CHUNK == cuda_backend.CHUNK
print("layout:", C.LAYOUT_DIGEST, "CHUNK", C.CHUNK, "THREADS", C.THREADS)
reason = cuda_backend.unavailable_reason(torch.device("cpu"))
assert reason and "CUDA" in reason, reason
print("backend='cuda' on cpu:", reason)
EOF

step "4. registers and spills per kernel (ptxas)"
"$VENV/bin/python" - "$LOG" $ARCHS <<'EOF'
import re, subprocess, sys
rows, cur = [], None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
    if m:
        cur = {"name": m.group(1), "arch": m.group(2)}
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = m.groups()
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = m.group(1)
        rows.append(cur)
        cur = None
if not rows:
    sys.exit("no ptxas resource lines in the build log")
try:  # demangle when binutils' c++filt is there
    names = subprocess.run(["c++filt"], input="\n".join(r["name"] for r in rows), capture_output=True,
                           text=True, check=True).stdout.split("\n")
except (OSError, subprocess.CalledProcessError):
    names = [r["name"] for r in rows]
spilled = False
print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
for r, full in sorted(zip(rows, names), key=lambda x: (x[0]["arch"], x[1])):
    short = full.replace("alsals::(anonymous namespace)::", "").replace("alsals::", "")
    short = re.sub(r"\(.*\)$", "", short).removeprefix("void ")
    print(f"{r['arch']:6} {r['regs']:>4} {r.get('stack', '?'):>5} {r.get('spill_st', '?'):>8} "
          f"{r.get('spill_ld', '?'):>8}  {short}")
    spilled |= r.get("spill_st", "0") != "0" or r.get("spill_ld", "0") != "0"
archs = sorted({r["arch"] for r in rows})
assert archs == sorted(f"sm_{a}" for a in sys.argv[2:]), archs
print("spills: " + ("SOME (see above)" if spilled else "none"))
EOF

step "5. host-only ctest (math header, emulated kernels)"
cmake -S . -B build/ctest -DALSALS_BUILD_EXTENSION=OFF > build/ctest_configure.log 2>&1 \
  || { cat build/ctest_configure.log; exit 1; }
cmake --build build/ctest -j 2 > build/ctest_build.log 2>&1 || { cat build/ctest_build.log; exit 1; }
ctest --test-dir build/ctest --output-on-failure

step "done: cuda_build.sh took $(( $(date +%s) - t0 ))s"
