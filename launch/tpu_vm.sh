#!/usr/bin/env bash
# Cloud TPU VM pods: create, set up every worker, run training in tmux, follow logs, delete.
#
#   export VDIT_TPU=vdit-v5p VDIT_ZONE=us-east5-a VDIT_PROJECT=my-project
#   launch/tpu_vm.sh create v5p-128                 # accelerator type (v5p-128 = 64 chips)
#   launch/tpu_vm.sh setup                          # copy this checkout, venv, pip '.[tpu]'
#   launch/tpu_vm.sh run configs/vdit/sora.py:size=1B gs://BUCKET/runs/sora1b \
#       --config.input.data_dir=gs://BUCKET/tfds   # same command on every worker, in tmux
#   launch/tpu_vm.sh logs [WORKER]                  # tail -f one worker's log (default 0)
#   launch/tpu_vm.sh status                         # last log line of every worker
#   launch/tpu_vm.sh stop                           # SIGTERM: checkpoint, then exit
#   launch/tpu_vm.sh delete
#
# Optional: VDIT_RUNTIME (TPU VM image; default from the accelerator type), VDIT_SPOT=1
# (preemptible capacity; training resumes from the last checkpoint when rerun).
# `run` is idempotent: rerunning it after a preemption or `stop` resumes from the workdir.
# The workdir must be on storage every worker sees (gs://): orbax writes checkpoints from all
# hosts collectively, and each host saves its own data-iterator position there.
set -euo pipefail

TPU="${VDIT_TPU:?set VDIT_TPU to the TPU VM name}"
ZONE="${VDIT_ZONE:?set VDIT_ZONE, e.g. us-east5-a}"
PROJECT="${VDIT_PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
REMOTE_DIR='~/vdit'          # the checkout on every worker
LOG_DIR='~/vdit_logs'        # per-worker logs: $LOG_DIR/run.log
SESSION=vdit                 # tmux session name
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all() { tpu ssh "$TPU" --worker=all --command="$1"; }

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "unknown accelerator type $1; set VDIT_RUNTIME" >&2; exit 2 ;;
  esac
}

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    accel="${1:?usage: create ACCELERATOR_TYPE (e.g. v5p-128, v6e-256)}"
    tpu create "$TPU" --accelerator-type="$accel" \
      --version="${VDIT_RUNTIME:-$(default_runtime "$accel")}" \
      ${VDIT_SPOT:+--spot}
    ;;
  setup)
    # Ship this checkout (no git remote needed), then the pinned environment, on all workers.
    tar -C "$HERE" --exclude=.git --exclude=runs --exclude='.venv' -czf /tmp/vdit.tgz .
    tpu scp /tmp/vdit.tgz "$TPU":/tmp/vdit.tgz --worker=all
    # TPU VM images are Ubuntu 22.04 (Python 3.10); vdit needs 3.11+ (jammy has python3.11).
    on_all "sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv tmux && \
      mkdir -p $REMOTE_DIR $LOG_DIR && tar -C $REMOTE_DIR -xzf /tmp/vdit.tgz && \
      cd $REMOTE_DIR && python3.11 -m venv .venv && \
      .venv/bin/pip install -q -c constraints.txt -e '.[tpu]' && \
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  run)
    config="${1:?usage: run CONFIG WORKDIR [--config.key=value ...]}"
    workdir="${2:?usage: run CONFIG WORKDIR [--config.key=value ...]}"
    shift 2
    extra="$(printf ' %q' "$@")"
    # One process per worker; jax.distributed.initialize() finds the pod's coordinator.
    train="cd $REMOTE_DIR && VDIT_DISTRIBUTED=1 exec .venv/bin/python -m vdit.main \
      --config=$config --workdir=$workdir$extra >> $LOG_DIR/run.log 2>&1"
    on_all "mkdir -p $LOG_DIR && tmux kill-session -t $SESSION 2>/dev/null; \
      tmux new-session -d -s $SESSION \"$train\" && echo started on \$(hostname)"
    ;;
  logs)
    tpu ssh "$TPU" --worker="${1:-0}" --command="tail -n 100 -f $LOG_DIR/run.log"
    ;;
  status)
    on_all "echo \$(hostname): \$(tmux has-session -t $SESSION 2>/dev/null && echo running \
      || echo stopped) \$(tail -n 1 $LOG_DIR/run.log 2>/dev/null)"
    ;;
  stop)
    # SIGTERM to the trainer on every worker: all hosts save one checkpoint at the same step.
    on_all "pid=\$(tmux list-panes -t $SESSION -F '#{pane_pid}' 2>/dev/null) && \
      kill -TERM \$pid && echo SIGTERM sent on \$(hostname) || echo not running on \$(hostname)"
    ;;
  ssh)
    tpu ssh "$TPU" --worker="${1:-0}"
    ;;
  delete)
    tpu delete "$TPU" --quiet
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
