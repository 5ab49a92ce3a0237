#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the whole demo pipeline on a local Ray, CPU only, offline.
# `bash scripts/demo.sh [extra ralm run args, e.g. --run-dir runs/mine train.epochs=2]`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${RALM_VENV:-$ROOT/.venv}"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec "$VENV/bin/ralm" run --config configs/demo.yaml "$@"
