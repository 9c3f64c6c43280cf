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
"$python" - <<'PY'
import importlib.metadata as md
import torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPUs: {torch.cuda.device_count()}, "
      f"transformer-engine {version('transformer_engine')}, apex {version('apex')}, "
      f"megatron-core {version('megatron-core')}")
PY
exec "$python" -m pytest tests/gpu -m gpu -v -rs -p no:cacheprovider "$@"
