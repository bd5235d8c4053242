#!/usr/bin/env bash
# The GPU check (GUIDE §4), one prepared call on the GPU machine:
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-out)
# prints nvidia-smi and versions, installs the project (the machine is offline and already has torch,
# triton and pytest), runs the test suite on CUDA (compiled kernels against the references), measures
# the device's ceilings and runs the GPU benchmark preset, writing everything under OUT_DIR. Each part
# is time-boxed so the whole script ends within 6 minutes and a second run fits in a 15-minute lease.
# Commit OUT_DIR/<device>_<date>.json (and its PNGs) under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or fails); run it on the GPU machine" >&2
  exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False)" >&2
  exit 2
fi

start=$SECONDS
nvidia-smi | tee "$out/nvidia-smi.txt"
python -c "import torch, triton, numpy, sys; print(f'python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__} numpy {numpy.__version__} device {torch.cuda.get_device_name()}')" | tee "$out/versions.txt"

pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { echo "gpu_check: install failed, see $out/install.log" >&2; exit 1; }

echo "== tests on CUDA (time box 200 s)"
timeout 200 python -m pytest -q -p no:cacheprovider tests --junitxml "$out/tests.xml" -o junit_family=xunit2 >"$out/tests.txt" 2>&1
tests_rc=$?
tail -n 40 "$out/tests.txt"

echo "== benchmarks, full preset (time box ${FASTSSL_GPU_BENCH_SECONDS:-150} s; rows are saved as they come)"
timeout "${FASTSSL_GPU_BENCH_SECONDS:-150}" fastssl bench --out "$out" --quiet ${FASTSSL_GPU_BENCH_ONLY:+--only $FASTSSL_GPU_BENCH_ONLY} 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $((SECONDS - start)) s; results in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
