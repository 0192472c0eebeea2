r"""Config-driven evaluation of a checkpoint: runs `config.evals` (vdit/evaluators).

  python -m vdit.evaluate --config=configs/vdit/shapes.py:tiny --workdir=runs/shapes \
      [--step=N] [--evals=loss,adherence]

Restores the EMA params of the latest (or `--step`) checkpoint with the model of the run's own
config (the one written into the workdir, any task), sharded over the run's mesh as in training,
hands them to the evaluators with the task's predict functions (as the trainer does), prints the
results and writes workdir/eval/<step>.json (and TensorBoard scalars/summaries into the
workdir). The evals are the workdir's config's, and those of `--config` that it lacks (an eval
added to the config file after the run; `--config` need not be given).
"""

import json
import sys

import jax
import ml_collections
from absl import app, flags
from clu import metric_writers
from ml_collections import config_flags

from vdit import checkpointing, config_lib, evaluators, sharding, tasks
from vdit.tasks import restore


def evaluate(
  workdir: str,
  fallback: ml_collections.ConfigDict | None = None,
  step: int | None = None,
  names=None,
  config: ml_collections.ConfigDict | None = None,
) -> tuple[int, dict]:
  """(step, {name: results}) of the evals of `workdir`'s checkpoint; `config`: the run's own
  config changed by the caller (e.g. another sampler, `vdit.tools.steps_table`), else read."""
  config = checkpointing.read_config(workdir) if config is None else config
  extra = evaluators.evals_of(fallback) if fallback is not None else {}
  if not evaluators.evals_of(config) and not extra:
    raise ValueError(
      f"the config in {workdir!r} has no `evals` and --config gives none either "
      "(see docs/evaluation.md)"
    )
  config.unlock()  # evals the run's config lacks come from --config (added to a finished run)
  config.evals = extra | evaluators.evals_of(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  config, step, params = restore.ema_params(workdir, step, config, mesh)
  task = tasks.get(config)
  predict_fns = task.predict_fns(config, task.build_model(config), mesh, rules)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)
  try:
    with sharding.activate(mesh, rules):
      results = evaluators.run(
        config, predict_fns, params, workdir, step, names=names, writer=writer
      )
  finally:
    writer.close()
  return step, results


def _define_flags() -> None:
  """The CLI's flags: defined only when run as a program, so importing this module next to
  another entry point (one process, e.g. the tests) defines no flag twice."""
  config_flags.DEFINE_config_file("config", None, "Config file with `evals` (fallback).")
  flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  try:
    step, results = evaluate(FLAGS.workdir, FLAGS.config, FLAGS.step, FLAGS.evals)
  except (checkpointing.NoCheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print(json.dumps({"step": step, **results}, indent=2, sort_keys=True, default=str), flush=True)
    print(f"wrote {FLAGS.workdir}/eval/{step}.json", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=config_lib.flags_parser)
