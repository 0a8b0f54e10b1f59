#!/usr/bin/env bash
# The GPU check, from a fresh copy of the repository, in under 8 minutes on one GPU:
# the GPU tests (tests/test_gpu.py, marked `gpu`) and the GPU benchmarks (benchmarks/gpu_bench.py).
#
#   bash benchmarks/gpu_check.sh                                  # creates .venv-gpu if missing
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh           # reuse a python that has a CUDA torch
#   OUT=/tmp/gpu-results bash benchmarks/gpu_check.sh             # results folder (default benchmarks/gpu_results/)
#   BENCH_ARGS="--reps 1" bash benchmarks/gpu_check.sh            # extra arguments for gpu_bench.py
#
# A machine with a CUDA build of torch already installed can pass PYTHON=/path/to/that/python to
# reuse it: no virtual environment is created and torch is not installed again (the project is
# installed into that python with `pip install -e ".[test]"`).
# Without a GPU (torch.cuda.is_available() is False) it says so and exits 0 before installing the
# project. The benchmark runs even when tests fail; the exit status is then the tests'.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/gpu_results}"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
    echo "using PYTHON=$PY (no virtual environment)"
else
    PY3="$(command -v python3 || true)"
    if [[ -z "$PY3" ]]; then
        echo "python3 not found: install Python 3.9+ or pass PYTHON=/path/to/python" >&2
        exit 1
    fi
    if [[ ! -x "$ROOT/.venv-gpu/bin/python" ]]; then
        echo "creating $ROOT/.venv-gpu with $PY3"
        "$PY3" -m venv "$ROOT/.venv-gpu"
    fi
    PY="$ROOT/.venv-gpu/bin/python"
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "torch is not installed for $PY: pip install torch (the default index ships CUDA builds for Linux)"
    "$PY" -m pip install torch
fi

if [[ "$("$PY" -c "import torch; print(torch.cuda.is_available())")" != "True" ]]; then
    echo "no GPU present (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi

echo "installing the project: pip install -e \".[test]\""
if ! "$PY" -m pip install -q -e ".[test]"; then
    # An offline machine whose python already has the dependencies: install the project alone.
    echo "pip install -e \".[test]\" failed; trying pip install --no-deps --no-build-isolation -e ." >&2
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || true
fi
if ! "$PY" -c "import runner, hydra, omegaconf, pytest" 2>/dev/null; then
    echo "the project or its test dependencies cannot be imported with $PY; install them (pip install -e \".[test]\")" >&2
    exit 1
fi

echo
echo "== GPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
else
    echo "(nvidia-smi not found)"
fi
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s) visible, device 0: {torch.cuda.get_device_name(0)}')"

mkdir -p "$OUT"
echo
echo "== tests: python -m pytest -q -m gpu tests/test_gpu.py -rs"
set +e
"$PY" -m pytest -q -m gpu tests/test_gpu.py -rs 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

echo
echo "== benchmarks: python benchmarks/gpu_bench.py --out $OUT/gpu_results.md ${BENCH_ARGS:-}"
set +e
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
"$PY" benchmarks/gpu_bench.py --out "$OUT/gpu_results.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e

echo
echo "results in $OUT: tests.log (exit $tests_rc), gpu_results.md and bench.log (exit $bench_rc)"
if [[ $tests_rc -ne 0 ]]; then
    echo "the GPU tests failed (exit $tests_rc)" >&2
    exit "$tests_rc"
fi
exit "$bench_rc"
