r"""Prompt adherence against the number of sampling steps, for one or several samplers.

  python -m vdit.tools.steps_table --workdir=runs/aligned_small \
      [--steps=1,2,4,8,16,32] [--samplers=stochastic,euler] [--step=N] [--out=steps.json]

Runs the run's own `adherence` eval (its prompts, sizes, seed and guidance; the evaluator's
defaults if the run has none) once per number of steps and sampler (`diffusion.sampler`, one of
the objective's samplers), on the EMA params of the checkpoint, and prints a Markdown table:
colour / shape / direction / all three / temporal per cell, as docs/sampling.md's tables. The
results also go to the run's eval/<step>.json as `adherence_<sampler>_<steps>` (and `--out`).
"""

import json
import sys

from absl import app, flags

from vdit import checkpointing, evaluate, evaluators
from vdit.diffusion import objectives

COLUMNS = ("colour", "shape", "direction", "all", "temporal")


def table(
  workdir: str,
  steps=(1, 2, 4, 8, 16, 32),
  samplers=("stochastic", "euler"),
  step: int | None = None,
  options: dict | None = None,
) -> tuple[int, dict[str, dict[int, dict]]]:
  """(step, {sampler: {steps: adherence results}}); `options` replace the run's adherence
  options (except `steps`)."""
  base = checkpointing.read_config(workdir)
  objective = base.diffusion.objective
  unknown = [s for s in samplers if s not in objectives.SAMPLERS[objective]]
  if unknown:
    raise ValueError(
      f"samplers {unknown} are not samplers of objective {objective!r}: "
      f"expected some of {objectives.SAMPLERS[objective]}"
    )
  if options is None:
    entry = evaluators.evals_of(base).get("adherence", {"type": "adherence"})
    options = {k: v for k, v in entry.items() if k not in evaluators.RESERVED}
  out = {}
  for sampler in samplers:
    config = checkpointing.read_config(workdir)
    config.unlock()
    config.diffusion.sampler = sampler
    names = {f"adherence_{sampler}_{n}": n for n in steps}
    config.evals = {
      name: dict(options, type="adherence", steps=n, every_steps=0) for name, n in names.items()
    }
    step, results = evaluate.evaluate(workdir, step=step, names=list(names), config=config)
    out[sampler] = {n: results[name] for name, n in names.items()}
  return step, out


def markdown(results: dict[str, dict[int, dict]]) -> str:
  samplers = list(results)
  lines = [
    "| steps | " + " | ".join(f"`{s}`" for s in samplers) + " |",
    "|---|" + "---|" * len(samplers),
  ]
  for n in next(iter(results.values())):
    cells = []
    for s in samplers:
      r = results[s][n]
      cells.append(" / ".join(f"{100 * r[k]:.1f}" if k != "temporal" else f"{r[k]:.2f}"
                              for k in COLUMNS))  # fmt: skip
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained video diffusion run.")
  flags.DEFINE_list("steps", ["1", "2", "4", "8", "16", "32"], "Numbers of sampling steps.")
  flags.DEFINE_list("samplers", ["stochastic", "euler"], "diffusion.sampler values.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("out", None, "Also write the results here (JSON).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  try:
    if not all(n.isdigit() and int(n) >= 1 for n in FLAGS.steps):
      raise ValueError(f"--steps={','.join(FLAGS.steps)}: expected integers >= 1, e.g. 1,2,4")
    steps = [int(n) for n in FLAGS.steps]
    step, results = table(FLAGS.workdir, steps, FLAGS.samplers, FLAGS.step)
  except (checkpointing.NoCheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"{FLAGS.workdir} at step {step}: colour / shape / direction / all three / temporal")
  print(markdown(results), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"step": step, **results}, f, indent=1, default=str)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
