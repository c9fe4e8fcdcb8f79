#!/usr/bin/env bash
# A multi-host job simulated on one machine: N jaxret processes on 127.0.0.1, each with D CPU
# devices, joined through jax.distributed. This is what the multi-host test runs.
#
#   launch/local_multihost.sh -n 2 -d 4 -- train --config configs/demo.py:softmax \
#       --workdir runs/multihost
#
# Process 0 prints to the terminal (progress, metrics, the eval table); process i > 0 writes
# to $LOGDIR/process_<i>.log (default: a new temporary directory, printed at the start).
# If any process fails, the others are stopped and the first failure's status is returned.
# JAXRET overrides the command (default: `jaxret`; e.g. JAXRET="python -m jaxret.cli").
set -euo pipefail

n=2 d=4 port=""
while getopts "n:d:p:" opt; do
  case "$opt" in
    n) n=$OPTARG ;; d) d=$OPTARG ;; p) port=$OPTARG ;;
    *) echo "usage: $0 [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- ARGS..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: $0 [-n N] [-d D] [-p PORT] -- train --config ... --workdir ..." >&2; exit 2; }

port=${port:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOGDIR=${LOGDIR:-$(mktemp -d)}
mkdir -p "$LOGDIR"
read -r -a cmd <<< "${JAXRET:-jaxret}"
echo "local multi-host: $n processes x $d CPU devices, coordinator 127.0.0.1:$port, logs in $LOGDIR"

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < n; i++)); do
  if [ "$i" -eq 0 ]; then out=/dev/stdout; else out="$LOGDIR/process_$i.log"; fi
  XLA_FLAGS="--xla_force_host_platform_device_count=$d" "${cmd[@]}" "$@" \
    --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" > "$out" 2>&1 &
  pids+=($!)
done
rc=0
for ((k = 0; k < n; k++)); do
  wait -n || { rc=$?; stop; break; }
done
wait || true
exit $rc
