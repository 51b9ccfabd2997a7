"""One-call verification on a GPU machine: build, every test, every benchmark, a results file.

    bash benchmarks/run_gpu_suite.sh --quick --out DIR   # <= 230 s planned (no 1.5B set, fewer rounds)
    bash benchmarks/run_gpu_suite.sh --out DIR           # <= 9 minutes (540 s planned)
    bash benchmarks/run_gpu_suite.sh --dry-run           # CPU, tiny sizes, results to a temp dir
    python benchmarks/gpu_suite.py --dry-run --phases env,hot-path,plot --out DIR   # a subset

Made for a machine with torch/triton preinstalled and no internet.  Phases, in order of value:
env -> wheels (pip install --no-index from --wheels DIR, default ./.whl, if present) -> build (the
CUDA extension: JIT on first use with ALSALS_FUSED_JIT=1, or --build pip) -> warm (the Triton
cache: ``warm_triton.py`` launches every specialization the tests and benchmarks use, in parallel
processes started together with the build) -> tests (pytest tests: the CUDA and Triton backend
tests first, ``-m gpu_backends``, then the rest) -> micro benchmarks on the GPT-2-small set -> the
hot path (``hot_path.py --json``: device operations and host microseconds per step) -> end-to-end
training -> the other parameter sets -> plot.  Each phase runs in a child process under a timeout
taken from what is left of the budget (later phases keep a reserve); a phase that runs out of
time is killed and recorded as cut.
Results (``YYYY-MM-DD-<gpu>.json`` and ``.md``, ``.png``) and one bundle of the raw files
(``YYYY-MM-DD-<gpu>-raw.tar.gz``: every phase's log, the rows JSONL, pytest-benchmark's JSON) are
rewritten after every phase, so a failure or a kill later still leaves what was measured; the
output directory holds those four files and nothing else (the raw files are written to a
temporary directory while the suite runs, removed at the end).  Without --out the results go to
a fresh folder under ``build/gpu-suite/`` (ignored by git); a file name that git tracks in DIR
is never overwritten (the run takes the next free ``-2``, ``-3`` ... name).  A build phase that
is cut turns JIT off for the later phases, which still load an extension whose JIT build
finished (``_source_tree.finished_jit_build``).  The markdown summary is printed last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _report  # noqa: E402

# (name, max seconds full/quick/dry, minimum seconds: what earlier phases leave for it)
# The maxima of full and --quick sum to TOTAL less SAFETY_S (tests/test_gpu_suite.py): 520 + 20 =
# 540 s (9 minutes) and 212 + 18 = 230 s (inside 4 minutes), planned, not yet timed on a GPU.  The
# build phase runs the two JIT builds side by side (each compiles a file with torch/extension.h:
# 35-45 s on the 2-core CI machine), then the smoke steps; the warm phase's processes start with
# the build and compile the Triton specializations meanwhile (16 cores), so its own budget is
# what remains of the warming after the build.  A JIT build of the extension that needs longer
# than its budget is cut; a build that finished before the cut is still used.
PHASES = [
    ("env", (15, 12, 60), 8),
    ("wheels", (15, 5, 30), 3),
    ("build", (110, 60, 90), 20),
    ("warm", (45, 25, 60), 5),
    ("tests", (130, 48, 150), 30),
    ("bench-gpt2", (55, 20, 45), 15),
    ("hot-path", (30, 18, 60), 10),
    ("e2e", (40, 10, 45), 8),
    ("bench-rest", (65, 8, 45), 8),
    ("plot", (15, 6, 30), 4),
]
TOTAL = {"full": 540, "quick": 230, "dry-run": 480}
SAFETY_S = 18   # interpreter start, final writes and print
MAX_OUT_FILES = 8   # what --out DIR may hold after a run (json, md, png, raw bundle: 4)
HOT_PATH_STEPS = {"full": 200, "quick": 200, "dry-run": 20}   # hot_path.py --steps

ENV_SCRIPT = r"""
import json, os, platform, subprocess, sys
info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count())
except Exception as exc:
    info["torch_error"] = repr(exc)
for mod in ("triton", "pytest", "pytest_benchmark", "matplotlib", "numpy", "salsa"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "installed")
    except Exception as exc:
        info[mod] = None
for name, cmd in (("nvcc", ["nvcc", "--version"]), ("ninja", ["ninja", "--version"]),   # JIT builds need ninja
                  ("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"])):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        info[name] = out.splitlines()[-1] if out else None
    except Exception:
        info[name] = None
print("ALSALS_ENV=" + json.dumps(info))
"""

# Import every backend on the device (this is what builds the CUDA extension with
# ALSALS_FUSED_JIT=1) and take two ALSALS steps with each available one (compiles the kernels).
# The C++ host helper's JIT build (about as long: each compiles torch/extension.h) runs at the
# same time in a child process; this process then loads what it built.
BUILD_SCRIPT = r"""
import json, subprocess, sys, time, traceback, torch
t0 = time.time()
host_build = subprocess.Popen([sys.executable, "-c", "from alsals_fused import host_ext; host_ext.status()"])
from alsals_fused import ALSALS
from alsals_fused.backends import available_backends
dev = "cuda" if torch.cuda.is_available() else "cpu"
reasons = available_backends(dev)
import_s = round(time.time() - t0, 1)
# As soon as known (a cut later in this phase keeps it); the complete line follows at the end.
print("ALSALS_BACKENDS=" + json.dumps({"device": dev, "backends": reasons, "import_s": import_s}), flush=True)
host_build.wait()
from alsals_fused import host_ext
grad_reads = host_ext.status()
# import_s: until the backends were imported (the CUDA extension's JIT build included);
# grad_reads_s: until the host helper was loaded (its build ran beside that one).
out = {"device": dev, "backends": reasons, "import_s": import_s, "smoke": {},
       "grad_reads": grad_reads, "grad_reads_s": round(time.time() - t0, 1),
       "host_build_rc": host_build.returncode}
for name, reason in reasons.items():
    if reason is not None or (dev == "cpu" and name in ("triton", "cuda")):
        continue
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 8).to(dev)
        x, y = torch.randn(32, 64, device=dev), torch.randn(32, 8, device=dev)
        opt = ALSALS(model.parameters(), backend=name, init_step_size=1e-2)
        for _ in range(2):
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        out["smoke"][name] = f"ok: 2 steps, {opt.counters['trials']} trials"
    except Exception as exc:
        traceback.print_exc()
        out["smoke"][name] = f"error: {exc!r}"[:300]
out["seconds"] = round(time.time() - t0, 1)
print("ALSALS_BACKENDS=" + json.dumps(out))
"""


def bundle_dir(src: str, dest: str) -> str:
    """Write every file under ``src`` into the gzipped tar ``dest`` (members under the folder's
    name; atomically replaced); returns ``dest``."""
    tmp = dest + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(src, arcname=os.path.basename(src.rstrip(os.sep)) or "raw")
    os.replace(tmp, dest)
    return dest


def out_files(directory: str) -> List[str]:
    """Every file under ``directory`` (recursively), relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), directory)
                  for d, _, files in os.walk(directory) for f in files)


# The JIT builds' names (alsals_fused/host_ext.py, alsals_fused/backends/cuda_backend.py).
JIT_NAMES = ("alsals_fused_jit_host", "alsals_fused_jit_C")


def clear_jit_locks(extensions_dir: str) -> List[str]:
    """Remove the lock files that a killed JIT build of this package leaves in its build folder
    (``<extensions_dir>/<name>/lock``, torch's layout under TORCH_EXTENSIONS_DIR, which the
    suite sets; ``<extensions_dir>/<python>_<cuda>/<name>/lock`` too, its layout when
    ``extensions_dir`` is torch's default root); returns the paths removed.  torch waits on such
    a lock with no time limit, so a build cut in an earlier run would hang every later one.  The
    suite calls this before its build and after a cut one, assuming no other process builds
    these two extensions in that directory meanwhile."""
    root = glob.escape(extensions_dir)
    removed = []
    for name in JIT_NAMES:
        for path in glob.glob(os.path.join(root, name, "lock")) + glob.glob(os.path.join(root, "*", name, "lock")):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


OUT_SUFFIXES = (".json", ".md", ".png", "-raw.tar.gz")   # the files a run writes per stem


def git_tracked(paths: List[str]) -> List[str]:
    """Those of ``paths`` that git tracks (none outside a checkout, or without git)."""
    tracked = []
    for path in paths:
        try:
            r = subprocess.run(["git", "ls-files", "--error-unmatch", os.path.basename(path)],
                               cwd=os.path.dirname(path) or ".", capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return []
        if r.returncode == 0:
            tracked.append(path)
    return tracked


def free_stem(out: str, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3`` ...: the first whose files git does not track in
    ``out`` (a rerun into benchmarks/results never overwrites committed results)."""
    candidate, k = stem, 1
    while git_tracked([os.path.join(out, candidate + s) for s in OUT_SUFFIXES]):
        k += 1
        candidate = f"{stem}-{k}"
    return candidate


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


class Suite:
    def __init__(self, args):
        self.args = args
        self.mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
        self.col = {"full": 0, "quick": 1, "dry-run": 2}[self.mode]
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (args.budget or TOTAL[self.mode]) - SAFETY_S
        if args.out:
            self.out = os.path.abspath(args.out)
        elif args.dry_run:
            self.out = tempfile.mkdtemp(prefix="alsals-gpu-suite-dry-run-")
        else:   # a fresh folder git ignores: a rerun never overwrites committed results
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            parent = os.path.join(REPO, "build", "gpu-suite")
            os.makedirs(parent, exist_ok=True)
            self.out = tempfile.mkdtemp(prefix=f"{stamp}-{self.mode}-", dir=parent)
        os.makedirs(self.out, exist_ok=True)
        # Logs and row files go to a temporary directory, bundled into <stem>-raw.tar.gz in the
        # output directory after every phase (so --out DIR holds at most MAX_OUT_FILES files).
        self.work = tempfile.mkdtemp(prefix="alsals-gpu-suite-work-")
        self.raw = os.path.join(self.work, "raw")
        os.makedirs(self.raw)
        self.jsonl = os.path.join(self.raw, "rows.jsonl")
        self.site = os.path.join(self.work, "site")                     # --wheels install target
        self.phases = [p for p in PHASES if not args.phases or p[0] in args.phases]
        self.bundle: Optional[str] = None   # the raw bundle written last
        self.stem: Optional[str] = None
        self.jit = True    # off after a build that was cut or failed: no later phase builds again
        self.current: Optional[str] = None   # the phase running now
        self.child: Optional[subprocess.Popen] = None
        self.warm: Optional[dict] = None     # the warm phase's process, started with the build
        self.doc = {
            "suite": {"mode": self.mode, "started": _now(), "budget_s": args.budget or TOTAL[self.mode],
                      "args": sys.argv[1:], "raw_logs": None},
            "git": self._git(), "env": {}, "backends": {}, "phases": [], "cuts": [], "tests": {},
            "rows": [], "targets": [],
        }

    # -- helpers ----------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[gpu-suite {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def _git(self) -> dict:
        def git(*a):
            try:
                return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                      timeout=10).stdout.strip()
            except Exception:
                return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}

    def child_env(self, **extra) -> dict:
        env = dict(os.environ)
        paths = [REPO] + ([self.site] if os.path.isdir(self.site) else [])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"      # child logs survive a kill
        env["ALSALS_FUSED_JIT"] = "1" if self.jit else "0"
        env["ALSALS_GPU_SUITE"] = "1"       # tests that would start another suite skip inside one
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, "build", "torch_extensions"))
        if self.mode == "dry-run":
            env.setdefault("ALSALS_BENCH_DEVICE", "cpu")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, name: str, cmd: List[str], **env) -> dict:
        """Start cmd in its own process group, its output to raw/<name>.log."""
        path = os.path.join(self.raw, f"{name}.log")
        with open(path, "w") as logf:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                                    env=self.child_env(**env), start_new_session=True)
        return {"proc": proc, "path": path, "name": name, "start": time.monotonic()}

    def wait(self, job: dict, timeout: float, echo: tuple = ()) -> dict:
        """Wait for a started job; kill its process group at the timeout.  Lines of its log that
        start with a prefix in ``echo`` are printed as they appear (what a cut must not lose)."""
        proc, path = job["proc"], job["path"]
        self.child = proc
        end, seen = time.monotonic() + max(1.0, timeout), 0
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5 if echo else max(0.0, end - time.monotonic()))
                    timed_out = False
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= end:
                        self.kill_child()
                        rc, timed_out = None, True
                        break
                finally:
                    if echo:
                        seen = self._echo(path, seen, echo)
        except BaseException:      # SIGTERM/Ctrl-C of the suite: take the child down too
            self.kill_child()
            raise
        finally:
            self.child = None
        with open(path, errors="replace") as f:
            text = f.read()
        return {"rc": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - job["start"], 1),
                "log": f"raw/{job['name']}.log (in the -raw.tar.gz bundle)", "text": text}

    def _echo(self, path: str, offset: int, prefixes: tuple) -> int:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        for line in complete.decode(errors="replace").splitlines():
            if line.startswith(prefixes):
                self.log(line)
        return offset + len(complete)

    def run(self, name: str, cmd: List[str], timeout: float, echo: tuple = (), **env) -> dict:
        """Run cmd (log to raw/<name>.log); kill its process group at the timeout."""
        return self.wait(self.start(name, cmd, **env), timeout, echo)

    def kill_child(self, proc: Optional[subprocess.Popen] = None) -> None:
        proc = proc or self.child
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)    # the group of the child this suite started
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    @staticmethod
    def tail(text: str, n: int = 12) -> str:
        return "\n".join(text.rstrip().splitlines()[-n:])

    # -- results ----------------------------------------------------------------------------------
    def paths(self):
        if self.stem is None:
            gpu = self.doc["env"].get("gpu")
            name = "cpu-dry-run" if self.mode == "dry-run" else slug(gpu or "unknown-gpu")
            self.stem = free_stem(self.out, f"{_dt.date.today().isoformat()}-{name}"
                                  + ("-quick" if self.mode == "quick" else ""))
        base = os.path.join(self.out, self.stem)
        return base + ".json", base + ".md", base + ".png"

    def save(self) -> None:
        if os.path.exists(self.jsonl):
            self.doc["rows"] = _report.load_rows(self.jsonl)
        self.doc["targets"] = _report.targets(self.doc["rows"])
        self.doc["suite"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.doc["suite"]["updated"] = _now()
        js, md, _ = self.paths()
        self.doc["suite"]["raw_logs"] = os.path.basename(self.bundle_path())
        with open(js + ".tmp", "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(js + ".tmp", js)
        with open(md, "w") as f:
            f.write(self.markdown())
        self.write_bundle()

    def bundle_path(self) -> str:
        return self.paths()[0][:-len(".json")] + OUT_SUFFIXES[3]

    def write_bundle(self) -> None:
        """Rewrite the one bundle of raw files (and drop one under an earlier name)."""
        path = bundle_dir(self.raw, self.bundle_path())
        if self.bundle and self.bundle != path and os.path.exists(self.bundle):
            os.remove(self.bundle)
        self.bundle = path

    def markdown(self) -> str:
        d, env = self.doc, self.doc["env"]
        _, _, png = self.paths()
        gpu = env.get('gpu') or ('CPU dry run' if self.mode == 'dry-run' else 'unknown GPU')
        lines = [f"# ALSALS GPU suite: {gpu}",
                 "",
                 f"mode {self.mode}; started {d['suite']['started']}; elapsed {d['suite'].get('elapsed_s')} s "
                 f"of {d['suite']['budget_s']} s; commit {str(d['git'].get('commit'))[:12]}"
                 f"{' (dirty tree)' if d['git'].get('dirty') else ''}",
                 f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
                 f"python {env.get('python')}, nvcc: {env.get('nvcc')}, ninja {env.get('ninja')}, "
                 f"driver: {env.get('nvidia_smi')}",
                 "", "| phase | status | seconds | timeout s | note |", "|---|---|---|---|---|"]
        for p in d["phases"]:
            lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', '-')} | "
                         f"{p.get('timeout_s', '-')} | {p.get('note', '')} |")
        if d["cuts"]:
            lines += ["", "**Cut or skipped:**"] + [f"- {c}" for c in d["cuts"]]
        b = d["backends"]
        if b:
            lines += ["", f"**Backends on {b.get('device')}:** " + "; ".join(
                f"{k}: {'available' if v is None else v}" for k, v in b.get("backends", {}).items())]
            if b.get("smoke"):
                lines.append("Smoke steps: " + "; ".join(f"{k}: {v}" for k, v in b["smoke"].items()))
        t = d["tests"]
        if t:
            lines += ["", f"**Tests:** {t.get('summary', '?')}"]
            lines += [f"- {x}" for x in t.get("failed", [])[:30]]
        if d["rows"]:
            lines += ["", "## Benchmarks", _report.markdown_tables(d["rows"])]
        lines.append(_report.markdown_targets(d["targets"]))
        if os.path.exists(png):
            lines += ["", f"Plot: {os.path.basename(png)}"]
        return "\n".join(lines) + "\n"

    # -- phases -----------------------------------------------------------------------------------
    def phase_env(self, timeout):
        r = self.run("env", [sys.executable, "-c", ENV_SCRIPT], timeout)
        m = re.search(r"^ALSALS_ENV=(.*)$", r["text"], re.M)
        if m:
            self.doc["env"] = json.loads(m.group(1))
            self.stem = None   # name the files after the GPU now known
        if self.mode != "dry-run" and not self.doc["env"].get("cuda"):
            r["note"] = "no CUDA device visible: GPU rows will be skipped (use --dry-run on CPU)"
        return r

    def phase_wheels(self, timeout):
        wheels = self.args.wheels
        found = sorted(f for f in os.listdir(wheels) if f.endswith(".whl")) if wheels and os.path.isdir(wheels) else []
        if not found:
            return {"status": "skipped", "note": f"no wheels in {wheels!r}"}
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", self.site,
               *[os.path.join(wheels, f) for f in found]]
        r = self.run("wheels", cmd, timeout)
        r["note"] = f"{', '.join(found)} -> {self.site}"
        return r

    def clear_jit_locks(self) -> str:
        removed = clear_jit_locks(self.child_env()["TORCH_EXTENSIONS_DIR"])
        self.doc.setdefault("jit_locks_removed", []).extend(removed)
        return f"removed the lock of a killed JIT build: {', '.join(removed)}" if removed else ""

    def start_warm(self) -> None:
        """The warm phase's processes, started once (with the build when both run)."""
        if self.warm is not None or "warm" not in [p[0] for p in self.phases]:
            return
        cmd = [sys.executable, os.path.join(HERE, "warm_triton.py")]
        extra = {}
        if self.mode == "dry-run":      # CPU: the interpreter runs the same launches
            cmd += ["--jobs", "1"]
            extra["TRITON_INTERPRET"] = "1"
        self.warm = self.start("warm", cmd, **extra)

    def phase_build(self, timeout):
        start = time.monotonic()
        locks_note = self.clear_jit_locks()
        self.start_warm()
        if self.args.build == "pip":
            r = self.run("build-pip", [sys.executable, "-m", "pip", "install", "--no-build-isolation",
                                       "--no-deps", "--no-index", "-e", "."], timeout)
            if r["timed_out"] or r["rc"]:
                return r
            timeout -= time.monotonic() - start
        r = self.run("build", [sys.executable, "-c", BUILD_SCRIPT], timeout, echo=("ALSALS_BACKENDS=",),
                     ALSALS_FUSED_JIT_VERBOSE=1)
        if r["timed_out"]:
            self.jit = False
            self.clear_jit_locks()      # for the next run: this one builds no more
            self.doc["cuts"].append("build: cut, so later phases run with ALSALS_FUSED_JIT=0 "
                                    "(they load a JIT build that finished before the cut; cuda "
                                    "rows skip if there is none)")
        found = re.findall(r"^ALSALS_BACKENDS=(.*)$", r["text"], re.M)
        if found:      # the last one: complete at the end of the phase, the early one if cut
            self.doc["backends"] = json.loads(found[-1])
            b = self.doc["backends"]["backends"]
            r["note"] = ", ".join(f"{k}: {'ok' if v is None else 'unavailable'}" for k, v in b.items())
            if "JIT build" in (b.get("cuda") or "") and self.jit:
                # a failed JIT build: no later phase (or test worker) compiles it again
                self.jit = False
                self.doc["cuts"].append("build: the JIT build of the extension failed, so later phases "
                                        "run with ALSALS_FUSED_JIT=0")
        r["note"] = "; ".join(n for n in (r.get("note"), locks_note) if n)
        return r

    def phase_warm(self, timeout):
        self.start_warm()
        if self.warm is None:
            return {"status": "skipped", "note": "not started"}
        began = self.warm["start"] - self.t0
        r = self.wait(self.warm, timeout)
        m = re.findall(r"^ALSALS_WARM=(.*)$", r["text"], re.M)
        if m:
            w = self.doc["warm"] = json.loads(m[-1])
            r["note"] = (f"{w['launched']}/{w['specializations']} specializations launched by "
                         f"{w['jobs']} processes in {w['seconds']} s (started at {began:.0f} s, "
                         "with the build)" + (f"; {len(w['errors'])} errors" if w["errors"] else ""))
        else:
            r["note"] = f"started at {began:.0f} s with the build; no summary line (rc {r['rc']})"
        return r

    def phase_tests(self, timeout):
        """The CUDA and Triton backend tests first (``-m gpu_backends``: on a GPU these are what
        this suite exists for), then every other test, in what time is left."""
        base = [sys.executable, "-m", "pytest", "tests", "-v", "-rfE", "-p", "no:cacheprovider"]
        if importlib.util.find_spec("xdist") is not None and self.mode != "dry-run":
            # Spread the test files over a few workers (one GPU is plenty for these tensors).
            base += ["-n", "4"]
        slow = ""
        if self.mode == "quick":
            slow = " and not slow"
            self.doc["cuts"].append("tests: --quick runs -m 'not slow'")
        end = time.monotonic() + timeout
        parts, runs = [("tests-gpu", "gpu_backends"), ("tests-rest", "not gpu_backends")], []
        for name, marker in parts:
            left = end - time.monotonic()
            if left < 3:
                runs.append((name, {"rc": None, "timed_out": True, "seconds": 0.0, "text": "",
                                    "log": "not run", "not_run": True}))
                continue
            runs.append((name, self.run(name, base + ["-m", marker + slow], left)))
        text = "\n".join(r["text"] for _, r in runs)
        r = {"rc": max((x["rc"] if x["rc"] is not None else 1) for _, x in runs) if runs else 1,
             "timed_out": any(x["timed_out"] for _, x in runs), "text": text,
             "seconds": round(sum(x["seconds"] for _, x in runs), 1),
             "log": "raw/tests-gpu.log, raw/tests-rest.log (in the -raw.tar.gz bundle)"}
        if all(x["rc"] in (0, 5) for _, x in runs):   # 5: a part selected no test (no GPU tests)
            r["rc"] = 0
        status = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
        # "path::test PASSED [ 5%]", or under xdist "[gw0] [  5%] PASSED path::test"
        outcomes = [a or b for a, b in re.findall(
            rf"^(?:\S+::\S+.*? {status}\b|\[gw\d+\] \[\s*\d+%\] {status} \S+::)", text, re.M)]
        failed = re.findall(r"^(?:FAILED|ERROR) (.*)$", text, re.M)
        if not failed:   # cut before the short summary: take them from the -v lines
            failed = re.findall(r"^(\S+::\S+).*? (?:FAILED|ERROR)\b", text, re.M)
        counts = {k.lower(): outcomes.count(k) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR") if outcomes.count(k)}
        parts_said = []
        for name, x in runs:
            found = re.findall(r"^=+ (.*? in [\d.]+s.*?) =+$", x["text"], re.M)
            parts_said.append(f"{name}: " + (found[-1] if found else "not run, out of time" if x.get("not_run")
                                              else f"stopped at the timeout after {x['seconds']} s"
                                              if x["timed_out"] else f"no summary line (rc {x['rc']})"))
        summary = "; ".join(parts_said)
        if r["timed_out"]:
            summary += f" ({counts} from the -v lines)"
        self.doc["tests"] = {"summary": summary, "counts": counts, "failed": failed, "rc": r["rc"],
                             "tail": self.tail(text, 40)}
        r["note"] = self.doc["tests"]["summary"]
        return r

    def _bench(self, name, timeout, sets, marker):
        # Without a GPU outside a dry run (a mistake, noted by the env phase), stay at CPU sizes.
        size = "tiny" if self.mode == "dry-run" else ("full" if self.doc["env"].get("cuda") else "small")
        extra = {"ALSALS_BENCH_SIZE": size, "ALSALS_BENCH_JSONL": self.jsonl, "ALSALS_BENCH_SETS": sets}
        if self.mode == "quick":
            extra.update(ALSALS_BENCH_ROW_S="0.15", ALSALS_BENCH_E2E_STEPS="10",
                         ALSALS_BENCH_DEVICE_BATCHES="2")
        before = len(_report.load_rows(self.jsonl)) if os.path.exists(self.jsonl) else 0
        cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-rfEs",
               "-p", "no:cacheprovider", "-m", marker,
               f"--benchmark-json={os.path.join(self.raw, name + '.json')}"]
        r = self.run(name, cmd, timeout, **extra)
        after = len(_report.load_rows(self.jsonl)) if os.path.exists(self.jsonl) else 0
        failures = re.findall(r"^(?:FAILED|ERROR) (.*)$", r["text"], re.M)
        skips = re.findall(r"^SKIPPED \[(\d+)\] \S+: (.*)$", r["text"], re.M)
        r["note"] = f"{after - before} rows" + (f"; {len(failures)} failed" if failures else "")
        r["failed"] = failures
        r["skips"] = [f"{n} x {why}" for n, why in skips]
        return r

    def phase_bench_gpt2(self, timeout):
        return self._bench("bench-gpt2", timeout, "gpt2", "micro")

    def phase_hot_path(self, timeout):
        """hot_path.py's measurement (its own code, in child processes: its launch stubs patch
        the Triton backend's class) -> one row per backend and tensor count.  One child per
        backend, the ones with targets first, so a cut keeps the backends measured before it."""
        steps = self.args.hot_path_steps or HOT_PATH_STEPS[self.mode]
        backends = ["cuda", "triton", "foreach", "reference"]
        if self.mode == "quick":   # only the backends with hot-path targets (_report.py's goals)
            backends = ["cuda", "triton"]
            self.doc["cuts"].append("hot-path: --quick measures the cuda and triton rows only "
                                    "(no foreach, reference)")
        end = time.monotonic() + timeout
        rows, notes, last = [], [], {}
        for backend in backends:
            left = end - time.monotonic()
            if left < 3:
                notes.append(f"{backend}: not run, out of time")
                last = dict(last, timed_out=True)
                continue
            cmd = [sys.executable, os.path.join(HERE, "hot_path.py"), "--json", "--steps", str(steps),
                   "--backends", backend]
            if self.mode == "dry-run":
                cmd += ["--tensors", "148"]
            # Host code only (launches stubbed) on CPU tensors: the Triton backend's host code
            # runs there under the interpreter, also on a GPU machine.
            last = self.run(f"hot-path-{backend}", cmd, left, TRITON_INTERPRET=1, CUDA_VISIBLE_DEVICES="")
            lines = [ln for ln in last["text"].splitlines() if ln.startswith("[")]
            try:
                records = json.loads(lines[-1]) if lines else []
            except json.JSONDecodeError:
                records = []
            new = _report.hot_path_rows(records, steps=steps, device="cpu (host code)")
            with open(self.jsonl, "a") as f:
                for row in new:
                    f.write(json.dumps(row) + "\n")
            rows += new
            if last["timed_out"]:
                notes.append(f"{backend}: cut at the timeout")
            elif not new:
                notes.append(f"{backend}: no JSON line (rc {last['rc']})")
        r = {"rc": last.get("rc", 0) if not notes else 1, "timed_out": bool(last.get("timed_out")),
             "text": last.get("text", ""), "log": "raw/hot-path-<backend>.log (in the -raw.tar.gz bundle)"}
        r["note"] = f"{len(rows)} rows ({steps} steps each)" + (f"; {'; '.join(notes)}" if notes else "")
        return r

    def phase_e2e(self, timeout):
        return self._bench("e2e", timeout, "", "e2e")

    def phase_bench_rest(self, timeout):
        families = ["gpt2-mini", "many-small"]
        if self.mode == "full":
            families.append("gpt2-xl")
        elif self.mode == "quick":   # 10 s: the 2000-tensor set (per-tensor overhead) only
            families = ["many-small"]
            self.doc["cuts"].append("bench-rest: --quick runs the many-small set only (no gpt2-mini, "
                                    "no 1.5B gpt2-xl)")
        return self._bench("bench-rest", timeout, ",".join(families), "micro")

    def phase_plot(self, timeout):
        """In a child process under the timeout: matplotlib's first import builds its font cache."""
        js, _, png = self.paths()
        self.save()
        title = f"ALSALS step time: {self.doc['env'].get('gpu') or 'CPU dry run'}"
        r = self.run("plot", [sys.executable, os.path.join(HERE, "plot_results.py"), js, "--out", png,
                              "--title", title], timeout, MPLBACKEND="Agg")
        r["note"] = os.path.basename(png) if r["rc"] == 0 and os.path.exists(png) else self.tail(r["text"], 1)
        return r

    # -- driver -----------------------------------------------------------------------------------
    def main(self) -> int:
        self.log(f"mode {self.mode}; results in {self.out}; raw files in {self.raw} "
                 f"(bundled into the results directory after every phase)")
        for i, (name, budgets, own_min) in enumerate(self.phases):
            # Up to the phase's budget, leaving later phases their minimum; but never less than
            # this phase's own minimum while time is left (a tight budget squeezes, not skips).
            reserve = sum(r for _, _, r in self.phases[i + 1:])
            left = self.deadline - time.monotonic()
            timeout = min(budgets[self.col], left, max(left - reserve, own_min))
            entry = {"name": name, "timeout_s": round(timeout, 1)}
            if timeout < 5:
                entry.update(status="skipped", note=f"out of time ({left:.0f} s left)")
                self.doc["cuts"].append(f"{name}: not run, out of time")
            else:
                self.log(f"phase {name} (timeout {timeout:.0f} s)")
                self.current, start = name, time.monotonic()
                try:
                    r = getattr(self, "phase_" + name.replace("-", "_"))(timeout)
                except Exception as exc:   # a bug in a phase must not lose the others' results
                    r = {"status": "error", "note": f"suite error: {exc!r}"[:300]}
                status = r.get("status") or ("cut" if r.get("timed_out") else
                                             "ok" if r.get("rc") == 0 else f"failed (rc {r.get('rc')})")
                entry.update(status=status, seconds=round(time.monotonic() - start, 1),
                             note=r.get("note", ""))
                for k in ("failed", "skips", "log"):
                    if r.get(k):
                        entry[k] = r[k]
                if r.get("timed_out"):
                    self.doc["cuts"].append(f"{name}: killed at its {timeout:.0f} s timeout; "
                                            "rows/tests finished before that are kept")
                if "text" in r:
                    print(self.tail(r["text"], 6), flush=True)
                self.current = None
            self.doc["phases"].append(entry)
            self.log(f"phase {name}: {entry['status']} {entry.get('note', '')}")
            self.save()
        return 0

    def finish(self) -> None:
        self.kill_child()
        if self.warm is not None:
            self.kill_child(self.warm["proc"])
        if self.current:
            self.doc["cuts"].append(f"{self.current}: interrupted (the suite was stopped during it)")
        self.doc["suite"]["finished"] = _now()
        try:
            self.save()
        except Exception as exc:
            print(f"gpu-suite: could not write results: {exc!r}", file=sys.stderr, flush=True)
        js, md, png = self.paths()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"wrote {js}, {md}" + (f", {png}" if os.path.exists(png) else "")
                 + (f", {self.bundle}" if self.bundle else ""))
        print("\n" + self.markdown(), flush=True)     # the summary table is the last thing printed


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="finish within 4 minutes (230 s planned)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal at tiny sizes; results go to a temp dir (or --out)")
    ap.add_argument("--out", help="results directory (default: a fresh build/gpu-suite/<time>-<mode>-*/, "
                                  "ignored by git; a temp dir for --dry-run); git-tracked files in it "
                                  "are never overwritten")
    ap.add_argument("--wheels", default=os.environ.get("ALSALS_SUITE_WHEELS") or os.path.join(REPO, ".whl"),
                    help="directory of wheels (e.g. salsa-optimizer) to pip install --no-index if "
                         "present (default $ALSALS_SUITE_WHEELS, else ./.whl)")
    ap.add_argument("--build", choices=("jit", "pip"), default="jit",
                    help="jit: ALSALS_FUSED_JIT=1 builds the extension on first use; "
                         "pip: pip install --no-build-isolation -e . first")
    ap.add_argument("--budget", type=float, help="total seconds (default 540, --quick 230)")
    ap.add_argument("--phases", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                    help=f"comma list: run only these phases (of {', '.join(p[0] for p in PHASES)})")
    ap.add_argument("--hot-path-steps", type=int, help="hot_path.py --steps (default 200; dry run 20)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the temporary directory of raw files (its path is printed first)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.phases or ()) - {p[0] for p in PHASES})
    if unknown:
        ap.error(f"--phases: unknown {unknown}")
    return args


def main(argv=None) -> int:
    try:
        sys.stdout.reconfigure(line_buffering=True)   # progress visible without PYTHONUNBUFFERED
    except AttributeError:
        pass
    suite = Suite(parse_args(argv))

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    try:
        return suite.main()
    finally:
        suite.finish()


if __name__ == "__main__":
    sys.exit(main())
