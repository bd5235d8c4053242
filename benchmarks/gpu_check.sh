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

# The full preset has ~300 cases (compile providers compile per shape): each slice gets its own time box
# and its own result file, so one slow slice cannot starve the others; rows are saved as they come.
bench_rc=0
for group in "nt_xent clip_loss moco_loss" "ddpm_step_cfg ddpm_step ddim_step q_sample cfg_combine" "color_propagate propagate_labels"; do
  name=${group%% *}
  echo "== benchmarks, full preset: $group (time box ${FASTSSL_GPU_BENCH_SECONDS:-50} s)"
  timeout "${FASTSSL_GPU_BENCH_SECONDS:-50}" fastssl bench --out "$out/bench-$name" --quiet --only $group 2>&1 | tee "$out/bench-$name.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || bench_rc=$rc
done

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $((SECONDS - start)) s; results in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
