#!/usr/bin/env bash
# Create .venv/ with the pinned OpenMMLab stack and mmdynconv installed in editable mode.
#
# mmcv 2.1.0 ships only as source; its compiled ops (nms, RoIAlign, ...) are built once
# (about 15 minutes on 2 cores) and the wheel is cached in $MMDYNCONV_CACHE, so later
# set-ups (CI, other clones) install it in seconds. A set-up whose inputs have not changed
# since the last one is a no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CACHE="${MMDYNCONV_CACHE:-$HOME/.cache/mmdynconv}"
PYTHON="${PYTHON:-python3.11}"
MMCV_VERSION=2.1.0
STAMP="$VENV/.mmdynconv-setup"

fingerprint() {
  cat "$ROOT"/requirements/*.txt "$ROOT/setup.py" "${BASH_SOURCE[0]}" "$ROOT"/mmdynconv/ops/csrc/* \
    | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]]; then
  exit 0
fi

log() { echo "[setup_env] $*" >&2; }

[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

log "installing build tools and torch"
"${PIP[@]}" -r "$ROOT/requirements/build.txt"
"${PIP[@]}" -r <(grep -E '^(torch|torchvision|numpy)==' "$ROOT/requirements/runtime.txt")

build_mmcv_wheel() {
  local work
  work="$(mktemp -d)"
  log "building mmcv $MMCV_VERSION with compiled ops (about 15 minutes, once per machine)"
  "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
    --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$work"
  tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
  # torch >= 2.14 headers need C++20; mmcv 2.1.0's setup.py hard-codes C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV_VERSION/setup.py"
  (cd "$work/mmcv-$MMCV_VERSION" &&
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
      "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation . -w "$work/dist")
  mkdir -p "$CACHE"
  mv "$work"/dist/mmcv-"$MMCV_VERSION"-*.whl "$CACHE/"
  rm -rf "$work"
}

TORCH_TAG="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
MMCV_WHEEL_DIR="$CACHE/torch$TORCH_TAG"
if ! ls "$MMCV_WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
  CACHE="$MMCV_WHEEL_DIR" build_mmcv_wheel
fi
log "installing the cached mmcv wheel and the rest of the stack"
"${PIP[@]}" "$MMCV_WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl
"${PIP[@]}" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"
log "installing mmdynconv (compiles its CPU extension, about three minutes)"
"${PIP[@]}" --no-deps --no-build-isolation --use-pep517 -e "$ROOT"

"$VENV/bin/python" -c 'import mmcv.ops, mmdet, mmpretrain, mmdynconv.ops._cpu' \
  || { log "the installed stack does not import"; exit 1; }
fingerprint > "$STAMP"
log "done"
