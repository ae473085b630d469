#!/usr/bin/env bash
# Train on a Cloud TPU VM slice, or on several slices (multislice): create or reuse the TPU,
# copy the code to every worker, install it, and run `python3 -m grc_jax.train` on all workers.
#
#   TPU_NAME=grc-v5p ZONE=us-east5-a PROJECT=my-project CONFIG=configs/qwen3_0p6b.py \
#   ACCELERATOR_TYPE=v5p-32 WORKDIR=/mnt/shared/runs/qwen3 launch/tpu_pod.sh [--config.train.steps=1000 ...]
#
# Arguments are passed on to grc_jax.train. See launch/README.md for every variable.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DRY_RUN=${DRY_RUN:-0}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

source "$HERE/common.sh"
run() { show "$@"; [[ $DRY_RUN == 1 ]] || "$@"; }

hint() {
  case $1 in
    TPU_NAME) echo "the TPU VM to create or reuse (with NUM_SLICES>1, the prefix of the slices' names), e.g. TPU_NAME=grc-v5p" ;;
    ZONE) echo "the TPU's zone, e.g. ZONE=us-east5-a" ;;
    PROJECT) echo "the Google Cloud project, e.g. PROJECT=my-project" ;;
    CONFIG) echo "the config file to train, relative to the repository, e.g. CONFIG=configs/qwen3_0p6b.py" ;;
    ACCELERATOR_TYPE) echo "needed to create the TPU, e.g. ACCELERATOR_TYPE=v5p-32" ;;
    *) echo "see launch/README.md" ;;
  esac
}
require() {
  local v
  for v; do [[ -n ${!v:-} ]] || die "$v is not set: $(hint "$v")"; done
}

# ---------------------------------------------------------------------------------------------
# On a worker: `tpu_pod.sh --on-worker CMD...` appends this host's jax.distributed flags to CMD
# and runs it. The project's initialize_distributed only auto-detects TPUs from environment
# variables (GKE sets them, a TPU VM does not), so the flags are computed here from the same
# metadata that jax's own TPU detection reads: the slice's workers, this worker's number, and
# for multislice the MEGASCALE_* values GCP writes to the `tpu-env` metadata.
# ---------------------------------------------------------------------------------------------
metadata() {
  curl -sf --noproxy '*' --retry 5 --retry-delay 1 -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/$1"
}
tpu_env() {  # an environment variable wins over tpu-env, as in jax
  if [[ -n ${!1:-} ]]; then printf '%s' "${!1}"; return; fi
  { metadata tpu-env 2>/dev/null || true; } | awk -v k="$1" \
    'index($0, k ":") == 1 { v = substr($0, length(k) + 2); gsub(/^[ \047"]+|[ \047"\r]+$/, "", v); print v }'
}
on_worker() {
  local worker endpoints hosts num_hosts slices slice coordinator
  [[ " $* " == *" --coordinator_address="* ]] && { show "$@"; [[ $DRY_RUN == 1 ]] || exec "$@"; return; }
  worker=$(metadata agent-worker-number) || die "--on-worker: no TPU metadata server (is this a Cloud TPU VM?)"
  endpoints=$(metadata worker-network-endpoints) || die "--on-worker: no worker-network-endpoints in the TPU metadata"
  # Either "host,host" or "name:id:ip,name:id:ip": the last field is the address either way.
  hosts=$(tr ',' '\n' <<<"$endpoints" | awk -F: 'NF { print $NF }')
  num_hosts=$(grep -c . <<<"$hosts")
  slices=$(tpu_env MEGASCALE_NUM_SLICES); slices=${slices:-1}
  slice=$(tpu_env MEGASCALE_SLICE_ID); slice=${slice:-0}
  coordinator=$(tpu_env MEGASCALE_COORDINATOR_ADDRESS)
  coordinator=${coordinator:-$(head -n1 <<<"$hosts")}
  coordinator=${coordinator%%:*}  # MEGASCALE's port is libtpu's, not the jax coordinator's
  local cmd=("$@")
  if (( num_hosts * slices > 1 )); then
    cmd+=("--coordinator_address=$coordinator:${JAX_COORDINATOR_PORT:-8482}"
          "--num_processes=$(( num_hosts * slices ))" "--process_id=$(( slice * num_hosts + worker ))")
  fi
  show "${cmd[@]}"
  [[ $DRY_RUN == 1 ]] || exec "${cmd[@]}"
}

if [[ ${1:-} == --on-worker ]]; then
  shift
  on_worker "$@"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# From your machine.
# ---------------------------------------------------------------------------------------------
require TPU_NAME ZONE PROJECT CONFIG
[[ $CONFIG == /* ]] && die "CONFIG must be relative to the repository (it is read on the workers): $CONFIG"
[[ -f $REPO/$CONFIG ]] || echo "tpu_pod.sh: warning: $CONFIG is not in $REPO; it must exist on the workers" >&2
NUM_SLICES=${NUM_SLICES:-1}
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
QR_NAME=${QR_NAME:-$TPU_NAME}
STAGES=${STAGES:-create,copy,install,train}
REMOTE_DIR=${REMOTE_DIR:-grc_jax}  # relative to the workers' home directory
PYTHON=${PYTHON:-python3}          # TPU VM images have python3 and no `python`
stem=$(basename "$CONFIG" .py)
WORKDIR=${WORKDIR:-runs/$stem}
LOG=${LOG:-grc_train_$stem.log}
INSTALL_CMD=${INSTALL_CMD:-"$PYTHON -m pip install -q -U pip && $PYTHON -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.12'"}
read -r -a create_flags <<<"${CREATE_FLAGS:-}"  # e.g. --spot, --reserved
read -r -a ssh_flags <<<"${SSH_FLAGS:-}"        # e.g. --internal-ip, --tunnel-through-iap
where=(--zone="$ZONE" --project="$PROJECT")

if [[ -z ${RUNTIME_VERSION:-} ]]; then
  case ${ACCELERATOR_TYPE:-} in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

if (( NUM_SLICES > 1 )); then
  nodes=(); for ((i = 0; i < NUM_SLICES; i++)); do nodes+=("$TPU_NAME-$i"); done  # queued resources name them so
else
  nodes=("$TPU_NAME")
fi

# One command per slice, all slices at once (each `--worker=all` already covers a slice's hosts).
each_node() {
  local fn=$1 node pids=() failed=0
  if [[ $DRY_RUN == 1 || ${#nodes[@]} == 1 ]]; then
    for node in "${nodes[@]}"; do "$fn" "$node"; done
    return
  fi
  for node in "${nodes[@]}"; do "$fn" "$node" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  (( failed == 0 )) || die "$fn failed on at least one slice (see above)"
}
ssh_all() { local node=$1; shift; run gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"} --command="$*"; }

# describe_state VAR CMD...: sets VAR to what the describe command CMD prints, or to "" when the
# resource does not exist (and always in a dry run, which only shows CMD).
describe_state() {
  local var=$1; shift
  show "$@"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# if it does not exist:"
    printf -v "$var" '%s' ""
  else
    printf -v "$var" '%s' "$("$@" 2>/dev/null || true)"
  fi
}

stage_create() {
  if (( NUM_SLICES > 1 )); then
    # Multislice: one queued resource holds all slices; GCP then writes MEGASCALE_COORDINATOR_ADDRESS,
    # MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT into every worker's tpu-env metadata.
    local state
    describe_state state gcloud compute tpus queued-resources describe "$QR_NAME" "${where[@]}" --format='value(state.state)'
    if [[ -z $state ]]; then
      require ACCELERATOR_TYPE
      run gcloud compute tpus queued-resources create "$QR_NAME" "${where[@]}" --node-prefix="$TPU_NAME" \
        --node-count="$NUM_SLICES" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
        ${create_flags[@]+"${create_flags[@]}"}
    else
      echo "tpu_pod.sh: reusing queued resource $QR_NAME ($state)"
    fi
    [[ $DRY_RUN == 1 ]] && { echo "# then wait until its state is ACTIVE"; return; }
    local deadline=$(( SECONDS + ${CREATE_TIMEOUT:-7200} ))
    while state=$(gcloud compute tpus queued-resources describe "$QR_NAME" "${where[@]}" --format='value(state.state)'); [[ $state != ACTIVE ]]; do
      case $state in FAILED|SUSPENDED) die "queued resource $QR_NAME is $state" ;; esac
      (( SECONDS < deadline )) || die "queued resource $QR_NAME is still $state after ${CREATE_TIMEOUT:-7200}s (CREATE_TIMEOUT)"
      echo "tpu_pod.sh: $QR_NAME is $state; waiting"
      sleep 30
    done
  else
    local state
    describe_state state gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(state)'
    if [[ -z $state ]]; then
      require ACCELERATOR_TYPE
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
        --version="$RUNTIME_VERSION" ${create_flags[@]+"${create_flags[@]}"}
    elif [[ $state != READY ]]; then
      die "TPU $TPU_NAME exists but is $state (delete it with STAGES=delete, or start it)"
    else
      echo "tpu_pod.sh: reusing TPU $TPU_NAME (READY)"
    fi
  fi
}

# A path for the workers' shell: one word, but a leading ~/ still expands to their home.
remote_path() {
  if [[ $1 == "~/"* ]]; then printf '~/%s' "$(quote "${1#\~/}")"; else quote "$1"; fi
}
copy_to() { local node=$1
  run gcloud compute tpus tpu-vm scp "$tarball" "$node:grc_jax_code.tgz" "${where[@]}" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"}
  local dir; dir=$(remote_path "$REMOTE_DIR")
  ssh_all "$node" "mkdir -p $dir && tar -xzf grc_jax_code.tgz -C $dir && rm grc_jax_code.tgz"
}
clone_on() { local node=$1 url ref dir
  url=$(quote "$GIT_URL"); ref=$(quote "$GIT_REF"); dir=$(remote_path "$REMOTE_DIR")
  ssh_all "$node" "if [ -d $dir/.git ]; then git -C $dir fetch -q origin; else git clone -q $url $dir; fi && git -C $dir checkout -q --force $ref"
}
stage_copy() {
  if [[ -n ${GIT_URL:-} ]]; then
    GIT_REF=${GIT_REF:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo main)}
    each_node clone_on
    return
  fi
  # The working tree as it is (tracked and untracked, not ignored): what you see is what runs.
  if [[ $DRY_RUN == 1 ]]; then
    tarball=/tmp/grc_jax_code.tgz
    echo "# pack $REPO: the files of git ls-files -co --exclude-standard, into $tarball"
  elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    tarball=$(mktemp "${TMPDIR:-/tmp}/grc_jax_code.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    while IFS= read -r -d '' f; do [[ -e $REPO/$f ]] && printf '%s\0' "$f"; done \
      < <(git -C "$REPO" ls-files -z -co --exclude-standard) | tar -C "$REPO" --null -T - -czf "$tarball"
  else
    tarball=$(mktemp "${TMPDIR:-/tmp}/grc_jax_code.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    run tar -C "$REPO" --exclude=./runs --exclude=./.git -czf "$tarball" .
  fi
  each_node copy_to
}

install_on() { ssh_all "$1" "cd $(remote_path "$REMOTE_DIR") && $INSTALL_CMD"; }
stage_install() { each_node install_on; }

train_on() {
  local node=$1 exports="" name arg train dir
  dir=$(remote_path "$REMOTE_DIR")
  for name in ${REMOTE_ENV:-}; do exports+="export $name=$(printf '%q' "${!name:-}") && "; done
  train="$PYTHON -m grc_jax.train --config=$(quote "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  for arg in ${train_args[@]+"${train_args[@]}"}; do train+=" $(printf '%q' "$arg")"; done
  if [[ ${DETACH:-0} == 1 ]]; then
    ssh_all "$node" "cd $dir && ${exports}nohup bash launch/tpu_pod.sh --on-worker $train > $(remote_path "$LOG") 2>&1 < /dev/null &"
  else
    ssh_all "$node" "cd $dir && ${exports}bash launch/tpu_pod.sh --on-worker $train"
  fi
}
stage_train() {
  if [[ $WORKDIR != /* ]]; then
    echo "tpu_pod.sh: note: WORKDIR=$WORKDIR is on each worker's own disk. A multi-host slice needs a directory" \
         "every worker shares (same path), e.g. a gcsfuse or Filestore mount: set WORKDIR=/mnt/..." >&2
  fi
  each_node train_on
  [[ ${DETACH:-0} == 1 ]] && echo "tpu_pod.sh: running in the background; logs in ~/$REMOTE_DIR/$LOG on each worker"
  return 0
}

# SIGTERM: the run checkpoints, then exits. "[g]" keeps pkill from matching the remote shell running it.
stop_on() { ssh_all "$1" "pkill -TERM -f '[g]rc_jax[.]train' || true"; }
stage_stop() { each_node stop_on; }

stage_delete() {
  if (( NUM_SLICES > 1 )); then
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

train_args=(${1+"$@"})
dry=""; [[ $DRY_RUN == 1 ]] && dry="; dry run, nothing is executed"
echo "tpu_pod.sh: TPU $TPU_NAME (${NUM_SLICES} slice(s)${ACCELERATOR_TYPE:+ of $ACCELERATOR_TYPE}) in $ZONE/$PROJECT;" \
     "config $CONFIG; workdir $WORKDIR; stages $STAGES$dry"
[[ $DRY_RUN == 1 ]] || command -v gcloud >/dev/null || die "gcloud is not installed (DRY_RUN=1 prints the commands)"
IFS=',' read -r -a stages <<<"$STAGES"
for stage in "${stages[@]}"; do
  case $stage in
    create|copy|install|train|stop|delete) "stage_$stage" ;;
    *) die "unknown stage '$stage' in STAGES (create, copy, install, train, stop, delete)" ;;
  esac
done
