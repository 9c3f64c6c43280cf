#!/usr/bin/env bash
# The test command: installs what it needs into .venv (see tools/install.sh), then runs pytest.
#   bash tools/test.sh                   the main suite, then the oldest-stack lane (what CI runs)
#   bash tools/test.sh ARGS...           pytest ARGS in .venv only (e.g. tests/loss -x)
#   bash tools/test.sh --oldest-stack    the oldest-stack lane alone (tools/oldest_stack.sh:
#                                        Python 3.12, torch 2.9, megatron-core 0.19.2); pytest
#                                        arguments may follow
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--oldest-stack" ]; then
  shift
  exec bash "$root/tools/oldest_stack.sh" "$@"
fi
bash "$root/tools/install.sh"
cd "$root"
if [ $# -gt 0 ]; then
  exec "$root/.venv/bin/python" -m pytest "$@"
fi
echo "== the main suite (.venv: $("$root/.venv/bin/python" --version), torch" \
     "$("$root/.venv/bin/python" -c 'import torch; print(torch.__version__)'))"
"$root/.venv/bin/python" -m pytest
echo "== the oldest-stack lane"
exec bash "$root/tools/oldest_stack.sh"
