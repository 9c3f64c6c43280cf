#!/usr/bin/env bash
# Install megatron-ntp and its pinned dependencies into .venv at the repository root.
# Creates the virtual environment if it is missing and reuses it if present; safe to rerun.
# CPU machines: torch 2.13.0 CPU build. megatron-core 0.19.2 declares Python >= 3.12 but its
# code runs on 3.11, so it is installed with --ignore-requires-python and its undeclared
# needs are listed explicitly (see ../shared/feasibility/FINDINGS.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

stamp="$venv/.megatron_ntp_install_stamp"
want="$(cat "$root/tools/install.sh" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] $venv is up to date"
  exit 0
fi

echo "[install] torch (pinned CPU build) and numpy"
"${pip[@]}" install "torch==2.13.0" "numpy<3"
echo "[install] megatron-core 0.19.2 and its undeclared needs"
"${pip[@]}" install --no-deps --ignore-requires-python "megatron-core==0.19.2"
"${pip[@]}" install --no-deps "triton==3.7.1"
"${pip[@]}" install "packaging>=24.2" psutil einops
echo "[install] megatron-ntp (editable) with its test and tool dependencies"
"${pip[@]}" install -e "$root[dev]"
echo "$want" > "$stamp"
echo "[install] done: $venv"
