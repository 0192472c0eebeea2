"""Config-driven evaluators: `config.evals.<name> = dict(type=..., every_steps=..., **options)`.

  loss            validation diffusion loss per noise-level bucket (video_diffusion)
  samples         sample grids for fixed prompts and sizes → GIF/MP4 + TensorBoard images
  prompts         the config's `sample.prompts` → workdir/samples/<step>/ (video_diffusion)
  adherence       analytic colour / shape / motion scoring of generated `shapes` videos
  digits          digit accuracy of generated `moving_digits` videos by a trained classifier
  frechet         Fréchet distance between real and generated frames in a feature space
  top1            top-1 and loss of a classifier on its validation split (classification)
  reconstruction  PSNR, SSIM and latent statistics on the validation split (autoencoder)
  class_samples   a PNG grid of generated images, one row per class (image_diffusion)
  modes           every conditioning mode (frames; retake, inpaint, outpaint) on real `shapes` clips
  captions        decoded validation captions scored per attribute; prompt expansion (captioning)

An evaluator that does not apply to the run (e.g. `adherence` on a dataset other than `shapes`)
raises `NotApplicable` and is skipped with a warning; one that fails is logged with its traceback
and recorded as `{"error": ...}`, and the next evals and the training go on (the trainer reports
the failures when it finishes, `EvalFailed`).

Evaluators receive what they evaluate, as big_vision's do (`evaluators/common.py`): the
trainer (or `vdit.evaluate`) asks the task for its predict functions over the sharded state
once per run (`fns = tasks.get(config).predict_fns(config, model, mesh, rules)`: `batches`,
`logits`, `validation_loss`, `sampler`, ...) and hands them in with the EMA params as the state
holds them, sharded, never gathered to a host. Every evaluator is

  fn(ctx: Context, **options) -> dict

with `ctx` the run's config, those functions, the params, the workdir and the step; the dict
holds scalars (logged to TensorBoard as `eval/<name>/<key>` and written to
workdir/eval/<step>.json under `<name>`), optionally `files` (paths written) and `images` /
`videos` ({tag: uint8 array}, TensorBoard only). An evaluator needing a function the task does
not give (`predict_fn`) is `NotApplicable`. Every process calls `run` (the predict functions
are collectives over the mesh); only process 0 writes files. docs/evaluation.md describes each
evaluator and its options.
"""

import importlib
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vdit import config_checks
from vdit.tasks import base as tasks_base

Evaluator = Callable[..., dict[str, Any]]


class Context(NamedTuple):
  """What every evaluator receives: the run's config, the task's predict functions, the EMA
  params (sharded as trained), the workdir to write into and the step evaluated."""

  config: ml_collections.ConfigDict
  fns: tasks_base.PredictFns
  params: Any
  workdir: str
  step: int


# type -> "module:function" of the built-in evaluators, imported by name when used (as
# big_vision's evaluators are): they import the sampler and models, this registry none of them.
BUILTINS: dict[str, str] = {
  "loss": "vdit.evaluators.loss:evaluate",
  "samples": "vdit.evaluators.samples:evaluate",
  "prompts": "vdit.evaluators.samples:prompts",
  "adherence": "vdit.evaluators.adherence:evaluate",
  "digits": "vdit.evaluators.classifier:digits",
  "frechet": "vdit.evaluators.frechet:evaluate",
  "top1": "vdit.evaluators.top1:evaluate",
  "reconstruction": "vdit.evaluators.reconstruction:evaluate",
  "class_samples": "vdit.evaluators.class_samples:evaluate",
  "modes": "vdit.evaluators.modes:evaluate",
  "captions": "vdit.evaluators.captions:evaluate",
}
EVALUATORS: dict[str, Evaluator] = {}  # added by `register` (extensions, tests)
RESERVED = ("type", "every_steps")  # keys of an eval entry that are not evaluator options
SUMMARY_KEYS = ("images", "videos")  # TensorBoard-only results (not written to JSON)


class NotApplicable(Exception):  # noqa: N818 (a reason to skip, not a failure)
  """Raised by an evaluator that cannot measure this run (the message says why)."""


class EvalFailed(RuntimeError):
  """Evals raised during training; the training itself finished (the message lists them)."""


def predict_fn(fns: tasks_base.PredictFns, name: str) -> Callable:
  """The task's predict function `name`; `NotApplicable` if the task gives none."""
  if name not in fns:
    raise NotApplicable(
      f"it needs the task's `{name}` function and the task gives {sorted(fns)} (Task.predict_fns)"
    )
  return fns[name]


def failures(results: dict[str, dict[str, Any]]) -> dict[str, str]:
  """{name: error message} of the evals in `run`'s results that failed."""
  return {name: out["error"] for name, out in results.items() if "error" in out}


def register(name: str) -> Callable[[Evaluator], Evaluator]:
  """Decorator adding an evaluator type under `name` (the built-in ones are in `BUILTINS`)."""

  def add(fn: Evaluator) -> Evaluator:
    EVALUATORS[name] = fn
    return fn

  return add


def known() -> list[str]:
  """The evaluator types, sorted."""
  return sorted(BUILTINS.keys() | EVALUATORS.keys())


def get(type_name: str) -> Evaluator:
  if type_name in EVALUATORS:
    return EVALUATORS[type_name]
  if type_name not in BUILTINS:
    raise ValueError(f"eval type={type_name!r} is unknown; expected one of {known()}")
  module, function = BUILTINS[type_name].split(":")
  return getattr(importlib.import_module(module), function)


def evals_of(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{name: entry} of `config.evals` (empty if the config has none)."""
  evals = config.get("evals", None)
  if not evals:
    return {}
  out = {}
  for name, entry in evals.items():
    entry = dict(entry)
    if "type" not in entry:
      raise ValueError(f"evals.{name} has no `type`; expected one of {known()}")
    out[name] = entry
  return out


def check_options(name: str, entry: dict[str, Any]) -> None:
  """The options of eval `name` are keywords its evaluator takes (its signature is the spec of
  its section: a misspelt option fails here, before training, not at the first eval)."""
  fn = get(entry["type"])
  options = {k: v for k, v in entry.items() if k not in RESERVED}
  params = list(inspect.signature(fn).parameters.values())[1:]  # after ctx
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return
  takes = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
  unknown = sorted(set(options) - set(takes))
  missing = [
    p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options
  ]
  if unknown or missing:
    what = f"unknown option(s) {unknown}" if unknown else f"missing option(s) {missing}"
    raise config_checks.ConfigError(
      f"evals.{name} (type={entry['type']!r}): {what}; its options are {takes}"
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """`config.evals`: known types, options the evaluator takes, every_steps >= 0 (the
  evaluators check their options' values); raises `config_checks.ConfigError`."""
  try:
    for name, entry in evals_of(config).items():
      check_options(name, entry)
      every = entry.get("every_steps", 0)
      if not isinstance(every, int) or every < 0:
        raise config_checks.ConfigError(
          f"evals.{name}.every_steps={every!r} must be an integer >= 0"
        )
  except config_checks.ConfigError:
    raise
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None


def due(config: ml_collections.ConfigDict, step: int, total_steps: int) -> list[str]:
  """Names of the evals to run after `step`: every_steps divides step, or the final step."""
  names = []
  for name, entry in evals_of(config).items():
    every = int(entry.get("every_steps", 0) or 0)
    if step == total_steps or (every > 0 and step % every == 0):
      names.append(name)
  return names


def missing(config: ml_collections.ConfigDict, workdir: str, step: int, total_steps: int):
  """Names of the evals due at `step` without results in workdir/eval/<step>.json (a run that
  stopped, or crashed, before or during them): rerunning a finished run completes them.

  Process 0 reads the file (it is the one that writes it) and every process follows its answer:
  evals are collective, and a host that read the file before process 0 had written an eval's
  results would run that eval alone and wait forever for the others."""
  names = due(config, step, total_steps)  # the config's: the same on every host
  if not names:
    return []
  if jax.process_index() == 0:
    path = epath.Path(workdir) / "eval" / f"{step}.json"
    written = json.loads(path.read_text()) if path.exists() else {}
    done = {name for name, out in written.items() if "error" not in out}  # failed ones: again
    todo = np.array([name not in done for name in names], bool)
  else:
    todo = np.zeros(len(names), bool)
  if jax.process_count() > 1:
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  return [name for name, run_it in zip(names, todo) if run_it]


def run(
  config: ml_collections.ConfigDict,
  fns: tasks_base.PredictFns,
  params: Any,
  workdir: str,
  step: int,
  names: Sequence[str] | None = None,
  writer=None,
) -> dict[str, dict[str, Any]]:
  """Runs the named evals (default: all) with the task's predict functions `fns` on `params`
  (the EMA params, sharded as trained) → {name: results}; writes eval/<step>.json (process 0)
  and, with a clu `writer`, scalars and image/video summaries."""
  evals = evals_of(config)
  names = list(evals) if names is None else list(names)
  unknown = sorted(set(names) - set(evals))
  if unknown:
    raise ValueError(f"evals {unknown} are not in config.evals {sorted(evals)}")
  results = {}
  for name in names:
    entry = evals[name]
    options = {k: v for k, v in entry.items() if k not in RESERVED}
    fn = get(entry["type"])  # an unknown type is a config error, not a failed eval
    try:
      out = fn(Context(config, fns, params, workdir, step), **options)
    except NotApplicable as e:
      logging.warning("eval %s (%s) skipped at step %d: %s", name, entry["type"], step, e)
      out = {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 (an eval must not cost the training its run)
      logging.exception("eval %s (%s) failed at step %d", name, entry["type"], step)
      out = {"error": f"{type(e).__name__}: {e}"}
    summaries = {k: out.pop(k) for k in SUMMARY_KEYS if k in out}
    results[name] = out
    if jax.process_index() == 0:
      tasks_base.write_eval_json(workdir, step, name, out)
    if writer is not None:
      scalars = {
        f"eval/{name}/{k}": float(v)
        for k, v in out.items()
        if isinstance(v, int | float | np.number) and not isinstance(v, bool)
      }
      if scalars:
        writer.write_scalars(step, scalars)
      if summaries.get("images"):
        writer.write_images(step, {f"eval/{name}/{k}": v for k, v in summaries["images"].items()})
      if summaries.get("videos"):
        writer.write_videos(step, {f"eval/{name}/{k}": v for k, v in summaries["videos"].items()})
  if writer is not None:
    writer.flush()
  return results
