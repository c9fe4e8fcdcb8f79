#!/usr/bin/env bash
# One call on an accelerator machine: the B/16 SigLIP bf16 train step (each attention
# implementation), the loss kernels at the largest global batch that fits, and the 224 px data
# pipeline (benchmarks/device.py says what each measures). Writes device.md to paste into
# BENCHMARKS.md. Budget: 5 minutes (a `timeout` ends it at 290 s).
#
#   bash benchmarks/device.sh [device.py options, e.g. --batches 256,512 --out FILE]
#   bash benchmarks/device.sh --fetch-wheels DIR [PYTHON_VERSION]   # here, for a machine offline
#
# The machine's own jax (and its CUDA or TPU plugin) is used as it is: nothing here installs or
# upgrades jax. What jaxret needs beyond it and the machine lacks is installed, without its
# dependencies, into a folder of its own put first on PYTHONPATH: from the wheels in
# $JAXRET_WHEELS (default: .whl in the repository) when that folder exists, else from the
# package index at the versions in constraints.txt. For a machine with no network, fetch the
# wheels beforehand on one with it (`--fetch-wheels .whl 3.12`) and carry the folder along.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
# Import name -> distribution, for what jaxret imports that accelerator images often lack.
NEEDS="grain:grain array_record:array-record ml_collections:ml-collections ftfy:ftfy
wcwidth:wcwidth portpicker:portpicker yaml:pyyaml msgpack:msgpack tokenizers:tokenizers
etils:etils flax:flax optax:optax orbax.checkpoint:orbax-checkpoint PIL:pillow
cloudpickle:cloudpickle absl:absl-py humanize:humanize tensorstore:tensorstore"

pin() {  # the constraints.txt version of a distribution, or nothing
  sed -n "s/^$1==\(.*\)/\1/p" "$ROOT/constraints.txt" | head -1
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  dir="${2:?--fetch-wheels needs a folder}"; pyver="${3:-3.12}"
  mkdir -p "$dir"
  for entry in $NEEDS; do
    dist="${entry#*:}"; v="$(pin "$dist")"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$dir" "$dist${v:+==$v}" \
      || echo "device.sh: no wheel of $dist${v:+==$v} for Python $pyver; the machine must have it"
  done
  echo "wheels for Python $pyver in $dir: carry it with the repository"
  exit 0
fi

"$PY" -c "import jax" 2>/dev/null || {
  echo "device.sh: $PY has no jax; install the machine's jax with its accelerator plugin first"
  exit 2
}
SITE="${JAXRET_SITE:-/tmp/jaxret-site}"
WHEELS="${JAXRET_WHEELS:-$ROOT/.whl}"
mkdir -p "$SITE"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for entry in $NEEDS; do
  module="${entry%%:*}"; dist="${entry#*:}"
  "$PY" -c "import $module" 2>/dev/null || missing+=("$dist")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "device.sh: installing ${missing[*]} into $SITE (no dependencies; jax untouched)"
  if [ -d "$WHEELS" ]; then
    files=()
    for dist in "${missing[@]}"; do
      stem="$(echo "$dist" | tr '-' '_')"
      found="$(ls "$WHEELS"/"$stem"-*.whl "$WHEELS"/"$dist"-*.whl 2>/dev/null | head -1 || true)"
      [ -n "$found" ] || { echo "device.sh: no wheel of $dist in $WHEELS; fetch it with --fetch-wheels"; exit 2; }
      files+=("$found")
    done
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${files[@]}"
  else
    specs=()
    for dist in "${missing[@]}"; do v="$(pin "$dist")"; specs+=("$dist${v:+==$v}"); done
    "$PY" -m pip install --quiet --no-deps --target "$SITE" "${specs[@]}"
  fi
fi
cd "$ROOT"
exec timeout 290 "$PY" benchmarks/device.py "$@"
