#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${RALM_VENV:-$ROOT/.venv}"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
"$VENV/bin/ruff" check ralm tests bench jobs
exec "$VENV/bin/python" -m pytest "$@"
