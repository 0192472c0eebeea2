#!/usr/bin/env bash
# GKE with xpk (github.com/AI-Hypercomputer/xpk): a TPU cluster, an image, a training workload.
#
#   export VDIT_CLUSTER=vdit VDIT_ZONE=us-east5-a VDIT_PROJECT=my-project
#   launch/xpk.sh cluster v6e-256                  # GKE cluster with one v6e-256 slice
#   launch/xpk.sh image                            # build + push launch/Dockerfile
#   launch/xpk.sh run sora-8b configs/vdit/sora.py:size=8B gs://BUCKET/runs/sora8b \
#       --config.input.data_dir=gs://BUCKET/tfds
#   launch/xpk.sh list | logs NAME | delete NAME | delete-cluster
#
# Every pod of the workload runs the same command; on GKE `jax.distributed.initialize()` finds
# the coordinator from the environment xpk sets up, so no addresses are passed. xpk restarts a
# failed or preempted workload (--max-restarts); the trainer resumes from the workdir's latest
# checkpoint, so a restart loses at most the steps since that checkpoint.
set -euo pipefail

CLUSTER="${VDIT_CLUSTER:?set VDIT_CLUSTER}"
ZONE="${VDIT_ZONE:?set VDIT_ZONE}"
PROJECT="${VDIT_PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
IMAGE="${VDIT_IMAGE:-gcr.io/$PROJECT/vdit:latest}"
TPU_TYPE="${VDIT_TPU_TYPE:-v6e-256}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
common=(--cluster="$CLUSTER" --zone="$ZONE" --project="$PROJECT")

cmd="${1:-}"; shift || true
case "$cmd" in
  cluster)
    xpk cluster create "${common[@]}" --tpu-type="${1:-$TPU_TYPE}" --num-slices=1 \
      ${VDIT_SPOT:+--spot}
    ;;
  image)
    docker build -f "$HERE/launch/Dockerfile" -t "$IMAGE" "$HERE"
    docker push "$IMAGE"
    ;;
  run)
    name="${1:?usage: run NAME CONFIG WORKDIR [--config.key=value ...]}"
    config="${2:?usage: run NAME CONFIG WORKDIR [...]}"
    workdir="${3:?usage: run NAME CONFIG WORKDIR [...]}"
    shift 3
    xpk workload create "${common[@]}" --workload="$name" --tpu-type="$TPU_TYPE" \
      --num-slices=1 --docker-image="$IMAGE" --max-restarts=10 \
      --command="python -m vdit.main --distributed --config=$config --workdir=$workdir $*"
    ;;
  list) xpk workload list "${common[@]}" ;;
  logs) kubectl logs -f --max-log-requests=64 -l "jobset.sigs.k8s.io/jobset-name=${1:?NAME}" ;;
  delete) xpk workload delete "${common[@]}" --workload="${1:?NAME}" ;;
  delete-cluster) xpk cluster delete "${common[@]}" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
