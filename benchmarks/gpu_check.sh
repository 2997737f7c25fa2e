#!/usr/bin/env bash
# The CUDA check of the block kernel (exactness against SDPA in fp32 and bf16, the Λ speed-up
# at 32k and 128k), for a machine with an NVIDIA GPU. At most about 5 minutes. CI never runs it.
#   benchmarks/gpu_check.sh [--out FILE.json] [--lengths 32768,131072]
# Needs a CUDA build of torch in the environment it runs in (PYTHON, default python3) and
# this checkout importable (run from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 300 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
