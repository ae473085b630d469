#!/usr/bin/env bash
# N training processes on this machine, as a stand-in for N hosts: CPU devices, gloo collectives,
# a coordinator on a free localhost port. Waits for all; if one fails or TIMEOUT passes, stops the
# others and exits non-zero (the failed process's status, or 124 on timeout).
#
#   CONFIG=configs/tiny.py NUM_PROCESSES=2 launch/local.sh [--config.train.steps=20 ...]
#
# Arguments are passed on to grc_jax.train. DRY_RUN=1 prints the commands instead of running them.
set -uo pipefail  # no -e: the exit statuses of the processes are handled below

DRY_RUN=${DRY_RUN:-0}
die() { echo "local.sh: $*" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -n ${CONFIG:-} ]] || die "CONFIG is not set: the config file to train, e.g. CONFIG=configs/tiny.py launch/local.sh"
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
TIMEOUT=${TIMEOUT:-3600}
KILL_GRACE=${KILL_GRACE:-10}
for v in NUM_PROCESSES DEVICES_PER_PROCESS TIMEOUT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python; command -v python >/dev/null || PYTHON=python3
fi
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)}
if [[ -z ${PORT:-} ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || die "could not pick a free port with $PYTHON (set PORT)"
fi

# CPU even on a machine with accelerators: N processes must not all claim the same GPUs or TPU.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
export PYTHONUNBUFFERED=1

echo "local.sh: $NUM_PROCESSES process(es) x $DEVICES_PER_PROCESS CPU device(s); coordinator 127.0.0.1:$PORT;" \
     "config $CONFIG; workdir $WORKDIR; timeout ${TIMEOUT}s"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=("$PYTHON" -m grc_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" "--coordinator_address=127.0.0.1:$PORT"
       "--num_processes=$NUM_PROCESSES" "--process_id=$i" ${1+"$@"})
  show env "JAX_PLATFORMS=$JAX_PLATFORMS" "JAX_CPU_COLLECTIVES_IMPLEMENTATION=$JAX_CPU_COLLECTIVES_IMPLEMENTATION" \
    "XLA_FLAGS=$XLA_FLAGS" "${cmd[@]}"  # the exports above, so the printed line runs as this one does
  [[ $DRY_RUN == 1 ]] && continue
  # $! is the process itself, not the line-prefixing awk, so it can be signalled and waited for.
  "${cmd[@]}" > >(awk -v p="[$i] " '{ print p $0; fflush() }') 2>&1 &
  pids+=($!)
done
[[ $DRY_RUN == 1 ]] && exit 0

stop_all() {
  local pid alive deadline=$(( SECONDS + KILL_GRACE ))
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  # A process blocked in a collective waiting for a dead peer never reaches its SIGTERM handler.
  while (( SECONDS < deadline )); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

start=$SECONDS
remaining=$NUM_PROCESSES
finished=()
while (( remaining > 0 )); do
  for i in "${!pids[@]}"; do
    [[ -n ${finished[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue  # bash reaps its children, so a dead one fails this
    wait "${pids[$i]}"; rc=$?
    finished[$i]=$rc
    (( remaining-- ))
    if (( rc != 0 )); then
      echo "local.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
      exit "$rc"
    fi
  done
  if (( remaining > 0 && SECONDS - start > TIMEOUT )); then  # ">": $SECONDS ticks whole seconds
    echo "local.sh: still running after ${TIMEOUT}s (TIMEOUT); stopping all processes" >&2
    stop_all
    exit 124
  fi
  (( remaining > 0 )) && sleep 0.5
done
echo "local.sh: all $NUM_PROCESSES processes finished; results in $WORKDIR"
