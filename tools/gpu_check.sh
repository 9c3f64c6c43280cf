#!/usr/bin/env bash
# The GPU acceptance check, one command, sized for a short loan of one H100:
#
#   bash tools/gpu_check.sh [--quick] [--tests-only | --bench-only] [--dry-run] [pytest args]
#
# on a machine with one or more CUDA GPUs and Transformer Engine (e.g. an NGC PyTorch container
# installed with tools/install.sh). Two parts, run in this order:
#   tests  tests/gpu (marked `gpu`): the loss's GPU path, Transformer Engine against the local
#          layers from the same weights, FP8, the fused head, MoE, save + resume ([gpu] lines)
#   bench  benchmarks/gpu_throughput.py: dense-1b at sequence 4096, bf16, TE: tokens/s and MFU
#          of megatron-core's cross-entropy head and of the shaped loss's two heads
# --quick runs the tests marked `quick` and 3 timed benchmark rounds: about 3.5 minutes on one
# H100, to finish within 5; the full check about 6 minutes (estimates, see tests/README.md,
# "GPU: the acceptance check"; each part's measured time is printed at the end). --dry-run
# prints what would run and exits. Extra arguments go to pytest (e.g. -k fp8). Without a CUDA
# GPU it stops before any work (exit status 2). Exit status: the first failing part's, else 0.
# NTP_PYTHON: the interpreter (default .venv/bin/python).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${NTP_PYTHON:-$root/.venv/bin/python}"

QUICK_MINUTES=3.5  # estimated on one H100; the budget of --quick is 5
FULL_MINUTES=6

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

fail_usage() {
  echo "gpu_check.sh: $1 (--help for the options)" >&2
  exit 2
}

mode=full parts="tests bench" dry_run=0 pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --dry-run) dry_run=1 ;;
    --tests-only|--bench-only)
      only=${1#--}; only=${only%-only}
      [ "$parts" != "tests bench" ] && [ "$parts" != "$only" ] &&
        fail_usage "--tests-only and --bench-only exclude each other"
      parts=$only ;;
    -h|--help) usage; exit 0 ;;
    *) pytest_args+=("$1") ;;
  esac
  shift
done
if [ "$parts" = bench ] && [ ${#pytest_args[@]} -gt 0 ]; then
  fail_usage "pytest arguments (${pytest_args[*]}) given with --bench-only"
fi

if [ "$mode" = quick ]; then
  minutes=$QUICK_MINUTES markers="gpu and quick" rounds=3
else
  minutes=$FULL_MINUTES markers="gpu" rounds=10
fi
tests_cmd=("$python" -m pytest tests/gpu -m "$markers" -v -rs -p no:cacheprovider
           ${pytest_args[@]+"${pytest_args[@]}"})
bench_cmd=("$python" benchmarks/gpu_throughput.py --warmup 2 --rounds "$rounds")
command_of() {  # the command of part $1 (tests or bench), into the array `cmd`
  if [ "$1" = tests ]; then cmd=("${tests_cmd[@]}"); else cmd=("${bench_cmd[@]}"); fi
}

echo "[gpu_check] $mode check ($parts): expected about $minutes minutes on one H100" \
     "(estimated, not yet measured on a GPU)"
if [ "$dry_run" = 1 ]; then
  for part in $parts; do
    command_of "$part"
    echo "[gpu_check] would run ($part): $(printf '%q ' "${cmd[@]}")"
  done
  exit 0
fi

cd "$root"
if [ ! -x "$python" ] && ! command -v "$python" > /dev/null; then
  echo "[gpu_check] no interpreter $python: run bash tools/install.sh first, or set NTP_PYTHON" >&2
  exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "[gpu_check] no CUDA GPU visible to $python (torch.cuda.is_available() is False):" \
       "nothing was run; this check needs a GPU machine (--dry-run shows what it runs)" >&2
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
source "$root/tools/install.sh"  # functions only
describe_gpu_stack "$python"

status=0 summary=""
for part in $parts; do
  command_of "$part"
  echo "[gpu_check] $part: $(printf '%q ' "${cmd[@]}")"
  start=$SECONDS
  if "${cmd[@]}"; then
    result=passed
  else
    code=$?
    result="failed (exit status $code)"
    [ "$status" = 0 ] && status=$code
  fi
  summary+="$part $result in $((SECONDS - start)) s; "
done
echo "[gpu_check] $mode check: ${summary}total $SECONDS s (expected about $minutes minutes)"
exit "$status"
