#!/usr/bin/env bash
# The test command: installs what it needs into .venv (see tools/install.sh), then runs pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/install.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
