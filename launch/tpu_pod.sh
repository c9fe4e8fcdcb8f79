#!/usr/bin/env bash
# Run jaxret on every worker of a Cloud TPU VM slice: create the slice (or reuse a READY one),
# install jaxret on all workers, then start the same command on all of them, detached from the
# ssh session. With --watch (or WATCH=1) the script stays: when a spot slice is preempted it
# recreates it, reinstalls and restarts the command, which resumes from the workdir's last
# checkpoint.
#
#   REPO=https://example.com/you/jaxret.git DATA_BUCKET=BUCKET \
#   launch/tpu_pod.sh my-slice us-central2-b v4-32 -- \
#       train --config configs/siglip_b16.py --workdir gs://BUCKET/siglip_b16 \
#       --config.data.dir=/mnt/data/records
#   # a spot v5e slice that is brought back after preemptions, data read through gcsfuse:
#   REPO=https://example.com/you/jaxret.git SPOT=1 DATA_BUCKET=BUCKET MOUNT=/mnt/data \
#   launch/tpu_pod.sh --watch my-slice us-west4-a v5litepod-16 -- \
#       train --config configs/siglip_b16.py --workdir gs://BUCKET/siglip_b16 \
#       --config.data.dir=/mnt/data/records
#
# The slice: an existing one is reused when its state is READY, waited for while CREATING
# (STARTING, RESTARTING, REPAIRING), and deleted and recreated when PREEMPTED or TERMINATED.
# The image follows the accelerator type: v4-* tpu-ubuntu2204-base, v5litepod-* (v5e)
# v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e; VERSION overrides it (and
# is needed for any other type).
#
# The install, on every worker: the images ship Python 3.10 and jaxret needs >= 3.11, so it
# installs uv (astral.sh's installer, into ~/.local/bin; no apt, no sudo), which fetches a
# standalone CPython 3.11 for ~/jaxret/.venv; then `pip install -c constraints.txt -e '.[tpu]'`
# from a clone of REPO at REF. With DATA_BUCKET it installs gcsfuse (Google's apt repository) and
# mounts the bucket with `gcsfuse --implicit-dirs DATA_BUCKET MOUNT` before the run.
#
# The run: `jaxret ARGS --distributed` under nohup and setsid, so it outlives the ssh session.
# Each worker appends its output to its own ~/jaxret-logs/RUN.log and, when jaxret ends, writes
# its exit status to ~/jaxret-logs/RUN.status (143: saved after a preemption notice, resumable).
# The script prints the command that follows the logs. A recreated slice has new disks: keep
# the workdir in gs:// (or under the gcsfuse mount) so a restart resumes.
#
# --watch: every POLL seconds it reads the slice's state and the workers' statuses. All 0: done
# (exit 0). Any other status but 143: failed (exit with it). Preempted slice, or every worker
# stopped with 143 or without a status: restart (recreating the slice if needed), at most
# MAX_RESTARTS times.
#
# Environment: REPO (git URL of jaxret, required), REF (branch/tag/commit, default main),
# PROJECT (gcloud project), VERSION (TPU VM image), SPOT=1 (create as a spot slice), WATCH=1,
# POLL (seconds, default 60), MAX_RESTARTS (default 10), DATA_BUCKET and MOUNT (default
# /mnt/data), RUN (log name, default NAME-YYYYmmdd-HHMMSS).
set -euo pipefail

usage() {
  echo "usage: $0 [--watch] NAME ZONE ACCELERATOR_TYPE -- JAXRET_ARGS..." >&2
  exit 2
}
watch=${WATCH:-0}
if [ "${1:-}" = --watch ]; then watch=1; shift; fi
[ $# -ge 4 ] || usage
name=$1 zone=$2 accelerator=$3
shift 3
[ "$1" = "--" ] && shift
[ $# -gt 0 ] || usage
: "${REPO:?set REPO to the git URL of jaxret}"
REF=${REF:-main}
POLL=${POLL:-60}
MAX_RESTARTS=${MAX_RESTARTS:-10}
MOUNT=${MOUNT:-/mnt/data}
run=${RUN:-$name-$(date -u +%Y%m%d-%H%M%S)}
if ! [[ $run =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "error: RUN=$run: use letters, digits, '.', '_' and '-' only" >&2; exit 2
fi
project=(${PROJECT:+--project "$PROJECT"})

if [ -n "${VERSION:-}" ]; then
  version=$VERSION
else
  case "$accelerator" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "error: no TPU VM image known for accelerator type '$accelerator' (known: v4-N," \
            "v5litepod-N, v5p-N, v6e-N); set VERSION to its software version" >&2
       exit 2 ;;
  esac
fi

# ---- the slice -------------------------------------------------------------------------------
slice_state() {  # READY, CREATING, PREEMPTED, ...; empty when there is no such slice
  gcloud compute tpus tpu-vm describe "$name" --zone "$zone" "${project[@]}" \
    --format='value(state)' 2>/dev/null || true
}

create_slice() {
  echo "creating TPU VM slice $name ($accelerator, $version${SPOT:+, spot}) in $zone"
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accelerator" \
    --version "$version" "${project[@]}" ${SPOT:+--spot}
}

ensure_ready() {  # a READY slice; (re)create it when missing, preempted or terminated
  local state tries=0 created=0
  while :; do
    state=$(slice_state)
    case "$state" in
      READY) return 0 ;;
      CREATING|STARTING|RESTARTING|REPAIRING)
        echo "slice $name is $state: waiting for READY" ;;
      ""|PREEMPTED|TERMINATED)
        if [ "$created" = 1 ]; then
          echo "error: slice $name is ${state:-missing} right after its creation" >&2; exit 1
        fi
        if [ -n "$state" ]; then
          echo "slice $name is $state: deleting it to create it again"
          gcloud compute tpus tpu-vm delete "$name" --zone "$zone" "${project[@]}" --quiet
        fi
        create_slice
        created=1
        continue ;;
      *) echo "error: slice $name is $state; start it, or delete it to have it recreated" >&2
         exit 1 ;;
    esac
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then
      echo "error: slice $name is still $state after 60 checks" >&2; exit 1
    fi
    sleep "$POLL"
  done
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all \
    --command "$1"
}

# ---- the workers ------------------------------------------------------------------------------
install() {
  echo "installing jaxret ($REF) with Python 3.11 on all workers of $name"
  on_all_workers "set -e
    export PATH=\$HOME/.local/bin:\$PATH
    command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
    [ -d jaxret ] || git clone -q $(printf '%q' "$REPO") jaxret
    cd jaxret && git fetch -q origin && git checkout -q $(printf '%q' "$REF") && (git pull -q || true)
    .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
      { rm -rf .venv && uv venv -q --seed --python 3.11 .venv; }
    .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
}

mount_bucket() {
  local bucket mnt
  bucket=$(printf '%q' "$DATA_BUCKET") mnt=$(printf '%q' "$MOUNT")
  echo "mounting gs://$DATA_BUCKET at $MOUNT on all workers (gcsfuse)"
  on_all_workers "set -e
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" |
        sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
        sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get -q update && sudo apt-get -q -y -o DPkg::Lock::Timeout=600 install gcsfuse
    fi
    sudo mkdir -p $mnt && sudo chown \"\$USER\" $mnt
    mountpoint -q $mnt || gcsfuse --implicit-dirs $bucket $mnt"
}

setup_workers() {
  install
  if [ -n "${DATA_BUCKET:-}" ]; then mount_bucket; fi
}

logs='$HOME/jaxret-logs'
start_job() {
  local job inner
  job=$(printf '%q ' .venv/bin/jaxret "$@" --distributed)
  inner="echo \$\$ > $logs/jaxret.pid; $job>> $logs/$run.log 2>&1 < /dev/null; echo \$? > $logs/$run.status"
  echo "starting on all workers of $name: jaxret $* --distributed"
  on_all_workers "set -e
    cd jaxret && mkdir -p $logs
    if [ -f $logs/jaxret.pid ] && kill -0 \"\$(cat $logs/jaxret.pid)\" 2>/dev/null; then
      echo \"jaxret is already running on \$(hostname) (pid \$(cat $logs/jaxret.pid))\" >&2; exit 1
    fi
    rm -f $logs/$run.status
    nohup setsid bash -c $(printf '%q' "$inner") > /dev/null 2>&1 < /dev/null &"
}

job_states() {  # one word per worker: jaxret's exit status, running, or lost (ended, no status)
  on_all_workers "f=$logs/$run.status
    if [ -f \$f ]; then echo jaxret-status: \$(cat \$f)
    elif kill -0 \"\$(cat $logs/jaxret.pid 2>/dev/null)\" 2>/dev/null; then echo jaxret-status: running
    else echo jaxret-status: lost; fi" 2>/dev/null | sed -n 's/^jaxret-status: //p' || true
}

# ---- main ------------------------------------------------------------------------------------
if [ "$watch" = 1 ]; then
  workdir=""
  for ((i = 1; i < $#; i++)); do
    if [ "${!i}" = --workdir ]; then j=$((i + 1)); workdir=${!j}; fi
  done
  for a in "$@"; do
    case "$a" in --workdir=*) workdir=${a#--workdir=} ;; esac
  done
  case "$workdir" in
    ""|gs://*|"$MOUNT"/*) ;;
    *) echo "warning: --workdir '$workdir' is on the workers' disks, which a recreated slice" \
            "does not keep: a restart would start over; use gs://..." >&2 ;;
  esac
fi

ensure_ready
setup_workers
start_job "$@"
echo "jaxret runs detached on every worker of $name, each logging to ~/jaxret-logs/$run.log."
echo "Follow the logs with:"
echo "  gcloud compute tpus tpu-vm ssh $name --zone $zone ${PROJECT:+--project $PROJECT }--worker=all --command 'tail -f ~/jaxret-logs/$run.log'"
[ "$watch" = 1 ] || exit 0

echo "watching $name every ${POLL}s (at most $MAX_RESTARTS restarts)"
restarts=0
restart() {
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
    echo "error: $1, and the job was restarted $MAX_RESTARTS times (MAX_RESTARTS): giving up" >&2
    exit 1
  fi
  echo "$1: restart $restarts of $MAX_RESTARTS (resumes from the last checkpoint)"
}
while :; do
  sleep "$POLL"
  state=$(slice_state)
  case "$state" in
    READY) ;;
    ""|PREEMPTED|TERMINATED)
      restart "slice $name is ${state:-gone}"
      ensure_ready
      setup_workers
      start_job "$@"
      continue ;;
    *) echo "slice $name is $state"; continue ;;
  esac
  states=$(job_states)
  [ -n "$states" ] || continue  # the workers did not answer: look again
  failed=$(grep -v -x -E '0|143|running|lost' <<< "$states" | head -n 1 || true)
  if [ -n "$failed" ]; then
    echo "error: jaxret failed with status $failed on $name; see ~/jaxret-logs/$run.log" >&2
    [[ $failed =~ ^[0-9]+$ ]] && exit "$failed"
    exit 1
  fi
  if ! grep -q -v -x 0 <<< "$states"; then
    echo "jaxret finished on every worker of $name"
    exit 0
  fi
  grep -q -x running <<< "$states" && continue
  restart "jaxret stopped on $name (status 143 or no status: saved after a preemption notice)"
  start_job "$@"
done
