r"""Trains a vdit model.

  python -m vdit.main --config=configs/vdit/shapes.py:tiny --workdir=runs/shapes \
      [--config.total_steps=1000 ...]

Rerunning the same command in the same workdir resumes from the latest checkpoint (state,
optimizer, EMA, step, RNG and data-iterator position).

Multi-host (every host runs the same command): `--distributed` (or VDIT_DISTRIBUTED=1) calls
`jax.distributed.initialize()`. On Cloud TPU and GKE it finds the coordinator itself; elsewhere
(e.g. several CPU processes on one machine, `launch/local.py`) pass --coordinator_address,
--num_processes and --process_id (or VDIT_COORDINATOR_ADDRESS, VDIT_NUM_PROCESSES,
VDIT_PROCESS_ID). See docs/scale.md.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vdit import checkpointing, config_checks, config_lib, evaluators, train, workdir_guard

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The CLI's flags: defined only when run as a program, so importing this module next to
  another entry point (one process, e.g. the tests) defines no flag twice."""
  config_flags.DEFINE_config_file("config", None, "Config file (path.py:arg).")
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  flags.DEFINE_bool(
    "distributed",
    os.environ.get("VDIT_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (multi-host pods; env VDIT_DISTRIBUTED=1).",
  )
  flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("VDIT_COORDINATOR_ADDRESS"),
    "host:port of process 0 (env VDIT_COORDINATOR_ADDRESS); unset = auto-detect (TPU, GKE).",
  )
  flags.DEFINE_integer(
    "num_processes",
    int(os.environ["VDIT_NUM_PROCESSES"]) if os.environ.get("VDIT_NUM_PROCESSES") else None,
    "Number of processes (env VDIT_NUM_PROCESSES); unset = auto-detect.",
  )
  flags.DEFINE_integer(
    "process_id",
    int(os.environ["VDIT_PROCESS_ID"]) if os.environ.get("VDIT_PROCESS_ID") else None,
    "This process's index (env VDIT_PROCESS_ID); unset = auto-detect.",
  )
  flags.DEFINE_list(
    "allow_config_change",
    [],
    "Config keys (dotted, or prefixes such as optimizer) that a resume may change although they "
    "must match the checkpoint by default (workdir_guard.SAFE_TO_CHANGE lists the free ones).",
  )
  flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """`jax.distributed.initialize` with the flags that are set (the rest is auto-detected)."""
  # CPU processes exchange collectives over gloo (TCP); TPUs use ICI/DCN and ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(
    coordinator_address=FLAGS.coordinator_address,
    num_processes=FLAGS.num_processes,
    process_id=FLAGS.process_id,
  )
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:  # before any compute: `--workdir=` would write into the current directory
    workdir_guard.check_workdir(FLAGS.workdir)
  except checkpointing.WorkdirError as e:
    sys.exit(f"error: {e}")
  if FLAGS.distributed:
    initialize_distributed()
  elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
    raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed")
  logging.info(
    "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )

  try:
    train.train_and_evaluate(
      FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
    )
  except config_checks.ConfigError as e:
    sys.exit(f"error: bad config: {e}")
  except (checkpointing.WorkdirError, evaluators.EvalFailed) as e:
    sys.exit(f"error: {e}")  # locked, changed config, no intact checkpoint; evals that failed


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=config_lib.flags_parser)
