#!/usr/bin/env bash
# Run jaxret on every worker of a Cloud TPU VM slice: create the slice (or reuse it), install
# jaxret on all workers, then start the same command on all of them with --worker=all.
#
#   REPO=https://example.com/you/jaxret.git \
#   launch/tpu_pod.sh my-slice us-central2-b v4-32 -- \
#       train --config configs/siglip_b16.py --workdir gs://BUCKET/siglip_b16 \
#       --config.data.dir=gs://BUCKET/records
#
# Environment: REPO (git URL of jaxret, required), REF (branch/tag/commit, default main),
# PROJECT (gcloud project), VERSION (TPU VM image, default tpu-ubuntu2204-base),
# SPOT=1 (create as a spot slice). Workers find each other through jax.distributed
# (`--distributed`); every worker reads its own share of each global batch.
set -euo pipefail

if [ $# -lt 4 ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE -- JAXRET_ARGS..." >&2; exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 3
[ "$1" = "--" ] && shift
: "${REPO:?set REPO to the git URL of jaxret}"
project=(${PROJECT:+--project "$PROJECT"})

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" "${project[@]}" >/dev/null 2>&1; then
  echo "creating TPU VM slice $name ($accelerator) in $zone"
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accelerator" \
    --version "${VERSION:-tpu-ubuntu2204-base}" "${project[@]}" ${SPOT:+--spot}
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all \
    --command "$1"
}

echo "installing jaxret (${REF:-main}) on all workers of $name"
on_all_workers "set -e
  [ -d jaxret ] || git clone -q '$REPO' jaxret
  cd jaxret && git fetch -q origin && git checkout -q '${REF:-main}' && (git pull -q || true)
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"

echo "running on all workers: jaxret $*"
on_all_workers "cd jaxret && .venv/bin/jaxret $(printf '%q ' "$@") --distributed"
