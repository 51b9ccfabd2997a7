#!/usr/bin/env bash
# One-call GPU verification: build, all tests, all benchmarks, results file (benchmarks/gpu_suite.py).
#   bash benchmarks/run_gpu_suite.sh [--quick] [--dry-run] [--out DIR] [--wheels DIR] [--build jit|pip]
#                                    [--phases a,b,...] [--budget S] [--keep-work]
# --out DIR ends with 4 files: <date>-<gpu>.json, .md, .png and -raw.tar.gz (the logs).
# Python: $PYTHON, else the active virtualenv's, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-}"
if [ -z "$py" ] && [ -n "${VIRTUAL_ENV:-}" ]; then py="$VIRTUAL_ENV/bin/python"; fi
exec "${py:-python3}" -u benchmarks/gpu_suite.py "$@"
