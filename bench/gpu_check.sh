#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md, "The GPU check"): install the missing wheels, then
# bench/gpu_check.py builds the .pt2, runs pytest -m gpu and measures; results in --out.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run] [-- extra gpu_check.py args]
#
# --wheels DIR  what the GPU machine lacks: DIR/site.tar.xz made by bench/gpu_wheels.sh (or plain
#               *.whl files); default .whl; not needed with --dry-run
# --out DIR     results folder (default bench/results/<time>-<device>)
# --dry-run     the CPU paths with tiny sizes (CI); no GPU, no install
# --install-only  stop after installing --wheels and checking the imports
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS=""
OUT=""
DRY=0
INSTALL_ONLY=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:-}"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; shift ;;
    --out) OUT="${2:-}"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: bench/gpu_check.sh: unknown argument $1 (--wheels DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
# What the GPU machine lacks of pyproject's runtime dependencies (and the test clips' package), pinned.
PKGS="$(grep -v '^#' "$ROOT/bench/gpu_packages.txt" | xargs)"
DOWNLOAD="bash bench/gpu_wheels.sh (writes .whl/site.tar.xz: $PKGS for CPython 3.12 x86_64)"

if [ "$DRY" = 0 ]; then
  if ! { nvidia-smi -L >/dev/null 2>&1 || "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; }; then
    echo "error: no NVIDIA GPU here (nvidia-smi and torch.cuda find none): bench/gpu_check.sh measures the GPU path; --dry-run runs it on the CPU" >&2
    exit 1
  fi
  WHEELS="${WHEELS:-$ROOT/.whl}"
fi
if [ -n "$WHEELS" ]; then
  SITE="${TMPDIR:-/tmp}/streamdet-gpu-check-site"
  if [ -f "$WHEELS/site.tar.xz" ]; then
    echo "unpacking $WHEELS/site.tar.xz into $SITE"
    rm -rf "$SITE" && mkdir -p "$SITE"
    if ! tar -xJf "$WHEELS/site.tar.xz" -C "$SITE"; then
      echo "error: cannot unpack $WHEELS/site.tar.xz (see above); make it again with: $DOWNLOAD" >&2
      exit 1
    fi
  elif [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl; then
      echo "error: pip could not install the wheels in $WHEELS (see above); make them with: $DOWNLOAD" >&2
      exit 1
    fi
  else
    echo "error: wheel folder $WHEELS missing or empty: on a machine with network, in the repo root: $DOWNLOAD" >&2
    exit 1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! MISSING=$("$PY" -c '
import importlib.util as u
need = ["av", "zmq", "pydantic", "pydantic_settings", "msgpack", "onnx", "onnxruntime", "cv2", "torch", "yaml"]
print(" ".join(m for m in need if u.find_spec(m) is None))' 2>&1) || [ -n "$MISSING" ]; then
  echo "error: python modules missing: $MISSING; wheels for them: $DOWNLOAD" >&2
  exit 1
fi
if [ "$INSTALL_ONLY" = 1 ]; then
  echo "installed: every module the check needs imports"
  exit 0
fi
export PYTHONUNBUFFERED=1
ARGS=()
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
[ -n "$OUT" ] && ARGS+=(--out "$OUT")
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  "$PY" "$ROOT/bench/gpu_check.py" "${ARGS[@]}" "${EXTRA[@]}" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
exec "$PY" "$ROOT/bench/gpu_check.py" "${ARGS[@]}" "${EXTRA[@]}"
