#!/usr/bin/env bash
# Side-by-side CPU comparison, alternating JAX (and its ONNX export on ONNX Runtime) and
# PyTorch for ROUNDS rounds.
#   TORCH_PYTHON=/path/to/torch-venv/bin/python bash benchmarks/compare_cpu.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
for round in $(seq "$rounds"); do
  python benchmarks/speed.py --device cpu --batch 8 --sizes 128,256 --steps 5 --backends jax,onnx
  "${TORCH_PYTHON:-python}" ../shared/bench/torch_resunet.py --device cpu --batch 8 \
      --sizes 128,256 --steps 5
done
