"""pytest configuration of the benchmarks (pytest-benchmark).

    pytest benchmarks --benchmark-only                      # CPU: a few minutes, small sizes
    ALSALS_BENCH_SMOKE=1 pytest benchmarks --benchmark-only # CI smoke subset, tiny sizes
    pytest benchmarks --benchmark-only -m smoke             # the smoke rows at the default sizes

Every finished row is kept (and appended to ``$ALSALS_BENCH_JSONL`` if set, so a run that is cut
short still leaves its rows); the session ends with a summary table and the target ratios.
No test asserts anything about timing.
"""
import json
import os

import pytest

# pytest puts this folder on sys.path before importing this file (rootdir-less conftest, "prepend"
# import mode), so the benchmark helpers import as top-level modules.
import _benchlib as lib
import _report

_ROWS = []


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the benchmark subset CI runs (ALSALS_BENCH_SMOKE=1)")
    config.addinivalue_line("markers", "micro: optimizer-step microbenchmarks")
    config.addinivalue_line("markers", "e2e: end-to-end training benchmarks")


def pytest_collection_modifyitems(config, items):
    if not lib.SMOKE:
        return
    keep, drop = [], []
    for item in items:
        is_bench = os.path.dirname(str(item.fspath)) == os.path.dirname(os.path.abspath(__file__))
        (keep if (not is_bench or "smoke" in item.keywords) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item._alsals_passed = outcome.get_result().passed


@pytest.fixture
def bench(benchmark, request):
    """pytest-benchmark's fixture; after a passing test, its row is recorded with its extra_info."""
    yield benchmark
    if not getattr(request.node, "_alsals_passed", False):
        return
    stats = lib.stats_of(benchmark)
    row = {"test": request.node.name, "group": benchmark.group, "stats": stats,
           "device": str(lib.DEVICE), "size": lib.SIZE, **benchmark.extra_info}
    _ROWS.append(row)
    path = os.environ.get("ALSALS_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.write_sep("=", f"ALSALS benchmark summary ({lib.DEVICE}, size {lib.SIZE})")
    terminalreporter.write_line(_report.markdown_tables(_ROWS))
    terminalreporter.write_line(_report.markdown_targets(_report.targets(_ROWS)))
