#!/usr/bin/env bash
# Install megatron-ntp and its dependencies into .venv at the repository root.
# Creates the virtual environment if it is missing and reuses it if present; safe to rerun.
#
# Two ways, chosen by the base interpreter ($PYTHON, default python3):
# - CPU (its torch is absent or has no CUDA): torch 2.13.0 CPU build and the exact versions of
#   tools/constraints-cpu.txt. megatron-core 0.19.2 declares Python >= 3.12 but its code runs on
#   3.11, so it is installed with --ignore-requires-python and its undeclared needs are listed
#   explicitly.
# - GPU container (its torch is a CUDA build, e.g. an NGC PyTorch container): the venv is made
#   with --system-site-packages so it sees the container's torch, Transformer Engine and Apex,
#   and nothing installed here may replace them (the container's torch version is passed to pip
#   as a constraint). See slurm/README.md, "On a GPU cluster".
#   NGC images (25.03 and newer) set PIP_CONSTRAINT to a file pinning the image's own packages
#   (packaging 23.2, where megatron-core needs >= 24.2); it is cleared for these pip calls, as
#   Megatron-LM's Dockerfiles do, and the container's torch is kept by a constraint of our own.
# NTP_INSTALL=cpu|gpu forces one way.
set -euo pipefail

MEGATRON_CORE="megatron-core==0.19.2"

# The CUDA version of `$1`'s torch ("" when torch is missing or a CPU build).
cuda_torch_of() {
  "$1" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true
}

# "gpu" when the base interpreter has a CUDA torch, "cpu" otherwise; NTP_INSTALL overrides.
install_kind() {
  case "${NTP_INSTALL:-auto}" in
    cpu|gpu) echo "$NTP_INSTALL"; return ;;
    auto) ;;
    *) echo "install.sh: NTP_INSTALL=${NTP_INSTALL} must be cpu, gpu or auto" >&2; return 2 ;;
  esac
  if [ -n "$(cuda_torch_of "$1")" ]; then echo gpu; else echo cpu; fi
}

# The GPU stack of interpreter `$1`, one line: torch, visible GPUs, Transformer Engine, Apex,
# megatron-core (also printed by tools/gpu_check.sh).
describe_gpu_stack() {
  "$1" - <<'EOF'
import importlib.metadata as md
import torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs), "
      f"transformer-engine {version('transformer_engine')}, apex {version('apex')}, "
      f"megatron-core {version('megatron-core')}")
EOF
}

# pip prints a warning for every configured package location that does not exist on this machine
# (a site-wide pip.conf's find-links or index folder, say); they are harmless, so their lines are
# dropped. Everything else pip prints is kept, and pip's exit status is returned.
run_pip() {
  local status=0
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } || status=$?
  return "$status"
}

# A venv made without --system-site-packages cannot see the container's packages.
venv_sees_system_packages() {
  grep -qs '^include-system-site-packages = true' "$1/pyvenv.cfg"
}

install_cpu() {
  local root=$1; shift
  local pip=("$@") constraints="$root/tools/constraints-cpu.txt"
  echo "[install] torch (pinned CPU build) and numpy"
  "${pip[@]}" install -c "$constraints" torch "numpy<3"
  echo "[install] megatron-core 0.19.2 and its undeclared needs"
  "${pip[@]}" install --no-deps --ignore-requires-python "$MEGATRON_CORE"
  "${pip[@]}" install --no-deps -c "$constraints" triton
  "${pip[@]}" install "packaging>=24.2" psutil einops
  echo "[install] megatron-ntp (editable) with its test and tool dependencies"
  "${pip[@]}" install -c "$constraints" -e "$root[dev]"
}

# In a container: pip is run without the image's PIP_CONSTRAINT (see the top of this file).
drop_container_constraint() {
  if [ -n "${PIP_CONSTRAINT:-}" ]; then
    echo "[install] not using the container's PIP_CONSTRAINT=$PIP_CONSTRAINT (it pins the" \
         "image's packages); the container's torch is kept by tools/install.sh's own constraint"
    unset PIP_CONSTRAINT
  fi
}

install_gpu() {
  local root=$1 venv=$2; shift 2
  local pip=("$@") keep
  echo "[install] GPU stack of the base interpreter: $(describe_gpu_stack "$venv/bin/python")"
  # The container's torch stays: pip may not replace it while resolving anything below.
  keep="$venv/.megatron_ntp_keep_torch.txt"
  "$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$keep"
  echo "[install] megatron-core 0.19.2 (its needs come from the container)"
  "${pip[@]}" install --no-deps --ignore-requires-python "$MEGATRON_CORE"
  "${pip[@]}" install -c "$keep" "packaging>=24.2" psutil einops
  echo "[install] megatron-ntp (editable) with its test and tool dependencies"
  "${pip[@]}" install -c "$keep" -e "$root[dev]"
}

main() {
  local root venv python kind pip stamp want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv"
  python="${PYTHON:-python3}"
  kind=$(install_kind "$python")

  if [ ! -x "$venv/bin/python" ]; then
    echo "[install] creating $venv ($kind)"
    if [ "$kind" = gpu ]; then
      "$python" -m venv --system-site-packages "$venv"
    else
      "$python" -m venv "$venv"
    fi
  elif [ "$kind" = gpu ] && ! venv_sees_system_packages "$venv"; then
    echo "install.sh: $venv exists without --system-site-packages, so it cannot see the" \
         "container's torch / Transformer Engine / Apex; remove it and rerun" >&2
    exit 2
  fi
  pip=(run_pip "$venv/bin/python" -m pip --disable-pip-version-check -q)

  stamp="$venv/.megatron_ntp_install_stamp"
  want="$(cat "$root/tools/install.sh" "$root/setup.py" "$root/tools/constraints-cpu.txt" \
          | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[install] $venv is up to date"
  else
    if [ "$kind" = gpu ]; then
      drop_container_constraint
      install_gpu "$root" "$venv" "${pip[@]}"
    else
      install_cpu "$root" "${pip[@]}"
    fi
    echo "$want" > "$stamp"
    echo "[install] done: $venv"
  fi
  if [ "$kind" = cpu ]; then
    build_cpu_kernels "$venv/bin/python"
  fi
}

# The shaped loss's CPU kernels (megatron_ntp/loss/cpu_kernels.py), built now rather than in
# the first training step: once per source and compiler, a load of about a second afterwards.
build_cpu_kernels() {
  "$1" -c 'from megatron_ntp.loss import cpu_kernels; cpu_kernels.build()'
}

# Sourcing this file (tests/slurm/test_install_script.py) defines the functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
