#!/usr/bin/env bash
# The oldest-stack lane: a subset of the tests on the oldest supported software stack, on CPU.
#
#   bash tools/oldest_stack.sh [pytest arguments]    (also: bash tools/test.sh --oldest-stack)
#
# Builds (once) a second environment: Python 3.12 and the exact versions of
# tools/constraints-oldest.txt (PyPI's torch 2.9.0, a CUDA build of about 3 GB that runs on the
# CPU; megatron-core 0.19.2) with megatron-ntp's dependencies from setup.py, but not the project
# itself: the checkout is put on PYTHONPATH, so the environment serves every checkout. It lives
# outside the repository ($NTP_ENV_CACHE, default ~/.cache/megatron-ntp), named by a hash of its
# inputs (the build steps below, the constraints and setup.py), and is reused until one of them
# changes (an environment of an older hash is then removed). A build goes to a temporary folder first and is moved into
# place when complete, so an interrupted build is never used.
#
# Unless the pytest arguments name test files or folders, it runs LANE_TESTS: the default Slurm launcher path end to end
# (python -m megatron_ntp.jobs.launch torchrun, 2 ranks, TP 2), the loss package with the fused
# head, checkpoint save and resume, config and `plan`.
# Python 3.12: $NTP_OLDEST_PYTHON, else python3.12 on PATH, else pyenv's newest 3.12.
set -euo pipefail

LANE_TESTS=(
  tests/jobs/test_launch.py
  tests/loss
  tests/training/test_checkpoint.py
  tests/config
  tests/models/test_plan_cli.py
  tests/models/test_plan_gpu_settings.py
  tests/test_parallel.py
)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_python312() {
  local candidate
  for candidate in "${NTP_OLDEST_PYTHON:-}" "$(command -v python3.12 || true)" \
                   $(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 \
                       2>/dev/null | sort -V -r); do
    if [ -n "$candidate" ] && [ -x "$candidate" ] &&
       "$candidate" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "oldest_stack.sh: no Python 3.12 found (set NTP_OLDEST_PYTHON, put python3.12 on PATH," \
       "or install it with pyenv)" >&2
  return 2
}

# pip's notices about configured package locations missing on this machine are dropped.
quiet_pip() {
  local status=0
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } || status=$?
  return "$status"
}

build_env() {
  local python=$1 target=$2 partial="$2.partial" constraints="$root/tools/constraints-oldest.txt"
  rm -rf "$partial"
  echo "[oldest-stack] building $target with $("$python" --version) (torch download ~3 GB)"
  "$python" -m venv "$partial"
  local pip=(quiet_pip "$partial/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install -c "$constraints" torch "numpy<3"
  "${pip[@]}" install -c "$constraints" megatron-core psutil einops
  # the project's dependencies and test tools, then the project itself out: it comes from
  # PYTHONPATH, the checkout under test
  "${pip[@]}" install -c "$constraints" "$root[dev]"
  "${pip[@]}" uninstall -y megatron_ntp
  local old
  for old in "$(dirname "$target")"/oldest-stack-*; do
    [ "$old" != "$partial" ] && [ -e "$old" ] && rm -rf "$old"
  done
  mv "$partial" "$target"
}

main() {
  local cache="${NTP_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-ntp}" hash env python
  hash="$({ declare -f build_env quiet_pip; cat "$root/tools/constraints-oldest.txt" \
             "$root/setup.py"; } | sha256sum | cut -c1-12)"
  env="$cache/oldest-stack-$hash"
  mkdir -p "$cache"
  exec 9>"$cache/oldest-stack.lock"
  flock 9  # one build at a time; a second lane waits for it, then reuses it
  if [ -x "$env/bin/python" ]; then
    echo "[oldest-stack] reusing $env"
  else
    python="$(find_python312)"
    build_env "$python" "$env"
  fi
  flock -u 9
  "$env/bin/python" -c 'import sys, importlib.metadata as md; print(
      f"[oldest-stack] Python {sys.version.split()[0]}, torch {md.version("torch")},",
      f"megatron-core {md.version("megatron-core")}")'
  cd "$root"
  local arg named=0
  for arg in "$@"; do
    [ -e "${arg%%::*}" ] && named=1  # a test file or folder (tests/x.py::test_y too)
  done
  if [ "$named" = 0 ]; then
    set -- "$@" "${LANE_TESTS[@]}"
  fi
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$env/bin/python" -m pytest "$@"
}

main "$@"
