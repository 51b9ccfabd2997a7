"""The GPU suite's plumbing on a CPU: its output directory, its raw bundle, its --quick plan.

The suite itself (benchmarks/gpu_suite.py) runs on a GPU machine; here a dry run of a few fast
phases checks what it leaves in ``--out DIR`` (at most ``MAX_OUT_FILES`` files, the raw ones
bundled, so that a run's record stays small enough to commit and read).
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _report  # noqa: E402
import gpu_suite  # noqa: E402


def test_plans_fit_four_and_nine_minutes():
    for mode, col, limit in (("quick", 1, 230), ("full", 0, 540)):
        total = gpu_suite.TOTAL[mode]
        planned = sum(budgets[col] for _, budgets, _ in gpu_suite.PHASES) + gpu_suite.SAFETY_S
        assert planned <= total <= limit, (mode, planned, total)
    # the minimum each phase keeps for itself fits the quick total too
    assert sum(m for _, _, m in gpu_suite.PHASES) + gpu_suite.SAFETY_S <= gpu_suite.TOTAL["quick"]
    names = [p[0] for p in gpu_suite.PHASES]
    assert names.index("build") < names.index("warm") < names.index("tests")


def test_output_never_overwrites_a_committed_file(tmp_path):
    """A rerun the same day into a folder with committed results takes the next free name."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    (tmp_path / "2026-12-07-h100.json").write_text("{}")
    (tmp_path / "2026-12-07-h100-2.md").write_text("")
    subprocess.run(git + ["add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "results"], cwd=tmp_path, check=True)
    (tmp_path / "2026-12-07-a100.json").write_text("{}")          # not committed: reusable
    assert gpu_suite.free_stem(str(tmp_path), "2026-12-07-h100") == "2026-12-07-h100-3"
    assert gpu_suite.free_stem(str(tmp_path), "2026-12-07-a100") == "2026-12-07-a100"
    assert gpu_suite.free_stem(str(tmp_path / "elsewhere"), "x") == "x"


def test_default_output_is_a_fresh_folder_git_ignores():
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--quick"]))
    try:
        assert suite.out.startswith(os.path.join(gpu_suite.REPO, "build", "gpu-suite") + os.sep)
        assert not os.listdir(suite.out)
        ignored = subprocess.run(["git", "check-ignore", "-q", suite.out], cwd=gpu_suite.REPO)
        assert ignored.returncode == 0, "the default output folder must be ignored by git"
    finally:
        os.rmdir(suite.out)
        shutil.rmtree(suite.work, ignore_errors=True)


def _offline_suite(monkeypatch, tmp_path, argv, results):
    """A suite whose child processes are stand-ins: ``results[name]`` is what run(name) returns."""
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--out", str(tmp_path / "out"), *argv]))
    calls = []

    def fake_run(name, cmd, timeout, echo=(), **env):
        calls.append((name, cmd, env))
        r = dict(rc=0, timed_out=False, seconds=1.0, text="", log=name)
        r.update(results.get(name, {}))
        return r

    monkeypatch.setattr(suite, "run", fake_run)
    return suite, calls


def test_tests_phase_runs_the_gpu_backend_tests_first(monkeypatch, tmp_path):
    summary = "==== 3 passed in 1.0s ===="
    suite, calls = _offline_suite(monkeypatch, tmp_path, ["--quick"], {
        "tests-gpu": {"text": summary}, "tests-rest": {"text": "==== 1 failed, 2 passed in 2.0s ====\n"
                                                       "FAILED tests/test_x.py::test_y - boom"}})
    r = suite.phase_tests(100)
    assert [c[0] for c in calls] == ["tests-gpu", "tests-rest"]
    markers = [c[1][len(c[1]) - 1 - c[1][::-1].index("-m") + 1] for c in calls]   # the last -m
    assert markers == ["gpu_backends and not slow", "not gpu_backends and not slow"]
    assert "tests-gpu: 3 passed" in r["note"] and "tests-rest: 1 failed" in r["note"]
    assert suite.doc["tests"]["failed"] == ["tests/test_x.py::test_y - boom"]
    shutil.rmtree(suite.work, ignore_errors=True)


def test_a_cut_build_keeps_the_backends_and_turns_jit_off(monkeypatch, tmp_path):
    early = '{"device": "cuda", "backends": {"reference": null, "cuda": null}, "import_s": 50.0}'
    suite, calls = _offline_suite(monkeypatch, tmp_path, ["--quick", "--phases", "build"], {
        "build": {"timed_out": True, "rc": None, "text": f"building...\nALSALS_BACKENDS={early}\n"}})
    suite.phase_build(60)
    assert suite.doc["backends"]["backends"]["cuda"] is None and not suite.jit
    assert suite.child_env()["ALSALS_FUSED_JIT"] == "0"
    assert calls[0][0] == "build" and "ALSALS_BACKENDS=" in gpu_suite.BUILD_SCRIPT
    # the early line is printed before the smoke steps (and before waiting for the host helper)
    script = gpu_suite.BUILD_SCRIPT
    assert script.index('print("ALSALS_BACKENDS="') < script.index("host_build.wait()")
    shutil.rmtree(suite.work, ignore_errors=True)


def test_the_summary_table_is_printed_last(monkeypatch, tmp_path, capsys):
    suite, _ = _offline_suite(monkeypatch, tmp_path, ["--dry-run"], {})
    suite.finish()
    out = capsys.readouterr().out.rstrip().splitlines()
    assert "wrote" not in out[-1] and out[-1] == suite.markdown().rstrip().splitlines()[-1]
    assert any("wrote" in line for line in out) and len(gpu_suite.out_files(suite.out)) <= 8


def test_bundle_dir(tmp_path):
    raw = tmp_path / "work" / "raw"
    raw.mkdir(parents=True)
    for i in range(20):
        (raw / f"phase{i}.log").write_text(f"log {i}\n")
    out = tmp_path / "out"
    out.mkdir()
    dest = gpu_suite.bundle_dir(str(raw), str(out / "x-raw.tar.gz"))
    assert gpu_suite.out_files(str(out)) == ["x-raw.tar.gz"]
    with tarfile.open(dest) as tar:
        names = sorted(tar.getnames())
    assert "raw/phase7.log" in names and len([n for n in names if n.endswith(".log")]) == 20


def test_clear_jit_locks_removes_only_this_packages_build_locks(tmp_path):
    # torch's FileBaton waits with no time limit on a lock a killed build left behind.
    # <TORCH_EXTENSIONS_DIR>/<name>/lock (the suite's layout) or <root>/py*_cu*/<name>/lock
    ours = [tmp_path / gpu_suite.JIT_NAMES[0] / "lock",
            *(tmp_path / "py312_cu130" / name / "lock" for name in gpu_suite.JIT_NAMES)]
    theirs = tmp_path / "py312_cu130" / "someone_elses_ext" / "lock"
    sources = tmp_path / "py312_cu130" / gpu_suite.JIT_NAMES[0] / "build.ninja"
    for path in (*ours, theirs, sources):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert sorted(gpu_suite.clear_jit_locks(str(tmp_path))) == sorted(map(str, ours))
    assert not any(p.exists() for p in ours) and theirs.exists() and sources.exists()
    assert gpu_suite.clear_jit_locks(str(tmp_path)) == []


@pytest.mark.slow   # a whole dry run of the suite
@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("ALSALS_GPU_SUITE") == "1",
                    reason="a second suite inside a GPU run would clear its JIT locks, re-enable JIT "
                           "and smoke-step on its GPU")
def test_dry_run_leaves_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(BENCH, "gpu_suite.py"), "--dry-run", "--out", str(out),
           "--phases", "env,wheels,build,warm,plot", "--wheels", str(tmp_path / "no-wheels")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")     # CPU only, whatever the machine has
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = gpu_suite.out_files(str(out))
    assert len(files) <= gpu_suite.MAX_OUT_FILES, files
    bundles = [f for f in files if f.endswith("-raw.tar.gz")]
    assert len(bundles) == 1, files
    with tarfile.open(out / bundles[0]) as tar:
        assert "raw/env.log" in tar.getnames()
    doc = json.loads((out / bundles[0].replace("-raw.tar.gz", ".json")).read_text())
    assert [p["name"] for p in doc["phases"]] == ["env", "wheels", "build", "warm", "plot"]
    # The build phase (its host-helper child and the backends' import) ran and smoke-stepped.
    assert doc["phases"][2]["status"] == "ok", doc["phases"][2]
    # The warm phase launched every specialization (under the interpreter here).
    assert doc["phases"][3]["status"] == "ok", doc["phases"][3]
    assert doc["warm"]["launched"] == doc["warm"]["specializations"] and not doc["warm"]["errors"]
    assert doc["phases"][4]["status"] == "ok", doc["phases"][4]          # plot, in a child process
    # The summary table is the last thing printed.
    assert proc.stdout.rstrip().splitlines()[-1] == (out / bundles[0].replace("-raw.tar.gz", ".md")).read_text(
    ).rstrip().splitlines()[-1]
    assert doc["backends"]["smoke"]["reference"].startswith("ok") and doc["backends"]["host_build_rc"] == 0
    assert doc["suite"]["raw_logs"] == bundles[0]


def test_unknown_phase_is_refused():
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--dry-run", "--phases", "env,nope"])


def test_hot_path_rows_render():
    records = [{"backend": "triton", "tensors": 148, "ops_searching_step": 6, "ops_extra_trial": 3,
                "ops_nonsearching_step": 3, "host_us_searching_step": 120.4,
                "host_us_nonsearching_step": 70.0, "detail": {"x": 1}},
               {"backend": "cuda", "tensors": 580, "ops_searching_step": 5, "ops_extra_trial": 3,
                "ops_nonsearching_step": 2, "host_us_searching_step": None,
                "host_us_nonsearching_step": None, "note": "launch description only"}]
    rows = _report.hot_path_rows(records, steps=200)
    assert all(r["kind"] == "hot-path" and "detail" not in r for r in rows)
    table = _report.markdown_tables(rows)
    assert "| triton | 148 | 6 | 3 | 3 | 120 | 70 |" in table and "launch description only" in table
    met = {(t["target"], t["set"]): t["met"] for t in _report.targets(rows)}
    assert met[("triton: device ops, searching step", "148 tensors")] is True
    assert met[("triton: host us, searching step", "148 tensors")] is True
    assert ("cuda: host us, searching step", "580 tensors") not in met


def test_gpu_rows_report_device_and_wall_time():
    base = {"group": "step s", "kind": "micro", "set": "s", "family": "gpt2", "params": 10,
            "tensors": 1, "bytes_per_param": 36}
    rows = [dict(base, row="adam-fused", stats={"median": 1e-3, "min": 1e-3, "rounds": 5},
                 device_s=0.9e-3, wall_s=1e-3, wall_over_device=1.111, calls_per_sync=20),
            dict(base, row="alsals-triton-accepted", stats={"median": 2e-3, "min": 2e-3, "rounds": 5},
                 device_s=1.1e-3, wall_s=2e-3, wall_over_device=1.818, calls_per_sync=12),
            dict(base, row="alsals-triton-opt.step", stats={"median": 2.5e-3, "min": 2.4e-3, "rounds": 5},
                 device_s=2.4e-3, wall_s=2.5e-3, wall_over_device=1.04, calls_per_sync=10)]
    table = _report.markdown_tables(rows)
    assert "| alsals-triton-accepted | 2 | 2 | 1.1 | - | 1.82 | 12 |" in table, table
    ts = {t["target"]: t for t in _report.targets(rows)}
    acc = ts["triton: accepted-step work / torch adam-fused"]
    # Without the profiler's busy times: the event spans, labelled as an upper bound.
    assert acc["value"] == pytest.approx(1.1 / 0.9) and "upper bound" in acc["detail"]
    assert ts["triton: opt.step incl. host work / torch adam-fused"]["value"] == pytest.approx(2.5)
    rows[0]["busy_s"], rows[1]["busy_s"] = 0.85e-3, 1.0e-3       # busy times win when both exist
    assert "| alsals-triton-accepted | 2 | 2 | 1.1 | 1 | 1.82 | 12 |" in _report.markdown_tables(rows)
    acc = {t["target"]: t for t in _report.targets(rows)}["triton: accepted-step work / torch adam-fused"]
    assert acc["value"] == pytest.approx(1.0 / 0.85) and acc["detail"] == "device busy time (profiler)"
