#!/usr/bin/env bash
# The GPU check (tests/gpu/check.py): heads on the GPU in fp32 and bf16 against the CPU, the grid's step time at
# wav2vec2-base widths, one epoch of bf16 fine-tuning, the dump and `avb predict --device cuda`, in a few minutes.
# Needs the project installed with a CUDA build of torch (pip install -e '.[test]'). Writes OUT/summary.json
# (default ./gpu-check) and the logs of each step; exits 1 when a step failed.
#   bash tests/gpu/check.sh                  # everything on cuda
#   bash tests/gpu/check.sh --steps heads    # one step; --device cpu --quick is the dry run on any machine
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python -m tests.gpu.check --out "${OUT:-gpu-check}" "$@"
