#!/usr/bin/env bash
# The GPU check for a machine with an NVIDIA GPU (and internet for the first setup):
# sets up kiln with onnxruntime-gpu in place of onnxruntime, compiles SmolLM2 and two
# fixtures for cuda with both backends, checks their greedy tokens against the references,
# and prints kiln bench figures. Exits non-zero on any mismatch. About 3-5 minutes warm.
#   bash scripts/device_check.sh [--arch sm90] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  echo "device_check: no NVIDIA GPU here (nvidia-smi is missing)" >&2; exit 2; }
[ -x .venv/bin/python ] || bash scripts/setup.sh
# CUDA through ONNX Runtime: the GPU wheel replaces the CPU one (the two conflict)
if ! .venv/bin/python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  .venv/bin/pip uninstall -q -y onnxruntime
  .venv/bin/pip install -q --disable-pip-version-check onnxruntime-gpu==1.31.1
fi
export TVM_BACKTRACE=1 PYTHONUNBUFFERED=1
exec timeout 480 .venv/bin/python scripts/device_check.py "$@"
