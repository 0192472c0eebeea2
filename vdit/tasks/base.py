"""The `Task` interface (see `vdit/tasks/__init__.py`) and what tasks share."""

import functools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from vdit import batch_spec, models, sharding
from vdit.data import dense, pipeline

PredictFns = dict[str, Callable[..., Any]]  # what evaluators receive (`Task.predict_fns`)


class Task:
  """Defaults fit a model trained on packed rows (`vdit.data.pipeline`); override what differs.

  The train step calls `loss` inside `jax.jit` (traced once); everything else runs eagerly.
  """

  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    """Raises `config_checks.ConfigError` for a value this task cannot run."""

  def batch_keys(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Keys of a batch as the loss sees it (their shapes and axes: `vdit.batch_spec`)."""
    del config
    return batch_spec.PACKED_KEYS

  def build_model(self, config: ml_collections.ConfigDict):
    return models.build(config)

  def dummy_inputs(self, config: ml_collections.ConfigDict) -> tuple:
    """Arguments of `model.init` (shapes matter, values do not)."""
    return models.dummy_inputs(config)

  def make_iterator(self, config: ml_collections.ConfigDict, *, train: bool = True, split=None):
    """This host's checkpointable batch iterator (`split` overrides `input.split`)."""
    return host_iterator(pipeline.make_iterator, config, train=train, split=split)

  def loss(
    self, model, params, batch: dict[str, jax.Array], rng: jax.Array, config
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, scalar metrics) of one batch; traced inside the jitted train step."""
    raise NotImplementedError

  def predict_fns(self, config: ml_collections.ConfigDict, model, mesh, rules) -> PredictFns:
    """The functions the evaluators of `config.evals` receive (big_vision's `predict_fns`),
    built once per run. Each takes the params first: the EMA params as the train state holds
    them, sharded over `mesh`, never gathered to a host. Functions of a batch take this host's
    batch, make it global (the training batch sharding) and return global results, replicated
    to every host. Every task gives `batches` (`eval_batches`: the validation split, one pass);
    a task adds its own (`logits`, `reconstruct`, `generate`, `validation_loss`, `sampler`)."""
    del model, mesh, rules
    return {"batches": functools.partial(eval_batches, self, config)}


def host_iterator(make_iterator, config: ml_collections.ConfigDict, *, train: bool, split=None):
  """`make_iterator` (a pipeline's) over this host's share of `config.input`: its
  `rows_per_batch` is global, each host loads rows_per_batch / hosts of them."""
  count, rows = jax.process_count(), config.input.rows_per_batch
  if rows % count:
    raise ValueError(f"input.rows_per_batch={rows} is not divisible by the {count} hosts")
  host = ml_collections.ConfigDict(config.input.to_dict())
  host.rows_per_batch = rows // count
  if split is not None:
    host.split = split
  return make_iterator(
    host,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    train=train,
  )


def dense_iterator(config: ml_collections.ConfigDict, *, train: bool = True, split=None):
  """This host's checkpointable iterator of fixed-size clips (`vdit.data.dense`)."""
  return host_iterator(dense.make_iterator, config, train=train, split=split)


class DenseTask(Task):
  """A task trained on fixed-size clips (`vdit.data.dense`, `batch_spec.DENSE_KEYS`) instead of
  packed rows."""

  def batch_keys(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    del config
    return batch_spec.DENSE_KEYS

  def make_iterator(self, config: ml_collections.ConfigDict, *, train: bool = True, split=None):
    return dense_iterator(config, train=train, split=split)


def eval_batches(task: Task, config: ml_collections.ConfigDict, split: str = "validation"):
  """This host's batches of `split` (the task's keys), one pass. With several hosts, a host
  that is done early yields all-padding batches (`batch_spec.padding_like`) until every host
  is: the jitted functions over the sharded state are collectives, called as often on each."""
  keys = task.batch_keys(config)
  batches: Iterator = iter(task.make_iterator(config, train=False, split=split))
  last = None
  while True:
    batch = next(batches, None)
    if jax.process_count() > 1:
      more = multihost_utils.process_allgather(np.int32(batch is not None))
      if not np.any(more):
        return
      if batch is None:
        if last is None:
          raise ValueError(f"host {jax.process_index()} has no {split!r} batch to pad after")
        batch = batch_spec.padding_like(last)
    elif batch is None:
      return
    last = {k: batch[k] for k in keys}
    yield last


def on_global_batch(fn: Callable, keys, mesh, rules) -> Callable:
  """`fn(params, batch, *args)` as one jit over `mesh`: this host's `batch` (its `keys`) is made
  global with the training batch sharding, the outputs are replicated to every host."""
  jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh))

  def call(params, batch, *args):
    with sharding.activate(mesh, rules):
      return jitted(params, sharding.global_batch({k: batch[k] for k in keys}, mesh, rules), *args)

  return call


def write_eval_json(workdir: str, step: int, name: str, results: dict[str, Any]) -> str:
  """Writes `results` to workdir/eval/<step>.json under `name` (merging with what is there)."""
  path = epath.Path(workdir) / "eval" / f"{step}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  data = json.loads(path.read_text()) if path.exists() else {}
  data[name] = {k: _jsonable(v) for k, v in results.items()}
  path.write_text(json.dumps(data, indent=2, sort_keys=True))
  return os.fspath(path)


def _jsonable(value):
  if isinstance(value, np.ndarray | jax.Array):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value
