r"""Trains a vdit model.

  python -m vdit.main --config=configs/vdit/shapes.py:tiny --workdir=runs/shapes \
      [--config.total_steps=1000 ...]

Rerunning the same command in the same workdir resumes from the latest checkpoint (state,
optimizer, EMA, step, RNG and data-iterator position).
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vdit import config_checks, config_lib, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py:arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  os.environ.get("VDIT_DISTRIBUTED", "") == "1",
  "Call jax.distributed.initialize() (multi-host pods; env VDIT_DISTRIBUTED=1).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info(
    "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )

  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_checks.ConfigError as e:
    sys.exit(f"error: bad config: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.flags_parser)
