#!/usr/bin/env bash
# The GPU acceptance check, one command: `bash tools/gpu_check.sh` on a machine with one or more
# CUDA GPUs (and Transformer Engine, e.g. an NGC PyTorch container installed with
# tools/install.sh). Runs tests/gpu (marked `gpu`; skipped with the reason on CPU machines) and
# prints the GPUs, the software stack and the figures measured ([gpu] lines). Extra arguments go
# to pytest (e.g. -k fp8).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${NTP_PYTHON:-$root/.venv/bin/python}"
cd "$root"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
source "$root/tools/install.sh"  # functions only
describe_gpu_stack "$python"
exec "$python" -m pytest tests/gpu -m gpu -v -rs -p no:cacheprovider "$@"
