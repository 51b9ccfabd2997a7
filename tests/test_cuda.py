"""The CUDA extension backend (``alsals_fused._C``, contract v2).

Two kinds of tests:

- CPU tests (run everywhere): the launch description (one launch per pass at 148 and 580 tensors,
  odd sizes, empty tensors, tensors above 2**31 elements), the schedule and table layout the
  backend builds, "one extension call per pass" and the table cache (with a recording stand-in
  for ``torch.ops.alsals_fused``), the generated layout header, the build settings (toolkit found
  without CUDA_HOME, its headers first, one source list and one architecture list), import
  errors, and a failed JIT build that is not retried.
- GPU tests (marked ``cuda``, skipped without a GPU; they skip with the reason when the extension
  is missing unless ALSALS_FUSED_REQUIRE_EXTENSION=1): the ops are registered, a layout the
  kernels do not take runs on foreach, bad arguments have clear errors, no host syncs.

The backend's results against the reference backend and ``decisions.py`` (every pass, the
verdict, misaligned views, trajectories through the optimizer) are the contract suite's:
tests/test_contract.py over backend_suite.INFOS, rows ``cuda-cuda`` (tolerances CUDA_TOL).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

import backend_suite as S
from alsals_fused.backends import cuda_backend, cuda_tools, fused_tables
from alsals_fused.backends.base import (
    CHUNK,
    CTL_SIZE,
    TABLE_COLS,
    VERDICT_SIZE,
    Bucket,
    Ctl,
    DecisionScalars,
    Dir,
    StepScalars,
    TableCol,
    Verdict,
    new_ctl,
)

ROOT = Path(__file__).resolve().parents[1]
GPT2_SMALL = cuda_tools._gpt2_like_numels(148)
GPT2_XL_COUNT = cuda_tools._gpt2_like_numels(580)


# ================================ CPU: the launch description ===================================
@pytest.mark.parametrize("numels", [GPT2_SMALL, GPT2_XL_COUNT], ids=["148", "580"])
def test_one_launch_per_pass(numels):
    plan = cuda_tools.describe_launches(numels, torch.float32)
    assert plan["tensors"] == len(numels)
    assert plan["launches"] == {"grad_pass": 1, "step_pass": 1, "move_pass": 1, "verdict": 1}
    assert plan["extension_calls"] == plan["launches"]
    assert plan["programs"] == sum(-(-n // CHUNK) for n in numels)
    assert plan["partials"] == {"grad_pass": plan["programs"], "step_pass": 2 * plan["programs"]}
    assert plan["table_bytes"] == 8 * TABLE_COLS * len(numels)
    assert plan["full_chunks"] + plan["tail_chunks"] == plan["programs"]


def test_gpt2_small_shapes_are_gpt2():
    assert len(GPT2_SMALL) == 148 and abs(sum(GPT2_SMALL) - 124.44e6) < 0.01e6


@pytest.mark.parametrize("dtype,vec,groups", [(torch.float32, 4, 4), (torch.bfloat16, 8, 2),
                                              (torch.float16, 8, 2)])
def test_vector_loop_keeps_bytes_in_flight(dtype, vec, groups):
    plan = cuda_tools.describe_launches([CHUNK * 3], dtype)
    assert plan["vector_bytes"] == 16 and plan["elements_per_access"] == vec
    assert plan["groups_per_thread"] == groups
    assert plan["threads_per_program"] * vec * groups == CHUNK     # a chunk is one pass of the loop
    assert plan["loads_in_flight"]["step_pass"] >= 12               # 16-byte loads per thread


def test_launch_description_odd_and_empty_tensors():
    numels = [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 0, 3 * CHUNK + 5]
    plan = cuda_tools.describe_launches(numels)
    assert plan["chunks"] == [0, 1, 1, 1, 1, 2, 0, 4]
    assert plan["programs"] == 10 and plan["empty_tensors"] == 2
    assert plan["full_chunks"] == 1 + 1 + 3 and plan["tail_chunks"] == 5
    only_empty = cuda_tools.describe_launches([0, 0])
    assert only_empty["programs"] == 1        # one program with no work runs the finisher
    assert only_empty["launches"]["grad_pass"] == 1
    with pytest.raises(ValueError, match="float64"):
        cuda_tools.describe_launches([4], torch.float64)


def test_launch_description_tensor_above_2_to_31_elements():
    big = 2 ** 31 + 5
    plan = cuda_tools.describe_launches([big, 10])
    assert plan["int64_offsets"] and plan["max_numel"] == big
    assert plan["chunks"] == [-(-big // CHUNK), 1]
    assert plan["launches"]["step_pass"] == 1
    sched, n_fast, n_prog = fused_tables.schedule([big, 10], [True, True], CHUNK)
    assert sched.dtype == torch.int32 and sched.shape == (plan["programs"], 2) == (n_prog, 2)
    assert n_fast == plan["full_chunks"] == big // CHUNK
    last = sched[-2].tolist()                 # the big tensor's tail, then the small tensor's
    assert last == [0, big // CHUNK] and last[1] * CHUNK < big <= (last[1] + 1) * CHUNK
    assert sched[-1].tolist() == [1, 0]


def test_schedule_layout():
    """The shared schedule: aligned full chunks first (the vector path), then tails and the
    chunks of misaligned tensors, each in tensor order; (-1, 0) for a bucket with no elements."""
    numels = [5, 0, 2 * CHUNK, 1, CHUNK + 1]
    sched, n_fast, n_prog = fused_tables.schedule(numels, [True] * 5, CHUNK)
    assert sched.tolist() == [[2, 0], [2, 1], [4, 0], [0, 0], [3, 0], [4, 1]] and (n_fast, n_prog) == (3, 6)
    sched, n_fast, _ = fused_tables.schedule(numels, [True, True, False, True, True], CHUNK)
    assert sched.tolist() == [[4, 0], [0, 0], [2, 0], [2, 1], [3, 0], [4, 1]] and n_fast == 1
    for empty in ([0], []):
        sched, n_fast, n_prog = fused_tables.schedule(empty, [True] * len(empty), CHUNK)
        assert sched.tolist() == [[-1, 0]] and n_fast == n_prog == 0


def test_extension_calls_per_step():
    f = cuda_tools.extension_calls_per_step
    assert f(searching=False)["total"] == 2 and f(searching=False)["d2h_copies"] == 0
    one = f(searching=True, trials=1)
    assert one == {"grad_pass": 1, "step_pass": 1, "move_pass": 1, "verdict": 1, "total": 4, "d2h_copies": 1}
    assert one["total"] + one["d2h_copies"] <= 6             # the budget of docs/algorithm.md §7
    two = f(searching=True, trials=2)
    assert two["total"] - one["total"] + 1 <= 3                           # per extra trial
    assert f(searching=True, trials=1, variant="adam_sls")["move_pass"] == 1   # update from w0
    assert f(searching=True, trials=3, accepted=False)["move_pass"] == 4       # 2 + fix-up + restore
    for trials, accepted in ((1, True), (3, True), (3, False)):      # alsals_plateau moves as alsals
        assert f(searching=True, trials=trials, accepted=accepted, variant="alsals_plateau") == \
            f(searching=True, trials=trials, accepted=accepted)
    assert f(searching=True, trials=2, accepted=False, variant="salsa") != f(searching=True, trials=2, accepted=False)


# ============================ CPU: tables, one call per pass, caching ==========================
def cpu_bucket(shapes, dtype=torch.float32, backups=True, wds=(0.0, 0.01, 0.1)):
    return S.random_bucket(torch.device("cpu"), dtype, shapes, backups=backups, wds=wds)


def test_table_layout():
    b = cpu_bucket([(3, 5), (0,), (CHUNK + 1,)])
    t = fused_tables.BucketTable(b, CHUNK, "cuda")
    assert t.table.dtype == torch.int64 and t.table.shape == (3, TABLE_COLS)
    rows = t.table.tolist()
    for i in (0, 2):
        assert rows[i][TableCol.W] == b.params[i].data_ptr()
        assert rows[i][TableCol.G] == b.grads[i].data_ptr()
        assert rows[i][TableCol.M] == b.exp_avgs[i].data_ptr()
        assert rows[i][TableCol.V] == b.exp_avg_sqs[i].data_ptr()
        assert rows[i][TableCol.BACKUP] == b.backups[i].data_ptr()
        assert rows[i][TableCol.NUMEL] == b.params[i].numel()
    assert rows[1][TableCol.W] == 0 and rows[1][TableCol.NUMEL] == 0
    wd = torch.tensor([r[TableCol.WD_BITS] for r in rows], dtype=torch.int64).view(torch.float64)
    assert wd.tolist() == b.weight_decays
    assert t.sched.tolist() == [[2, 0], [0, 0], [2, 1]] and t.programs == 3 and t.n_fast == 1
    assert t.has_backups
    no_backup = fused_tables.BucketTable(cpu_bucket([(4,)], torch.bfloat16, backups=False), CHUNK, "cuda")
    assert no_backup.table[0, TableCol.BACKUP] == 0 and not no_backup.has_backups


def test_table_refuses_layouts_the_kernels_do_not_take():
    b = cpu_bucket([(8, 4)])
    b.grads[0] = b.grads[0].t().contiguous().t()        # column-major grad, row-major param
    assert "strides" in cuda_backend.CudaBackend.unfusable_reason(b)
    with pytest.raises(ValueError, match=r"has strides \(4, 1\) but its grad has strides \(1, 8\)"):
        fused_tables.BucketTable(b, CHUNK, "cuda")
    ok = cpu_bucket([(2, 3, 4, 5)])
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups"):   # channels_last, all of them
        lst = getattr(ok, name)
        lst[0] = lst[0].contiguous(memory_format=torch.channels_last)
    assert cuda_backend.CudaBackend.unfusable_reason(ok) is None
    fused_tables.BucketTable(ok, CHUNK, "cuda")


class RecordingOps:
    """Stands in for torch.ops.alsals_fused: records every call (one call = one pass)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name not in cuda_backend.OPS:
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))


def recording_backend():
    backend = cuda_backend.CudaBackend.__new__(cuda_backend.CudaBackend)
    backend._ops = RecordingOps()
    backend._no_buckets = {}
    backend.table_builds = backend.grad_refreshes = 0
    return backend


def hp(search_dir=Dir.MOMENTUM, max_grad_norm=None):
    return StepScalars(eta=0.05, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.271,
                       bias_correction2=0.003, smoothing=0.99, search_dir=search_dir,
                       max_grad_norm=max_grad_norm)


@pytest.mark.parametrize("tensors", [148, 580])
def test_one_extension_call_per_pass_and_cached_tables(tensors):
    numels = [1 + (i * 37) % 300 for i in range(tensors)]
    b = cpu_bucket([(n,) for n in numels])
    backend = recording_backend()
    ctl, loss0 = new_ctl("cpu"), torch.tensor(1.0, dtype=torch.float64)
    out = torch.empty(VERDICT_SIZE, dtype=torch.float64)
    for _ in range(3):
        backend._ops.calls.clear()
        backend.grad_pass([b], ctl, loss0, hp())
        backend.step_pass([b], hp(), ctl, searching=True, write_backup=True)
        backend.move_pass([b], hp(), ctl, src_eta=0.05, src_dir=Dir.MOMENTUM, dst_eta=0.05,
                          dst_dir=Dir.UPDATE, from_backup=True, only_if=Ctl.FALLBACK)
        backend.verdict(ctl, loss0, DecisionScalars(eta=0.05, c=0.5, smoothing=0.99), out)
        assert [c[0] for c in backend._ops.calls] == ["grad_pass", "step_pass", "move_pass", "verdict"]
    assert backend.table_builds == 1 and backend.grad_refreshes == 0
    name, args = backend._ops.calls[0]
    tables, scheds, storages = args[:3]
    assert len(tables) == len(scheds) == len(storages) == 1          # a few tensors, not 5 lists
    assert tables[0].shape == (tensors, TABLE_COLS) and scheds[0].shape == (tensors, 2)
    assert args[7] == -1.0                                            # max_grad_norm None
    step_args = backend._ops.calls[1][1]
    assert step_args[13] == int(Dir.MOMENTUM) and step_args[14] is True   # search_dir, searching


def test_a_move_condition_reaches_the_op_as_its_ctl_slot():
    b = cpu_bucket([(5,)])
    backend = recording_backend()
    kw = dict(src_eta=0.05, src_dir=Dir.MOMENTUM, dst_eta=0.0, dst_dir=Dir.MOMENTUM, from_backup=True)
    for only_if, slot in ((None, -1), (Ctl.FALLBACK, 2), (Ctl.UNDO, 10)):
        backend._ops.calls.clear()
        backend.move_pass([b], hp(), new_ctl("cpu"), only_if=only_if, **kw)
        [(name, args)] = backend._ops.calls
        assert name == "move_pass" and type(args[-1]) is int and args[-1] == slot, (only_if, args[-1])
    for bad in (Ctl.SKIP, True, "UNDO"):
        with pytest.raises(ValueError, match="only_if is None or a slot of MOVE_CONDITIONS"):
            backend.move_pass([b], hp(), new_ctl("cpu"), only_if=bad, **kw)


def test_grad_column_refreshed_only_when_grads_move():
    b = cpu_bucket([(5,), (7,)])
    backend = recording_backend()
    ctl, loss0 = new_ctl("cpu"), torch.tensor(1.0, dtype=torch.float64)
    backend.grad_pass([b], ctl, loss0, hp())
    table = b.cache["cuda"].table
    b.replace_grads([g.clone() for g in b.grads])   # set_to_none: new storage, reported
    backend.grad_pass([b], ctl, loss0, hp())
    assert backend.grad_refreshes == 1 and backend.table_builds == 1
    assert b.cache["cuda"].table is table
    assert table[:, TableCol.G].tolist() == [g.data_ptr() for g in b.grads]
    assert table[:, TableCol.W].tolist() == [p.data_ptr() for p in b.params]   # untouched
    backend.step_pass([b], hp(), ctl, searching=False, write_backup=False)
    assert backend.grad_refreshes == 1


def test_each_bucket_list_has_its_own_scratch():
    """Partials and tickets belong to one list of buckets (an optimizer's plan), not to the
    device: two optimizers, possibly stepping on two streams, never share them, and a list's
    scratch is allocated once (never regrown under a kernel that may still use it)."""
    a, b = cpu_bucket([(5,), (7000,)]), cpu_bucket([(9,)])
    c = cpu_bucket([(3,)], torch.bfloat16)
    backend = recording_backend()
    ctl, loss0 = new_ctl("cpu"), torch.tensor(1.0, dtype=torch.float64)
    seen = {}
    for name, buckets in (("a", [a]), ("b", [b]), ("b+c", [b, c]), ("a again", [a])):
        backend._ops.calls.clear()
        backend.grad_pass(buckets, ctl, loss0, hp())
        backend.step_pass(buckets, hp(), ctl, searching=True, write_backup=True)
        (_, grad_args), (_, step_args) = backend._ops.calls
        partials, tickets = grad_args[3], grad_args[4]
        assert step_args[3] is partials and step_args[4] is tickets      # one list, one scratch
        programs = sum(t.programs for t in (bk.cache["cuda"] for bk in buckets))
        assert partials.numel() >= 2 * programs and not tickets.any()
        seen[name] = (partials, tickets)
    assert seen["a again"][0] is seen["a"][0] and seen["a again"][1] is seen["a"][1]
    distinct = [seen[n] for n in ("a", "b", "b+c")]
    assert len({p.data_ptr() for p, _ in distinct}) == 3 and len({t.data_ptr() for _, t in distinct}) == 3


def test_grad_sink_is_the_table_column_and_native_grads_only_upload():
    """The driver's native reader writes the G column through grad_sink; a pass then uploads the
    table as it is (no column rewrite from bucket.grads, which are empty on that path)."""
    b = cpu_bucket([(5,), (7,)])
    backend = recording_backend()
    host, col = backend.grad_sink(b)
    assert col == TableCol.G and host.dtype == torch.int64 and host.is_contiguous()
    assert backend.grad_sink(cpu_bucket([])) is None
    table = b.cache["cuda"].table
    assert host.data_ptr() == table.data_ptr(), "on the CPU the kernels read the host table itself"
    new = [g.clone() for g in b.grads]
    host[:, col] = torch.tensor([g.data_ptr() for g in new])       # what GradReader.read writes
    b.grads, b.grad_ptrs, b.native_grads = [], (), True
    b.grads_version += 1
    ctl, loss0 = new_ctl("cpu"), torch.tensor(1.0, dtype=torch.float64)
    backend.grad_pass([b], ctl, loss0, hp())
    assert backend.grad_refreshes == 1 and backend.table_builds == 1
    assert table[:, TableCol.G].tolist() == [g.data_ptr() for g in new]
    (name, args), = backend._ops.calls
    assert name == "grad_pass" and args[0] == [table]


def test_grads_in_another_layout_after_the_table_was_built_are_refused():
    """The driver asks the one rule (unfusable_reason) when it builds its plan and makes a new
    plan when a gradient's layout changes; a bucket handed to the backend with such grads is a
    misuse, refused with the strides named (never run on foreach behind the driver's back)."""
    b = cpu_bucket([(8, 4)])
    backend = recording_backend()
    assert backend.grad_sink(b) is not None
    b.replace_grads([b.grads[0].t().contiguous().t()])
    ctl, loss0 = new_ctl("cpu"), torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ALSALS cuda backend: .* strides \(4, 1\) but its grad has strides \(1, 8\)"):
        backend.grad_pass([b], ctl, loss0, hp())
    assert backend._ops.calls == []


def test_several_buckets_one_call_and_finish_false():
    b32, b16 = cpu_bucket([(5,)]), cpu_bucket([(9,), (CHUNK + 2,)], torch.bfloat16)
    backend = recording_backend()
    ctl = new_ctl("cpu")
    sums = backend.step_pass([b32, b16], hp(), ctl, searching=True, write_backup=True, finish=False)
    assert sums.shape == (2,) and sums.dtype == torch.float64
    (name, args), = backend._ops.calls
    assert args[2] == [0, 1] and [s.shape[0] for s in args[1]] == [1, 3]
    partials = args[3]
    assert partials.dtype == torch.float32 and partials.numel() >= 2 * 4
    assert args[-1] is sums and args[-2] is False


def test_a_bucket_the_kernels_cannot_take_is_refused():
    b = cpu_bucket([(8, 4)])
    b.grads[0] = b.grads[0].t().contiguous().t()
    backend = recording_backend()
    assert "strides" in backend.unfusable_reason(b)
    with pytest.raises(ValueError, match="ALSALS cuda backend: .*strides"):
        backend.grad_pass([b], new_ctl("cpu"), torch.tensor(1.0, dtype=torch.float64), hp())
    assert backend._ops.calls == []
    f64 = cpu_bucket([(3,)])
    f64.dtype = torch.float64
    assert "float64" in backend.unfusable_reason(f64)


def test_write_backup_without_backups_is_an_error():
    backend = recording_backend()
    with pytest.raises(ValueError, match="without backups"):
        backend.step_pass([cpu_bucket([(3,)], backups=False)], hp(), new_ctl("cpu"), searching=True,
                          write_backup=True)


# ================================ CPU: the layout header =======================================
def test_layout_header_is_current():
    """csrc/alsals_layout.h is generated from base.py; regenerate it with
    python -m alsals_fused.backends.cuda_tools --write-header"""
    assert cuda_tools.LAYOUT_HEADER.read_text() == cuda_tools.layout_header()


def test_layout_header_says_what_base_says():
    text = cuda_tools.layout_header()
    assert f"constexpr int CHUNK = {CHUNK};" in text and f"constexpr int CTL_SIZE = {CTL_SIZE};" in text
    for enum in (Ctl, Verdict, Dir, TableCol):
        block = re.search(rf"namespace {enum.__name__} {{ enum : int {{ (.*?) }}; }}", text).group(1)
        assert dict(re.findall(r"(\w+) = (\d+),", block)) == {m.name: str(int(m)) for m in enum}
    assert cuda_tools.layout_digest() in text


def test_check_header_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cuda_tools, "LAYOUT_HEADER", tmp_path / "alsals_layout.h")
    assert cuda_tools.main(["--check-header"]) == 1
    assert cuda_tools.main(["--write-header", "--check-header"]) == 0
    assert (tmp_path / "alsals_layout.h").read_text() == cuda_tools.layout_header()


def test_describe_launches_command(capsys):
    assert cuda_tools.main(["--describe-launches", "148"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = cuda_tools.describe_launches(GPT2_SMALL)
    want.pop("chunks")
    assert printed == want and printed["tensors"] == 148


def test_kernel_sources_use_the_generated_names():
    """No literal ctl/verdict/table indices or chunk sizes in the C++: they come from the header."""
    for name in ("kernels.cu", "alsals_ops.cpp", "alsals_math.h", "passes.h"):
        src = (ROOT / "csrc" / name).read_text()
        no_sums = src.replace("out[0]", "").replace("out[1]", "")   # the finish=False sums
        assert not re.search(r"ctl\[\d", src) and not re.search(r"out\[\d", no_sums), name
        assert "4096" not in src and "8192" not in src, name
        assert "<torch" not in src or name == "alsals_ops.cpp", f"{name} includes torch headers"
    assert '#include "alsals_layout.h"' in (ROOT / "csrc" / "alsals_math.h").read_text()


# ================================ CPU: build settings ==========================================
def load_settings():
    path = ROOT / "csrc" / "build_settings.py"
    spec = importlib.util.spec_from_file_location("alsals_build_settings_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_settings_target_the_archs_once(monkeypatch):
    mod = load_settings()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    kw = mod.extension_kwargs()
    flags = " ".join(kw["extra_compile_args"]["nvcc"])
    for arch in mod.ARCHS:
        assert f"arch=compute_{arch},code=sm_{arch}" in flags
    assert mod.ARCHS == ("80", "90") and mod.arch_list() == "8.0;9.0"
    assert "-O3" in flags and "use_fast_math" not in flags
    # no FMA contraction (docs/algorithm.md section 5), in the JIT build too
    assert "--fmad=false" in flags and "--fmad=false" in mod.jit_kwargs()["extra_cuda_cflags"]
    assert all((ROOT / s).is_file() for s in kw["sources"])
    assert all((ROOT / "csrc" / h).is_file() for h in mod.HEADERS)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert "-gencode" not in mod.nvcc_flags()


def test_one_source_list_and_arch_list():
    """setup.py and the CI script load csrc/build_settings.py; CMakeLists.txt parses its two lines."""
    mod = load_settings()
    settings = (ROOT / "csrc" / "build_settings.py").read_text()
    assert re.search(r"\nSOURCES = \(([^)]*)\)", settings) and re.search(r"\nARCHS = \(([^)]*)\)", settings)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    code = "\n".join(line.split("#")[0] for line in cmake.splitlines())
    for source in mod.SOURCES:
        assert source not in code, f"CMakeLists.txt names {source}: it must read build_settings.py"
    assert "8.0;9.0" not in code and "csrc/build_settings.py" in code
    setup = (ROOT / "setup.py").read_text()
    assert "sys.path" not in setup and "build_settings.py" in setup
    assert "sys.path" not in Path(cuda_backend.__file__).read_text()
    assert not (ROOT / "csrc_build.py").exists()
    ci = (ROOT / ".ci" / "cuda_build.sh").read_text()
    assert "8.0;9.0" not in ci and "pip\" install -v --no-build-isolation -e ." in ci


def fake_toolkit(root: Path, with_libs=False) -> Path:
    home = root / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "include" / "cuda_runtime.h").write_text("")
    if with_libs:
        (home / "include" / "cusparse.h").write_text("")
    return home


def test_toolkit_found_behind_a_wrapper_script(tmp_path, monkeypatch):
    """The nvcc on PATH is `exec /.../cuda-13.0/bin/nvcc "$@"` in another folder, CUDA_HOME unset."""
    mod = load_settings()
    home = fake_toolkit(tmp_path)
    wrapper_dir = tmp_path / "usr-local-bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert mod.find_cuda_home() == home
    assert mod.ensure_cuda_home() == home and os.environ["CUDA_HOME"] == str(home)
    monkeypatch.setenv("CUDA_HOME", "/somewhere/else")      # an explicit setting wins
    assert mod.ensure_cuda_home() == Path("/somewhere/else") and os.environ["CUDA_HOME"] == "/somewhere/else"


def test_toolkit_headers_come_before_pip_headers(tmp_path, monkeypatch):
    mod = load_settings()
    home = fake_toolkit(tmp_path)
    pip = tmp_path / "site" / "nvidia"
    for pkg, header in (("cu13", "cusparse.h"), ("cudnn", "cudnn.h")):
        (pip / pkg / "include").mkdir(parents=True)
        (pip / pkg / "include" / header).write_text("")
        (pip / pkg / "include" / "cuda_runtime.h").write_text("")   # another copy of the runtime
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(mod.sysconfig, "get_paths", lambda: {"purelib": str(tmp_path / "site"),
                                                             "platlib": str(tmp_path / "site")})
    dirs = mod.include_dirs()
    assert dirs[:2] == [str(mod.CSRC), str(home / "include")]
    assert dirs[2:] == [str(pip / "cu13" / "include")]      # only the folder supplying cusparse.h
    full = fake_toolkit(tmp_path / "full", with_libs=True)
    for h in mod.LIBRARY_HEADERS:
        (full / "include" / h).write_text("")
    monkeypatch.setenv("CUDA_HOME", str(full))
    assert mod.include_dirs() == [str(mod.CSRC), str(full / "include")]


# ================================ CPU: loading =================================================
@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "no-jit-builds"))
    for name, value in (("_module", None), ("_load_error", None), ("_loaded", False), ("_jit_failed", None)):
        monkeypatch.setattr(cuda_backend, name, value)
    real = importlib.import_module

    def no_extension(name, *a, **k):
        if name == "alsals_fused._C":
            raise ImportError("No module named 'alsals_fused._C'")
        return real(name, *a, **k)

    monkeypatch.setattr(cuda_backend.importlib, "import_module", no_extension)
    return cuda_backend


def test_missing_extension_says_how_to_build(fresh_loader, monkeypatch):
    monkeypatch.delenv("ALSALS_FUSED_JIT", raising=False)
    assert fresh_loader.load_extension() is None
    assert "pip install --no-build-isolation -e ." in fresh_loader._load_error
    assert "ALSALS_FUSED_JIT=1" in fresh_loader._load_error


def test_failed_jit_build_is_not_retried(fresh_loader, monkeypatch):
    monkeypatch.setenv("ALSALS_FUSED_JIT", "1")
    builds = []

    def failing_build():
        builds.append(1)
        raise RuntimeError("Error building extension 'alsals_fused_jit_C'")

    monkeypatch.setattr(fresh_loader, "_jit_build", failing_build)
    assert fresh_loader.load_extension() is None
    assert "JIT build" in fresh_loader._load_error and "not retried" in fresh_loader._load_error
    monkeypatch.setattr(fresh_loader, "_loaded", False)   # even a forced reload does not rebuild
    assert fresh_loader.load_extension() is None
    assert builds == [1]


def _compiled_module(folder: Path, name: str, digest: str, threads: int, extra: tuple = ()) -> Path:
    """A minimal compiled Python module at ``folder/name/name.so`` (torch's JIT build layout)
    with the two constants the loader checks (and the int constants named in ``extra``)."""
    import shutil
    import subprocess
    import sysconfig
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (folder / name).mkdir(parents=True)
    src = folder / "m.c"
    src.write_text(f"""#include <Python.h>
static struct PyModuleDef def = {{PyModuleDef_HEAD_INIT, "{name}", NULL, -1, NULL}};
PyMODINIT_FUNC PyInit_{name}(void) {{
  PyObject* m = PyModule_Create(&def);
  if (m) PyModule_AddStringConstant(m, "LAYOUT_DIGEST", "{digest}");
  if (m) PyModule_AddIntConstant(m, "THREADS", {threads});
{"".join(f'  if (m) PyModule_AddIntConstant(m, "{e}", 1);' + chr(10) for e in extra)}  return m;
}}
""")
    so = folder / name / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(so)],
                   check=True, capture_output=True)
    return so


def test_a_finished_jit_build_is_loaded_without_jit(fresh_loader, monkeypatch, tmp_path):
    """The GPU suite sets ALSALS_FUSED_JIT=0 after a cut build phase: an extension that a JIT
    build finished before the cut is loaded from torch's build folder, unless a source changed."""
    root = tmp_path / "ext"
    so = _compiled_module(root, fresh_loader.JIT_NAME, fresh_loader.layout_digest(), fresh_loader.THREADS)
    source = tmp_path / "kernels.cu"
    source.write_text("")
    built = so.stat().st_mtime
    os.utime(source, (built - 100, built - 100))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setenv("ALSALS_FUSED_JIT", "0")
    monkeypatch.setattr(fresh_loader, "_jit_depends", lambda: [source])
    monkeypatch.setattr(fresh_loader, "_jit_build", lambda: pytest.fail("ALSALS_FUSED_JIT=0 compiled"))
    monkeypatch.setattr(torch.ops, "alsals_fused", type("Ops", (), {op: None for op in cuda_backend.OPS})())
    module = fresh_loader.load_extension()
    assert module is not None and module.__name__ == fresh_loader.JIT_NAME, fresh_loader._load_error
    assert fresh_loader._load_error is None
    # a source edited after the build: that build is not used
    os.utime(source, (built + 100, built + 100))
    assert fresh_loader.finished_jit_build(fresh_loader.JIT_NAME, [source]) is None
    assert fresh_loader.finished_jit_build("alsals_fused_no_such_build", []) is None


def test_a_finished_jit_build_of_the_host_helper_is_loaded_without_jit(monkeypatch, tmp_path):
    import sys

    from alsals_fused import host_ext
    root = tmp_path / "ext"
    _compiled_module(root, host_ext._JIT_NAME, "-", 0, extra=host_ext._API)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setenv("ALSALS_FUSED_JIT", "0")
    monkeypatch.delenv("ALSALS_FUSED_PYTHON_READS", raising=False)
    import alsals_fused
    monkeypatch.setitem(sys.modules, "alsals_fused._host", None)     # not pip-built here
    monkeypatch.delattr(alsals_fused, "_host", raising=False)
    monkeypatch.setattr(host_ext, "_module", None)
    monkeypatch.setattr(host_ext, "_error", None)
    monkeypatch.setattr(host_ext, "_jit_build", lambda: pytest.fail("ALSALS_FUSED_JIT=0 compiled"))
    assert host_ext.status() == f"native ({host_ext._JIT_NAME})"


def test_stale_extension_is_refused(monkeypatch):
    class Stale:
        LAYOUT_DIGEST = "0000"
        THREADS = cuda_backend.THREADS

    monkeypatch.setattr(torch.ops, "alsals_fused", type("Ops", (), {op: None for op in cuda_backend.OPS})())
    assert "rebuild" in cuda_backend._check_module(Stale())


def test_cuda_backend_on_cpu_raises_with_reason():
    from alsals_fused import ALSALS, BackendUnavailable, available_backends
    from alsals_fused.backends import get_backend
    p = torch.nn.Parameter(torch.randn(3))
    opt = ALSALS([p], backend="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        opt.step(lambda: (p ** 2).sum())
    reason = available_backends("cpu")["cuda"]
    assert reason and "CUDA" in reason
    with pytest.raises(BackendUnavailable, match="cannot run on cpu"):
        get_backend("cuda", torch.device("cpu"))


def test_unavailable_reason_says_how_to_build():
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if torch.cuda.is_available() and cuda_backend.load_extension() is not None:
        assert reason is None
    elif not torch.cuda.is_available():
        assert "CUDA GPU" in reason
    else:
        assert "pip install --no-build-isolation" in reason or "JIT" in reason


# ================================ GPU: the extension itself ====================================
# Its results against the reference (every pass, the verdict, misaligned views, trajectories) are
# the contract suite's: tests/test_contract.py, rows cuda-* (backend_suite.CUDA_TOL).
INFO = S.BackendInfo("cuda", torch.device("cuda"), S.FUSED_DTYPES, **S.CUDA_TOL)


def _extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        if os.environ.get("ALSALS_FUSED_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the CUDA extension is required: {reason}")
        pytest.skip(reason)
    return cuda_backend.load_extension()


@pytest.fixture
def ext():
    return _extension()


@pytest.fixture
def be():
    """The CUDA backend (the extension loaded, on a GPU)."""
    _extension()
    from alsals_fused.backends import get_backend
    return get_backend("cuda", torch.device("cuda"))


def make_bucket(dtype, shapes=S.CUDA_SIZES, *, seed=0, backups=True) -> Bucket:
    return S.random_bucket(torch.device("cuda"), dtype, shapes, seed=seed, backups=backups)


def gpu_hp(t=3, eta=0.05, search_dir=Dir.MOMENTUM, max_grad_norm=None, smoothing=0.99) -> StepScalars:
    return S.step_scalars(t=t, eta=eta, search_dir=search_dir, max_grad_norm=max_grad_norm, smoothing=smoothing)


def ctl_of(scale=1.0, skip=0.0, fallback=0.0, s=-0.02, h=0.01, pending=0.0) -> torch.Tensor:
    return S.make_ctl(torch.device("cuda"), SCALE=scale, SKIP=skip, FALLBACK=fallback, S=s, H=h, PENDING=pending,
                      LOSS0=1.5)


@pytest.mark.cuda
def test_ops_registered(ext):
    for op in cuda_backend.OPS:
        assert hasattr(torch.ops.alsals_fused, op)
    assert ext.CHUNK == CHUNK and ext.LAYOUT_DIGEST == cuda_tools.layout_digest()
    from alsals_fused.backends import get_backend
    assert get_backend("auto", torch.device("cuda")).name == "cuda"


@pytest.mark.cuda
def test_layout_the_kernels_cannot_take_runs_on_foreach_through_the_driver(be):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32, device="cuda")[:, ::2])     # a non-dense view
    b = Bucket(device=w.device, dtype=w.dtype, params=[w.data], grads=[torch.ones_like(w)],
               exp_avgs=[torch.zeros_like(w)], exp_avg_sqs=[torch.zeros_like(w)], weight_decays=[0.0])
    with pytest.raises(ValueError, match="densely"):
        be.grad_pass([b], ctl_of(), torch.tensor(1.0, dtype=torch.float64, device="cuda"), gpu_hp())
    from alsals_fused import ALSALS
    opt = ALSALS([w], backend="cuda")
    with pytest.warns(UserWarning, match="backend='cuda' cannot take"):
        opt.step(lambda: w.square().sum())
    assert set(opt.chosen_backends.values()) == {"foreach"}


@pytest.mark.cuda
def test_bad_arguments_have_clear_errors(be):
    b = make_bucket(torch.float32, shapes=[(5,)])
    be.grad_pass([b], ctl_of(), torch.tensor(1.0, dtype=torch.float64, device="cuda"), gpu_hp())
    t = b.cache["cuda"]
    ops = torch.ops.alsals_fused
    with pytest.raises((ValueError, RuntimeError), match="ctl"):
        ops.move_pass([t.table], [t.sched], [0], torch.zeros(3, device="cuda"), 1e-8, 0.1, 0.001,
                      0.1, 0, 0.0, 0, True, -1)
    with pytest.raises((ValueError, RuntimeError), match="storage code"):
        ops.move_pass([t.table], [t.sched], [3], ctl_of(), 1e-8, 0.1, 0.001, 0.1, 0, 0.0, 0, True, -1)
    with pytest.raises((ValueError, RuntimeError), match="Dir"):
        ops.move_pass([t.table], [t.sched], [0], ctl_of(), 1e-8, 0.1, 0.001, 0.1, 3, 0.0, 0, True, -1)
    for bad in (int(Ctl.SKIP), CTL_SIZE, -2):       # only FALLBACK and UNDO gate a move
        with pytest.raises((ValueError, RuntimeError), match="only_if is the ctl slot"):
            ops.move_pass([t.table], [t.sched], [0], ctl_of(), 1e-8, 0.1, 0.001, 0.1, 0, 0.0, 0, True, bad)


@pytest.mark.cuda
def test_no_sync(be):
    b = make_bucket(torch.bfloat16, seed=8)
    b32 = make_bucket(torch.float32, backups=False, seed=9)
    hp, ctl = gpu_hp(), ctl_of(scale=0.9)
    loss0 = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    out = torch.empty(VERDICT_SIZE, dtype=torch.float64, device="cuda")
    for bucket in (b, b32):      # tables built (their upload is non-blocking too)
        be.grad_pass([bucket], ctl, loss0, hp)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        be.grad_pass([b], ctl, loss0, hp)
        be.step_pass([b], hp, ctl, searching=True, write_backup=True)
        be.move_pass([b], hp, ctl, src_eta=hp.eta, src_dir=Dir.MOMENTUM, dst_eta=hp.eta,
                       dst_dir=Dir.UPDATE, from_backup=True, only_if=Ctl.FALLBACK)
        be.verdict(ctl, loss0, DecisionScalars(eta=hp.eta, c=0.5, smoothing=0.99), out)
        be.move_pass([b], hp, ctl, src_eta=hp.eta, src_dir=Dir.UPDATE, dst_eta=0.0,
                       dst_dir=Dir.UPDATE, from_backup=True)
        be.step_pass([b32], hp, ctl, searching=False, write_backup=False)
        b.replace_grads([g.clone() for g in b.grads])
        be.grad_pass([b], ctl, loss0, hp)              # the grad column refresh does not sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
