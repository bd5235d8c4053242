#!/usr/bin/env bash
# Fetch, on a machine with the package registry, the wheels of the peers the GPU machine lacks, into .whl/
# (git-ignored), for the device call to carry (`carry: [".whl"]`); benchmarks/gpu_check.sh installs them.
# diffusers (the DDPM step's reference) with importlib_metadata, inf_cl (the CLIP target's), and
# pytorch-metric-learning: pure-Python wheels for the GPU machine's Python 3.12 (about 7 MB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==8.7.0 inf_cl==1.2.1 pytorch-metric-learning==2.9.0
ls -l .whl
