#!/usr/bin/env bash
# Side-by-side CPU comparison, alternating this project (JAX, and its exported graph on
# ONNX Runtime and OpenVINO) and PyTorch fp32 and bf16 autocast, for ROUNDS rounds.
#   TORCH_PYTHON=/path/to/torch-venv/bin/python bash benchmarks/compare_cpu.sh [ROUNDS]
# SIZES (default 128,256) and BACKENDS (default jax,onnx,openvino) narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
sizes=${SIZES:-128,256}
grep -o -w -E 'amx_bf16|amx_int8|avx512_bf16|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u \
  | tr '\n' ' ' | sed 's/^/CPU features: /;s/$/\n/'
for round in $(seq "$rounds"); do
  python benchmarks/speed.py --device cpu --batch 8 --sizes "$sizes" --steps 5 \
      --backends "${BACKENDS:-jax,onnx,openvino}"
  for amp in "" --amp; do
    "${TORCH_PYTHON:-python}" ../shared/bench/torch_resunet.py --device cpu --batch 8 \
        --sizes "$sizes" --steps 5 $amp
  done
done
