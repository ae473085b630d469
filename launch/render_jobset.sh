#!/usr/bin/env bash
# Fills in launch/jobset.yaml for one accelerator and prints the manifest (stdout; the summary goes
# to stderr), ready for `kubectl apply -f -`. With APPLY=1 it applies it itself; add DRY_RUN=1 to
# print the kubectl command instead.
#
#   ACCELERATOR=tpu IMAGE=us-docker.pkg.dev/p/r/grc:latest CONFIG=configs/qwen3_4b.py WORKDIR_CLAIM=grc-runs \
#   TPU_ACCELERATOR=tpu-v5p-slice TPU_TOPOLOGY=2x2x4 NUM_SLICES=2 launch/render_jobset.sh | kubectl apply -f -
#
# Required: ACCELERATOR (tpu or gpu), IMAGE, CONFIG, WORKDIR_CLAIM.
# Both:  JOB_NAME=grc-train  WORKDIR=/workdir/runs/<config name>  MAX_RESTARTS=3  TRAIN_ARGS= (extra flags, shell words)
# TPU:   NUM_SLICES=1  TPU_ACCELERATOR=tpu-v5p-slice  TPU_TOPOLOGY=2x2x2  CHIPS_PER_HOST=4
#        HOSTS_PER_SLICE=(chips in TPU_TOPOLOGY) / CHIPS_PER_HOST
# GPU:   NUM_NODES=2  GPU_TYPE=nvidia-h100-80gb  GPUS_PER_NODE=8  COORDINATOR_PORT=8476
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE=${TEMPLATE:-$HERE/jobset.yaml}
DRY_RUN=${DRY_RUN:-0}
die() { echo "render_jobset.sh: $*" >&2; exit 2; }
source "$HERE/common.sh"

hint() {
  case $1 in
    ACCELERATOR) echo "which variant of jobset.yaml, ACCELERATOR=tpu or ACCELERATOR=gpu" ;;
    IMAGE) echo "a container image with the repository and grc_jax installed at /app" ;;
    CONFIG) echo "the config file to train, relative to /app, e.g. CONFIG=configs/qwen3_4b.py" ;;
    WORKDIR_CLAIM) echo "a ReadWriteMany PersistentVolumeClaim for checkpoints and logs, mounted at /workdir" ;;
    *) echo "see launch/README.md" ;;
  esac
}
for v in ACCELERATOR IMAGE CONFIG WORKDIR_CLAIM; do
  [[ -n ${!v:-} ]] || die "$v is not set: $(hint "$v")"
done

JOB_NAME=${JOB_NAME:-grc-train}
WORKDIR=${WORKDIR:-/workdir/runs/$(basename "$CONFIG" .py)}
MAX_RESTARTS=${MAX_RESTARTS:-3}
TRAIN_ARGS=${TRAIN_ARGS:-}
# Pod hostnames are <job>-<replicated job>-<i>-<j>: a DNS label of at most 63 characters.
[[ $JOB_NAME =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] \
  || die "JOB_NAME must be lower-case letters, digits and '-', at most 40 characters: '$JOB_NAME'"

case $ACCELERATOR in
  tpu)
    NUM_SLICES=${NUM_SLICES:-1}
    TPU_ACCELERATOR=${TPU_ACCELERATOR:-tpu-v5p-slice}
    TPU_TOPOLOGY=${TPU_TOPOLOGY:-2x2x2}
    CHIPS_PER_HOST=${CHIPS_PER_HOST:-4}
    [[ $TPU_TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || die "TPU_TOPOLOGY must look like 2x2x4, got '$TPU_TOPOLOGY'"
    [[ $CHIPS_PER_HOST =~ ^[1-9][0-9]*$ ]] || die "CHIPS_PER_HOST must be a positive whole number, got '$CHIPS_PER_HOST'"
    chips=$(( ${TPU_TOPOLOGY//x/*} ))
    if [[ -z ${HOSTS_PER_SLICE:-} ]]; then
      (( chips % CHIPS_PER_HOST == 0 )) || die "TPU_TOPOLOGY=$TPU_TOPOLOGY ($chips chips) is not a whole number of hosts of CHIPS_PER_HOST=$CHIPS_PER_HOST"
      HOSTS_PER_SLICE=$(( chips / CHIPS_PER_HOST ))
    fi
    names=(NUM_SLICES TPU_ACCELERATOR TPU_TOPOLOGY CHIPS_PER_HOST HOSTS_PER_SLICE)
    summary="$NUM_SLICES slice(s) of $TPU_ACCELERATOR $TPU_TOPOLOGY, $HOSTS_PER_SLICE host(s) x $CHIPS_PER_HOST chips"
    ;;
  gpu)
    NUM_NODES=${NUM_NODES:-2}
    GPU_TYPE=${GPU_TYPE:-nvidia-h100-80gb}
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    COORDINATOR_PORT=${COORDINATOR_PORT:-8476}
    names=(NUM_NODES GPU_TYPE GPUS_PER_NODE COORDINATOR_PORT)
    summary="$NUM_NODES node(s) x $GPUS_PER_NODE $GPU_TYPE"
    ;;
  *) die "ACCELERATOR must be tpu or gpu, got '$ACCELERATOR'" ;;
esac
for v in NUM_SLICES CHIPS_PER_HOST HOSTS_PER_SLICE NUM_NODES GPUS_PER_NODE COORDINATOR_PORT MAX_RESTARTS; do
  [[ -z ${!v+set} || ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
names+=(JOB_NAME IMAGE CONFIG WORKDIR WORKDIR_CLAIM MAX_RESTARTS TRAIN_ARGS)

[[ -f $TEMPLATE ]] || die "no template at $TEMPLATE"
script=""
for name in "${names[@]}"; do
  value=${!name}
  [[ $value != *$'\n'* ]] || die "$name must be one line"
  # Paths go into the container's bash -c line as one word each; TRAIN_ARGS is shell words on purpose.
  [[ $name == CONFIG || $name == WORKDIR ]] && value=$(quote "$value")
  value=$(printf '%s' "$value" | sed -e 's/[\\|&]/\\&/g')
  script+="s|__${name}__|${value}|g"$'\n'
done
# The one document labelled for this accelerator; the header comments and the other variant go.
manifest=$(awk -v want="grc-jax/accelerator: $ACCELERATOR" '
  /^---/ { if (keep) printf "%s", doc; doc = ""; keep = 0; next }
  { doc = doc $0 "\n"; line = $0; sub(/^[ \t]+/, "", line); if (line == want) keep = 1 }
  END { if (keep) printf "%s", doc }' "$TEMPLATE" | sed -e "$script")
[[ -n $manifest ]] || die "no document labelled grc-jax/accelerator: $ACCELERATOR in $TEMPLATE"
left=$(grep -o '__[A-Z0-9_]*__' <<<"$manifest" | sort -u | tr '\n' ' ' || true)
[[ -z $left ]] || die "placeholders left unfilled in $TEMPLATE: $left"

echo "render_jobset.sh: JobSet $JOB_NAME ($ACCELERATOR): $summary; image $IMAGE;" \
     "python -m grc_jax.train --config=$CONFIG --workdir=$WORKDIR${TRAIN_ARGS:+ $TRAIN_ARGS}" >&2
if [[ ${APPLY:-0} == 1 ]]; then
  echo "+ kubectl apply -f - (the manifest below)" >&2
  if [[ $DRY_RUN == 1 ]]; then printf '%s\n' "$manifest"; else printf '%s\n' "$manifest" | kubectl apply -f -; fi
else
  printf '%s\n' "$manifest"
fi
