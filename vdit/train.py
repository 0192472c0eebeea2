"""`train_and_evaluate(config, workdir)`: mesh → data → state → loop (with `config.evals`).

Reads top to bottom. Everything that touches files, devices or logs lives here (and in
`checkpointing.py`); the math is in `vdit/diffusion` and `vdit/models`.
"""

import functools
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from vdit import (
  checkpointing,
  config_checks,
  evaluators,
  sharding,
  tasks,
  train_state,
  workdir_guard,
)
from vdit.tasks import restore


# ---------------------------------------------------------------------------------------------
# The train step: one jit, donated state.
# ---------------------------------------------------------------------------------------------
def train_step(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  tx,
  config: ml_collections.ConfigDict,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimizer update on the task's loss (`config.task`, `vdit.tasks`) of a global batch.

  The update is skipped (and counted) if the loss or the gradient is not finite.
  """
  task = tasks.get(config)
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    return task.loss(model, params, batch, rng, config)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(optax.tree.cast(grads, jnp.float32))  # fp32 even for bf16 params
  # A non-finite loss or gradient skips the update (counted), it is never applied. Not
  # `optax.apply_if_finite`: that wraps the optimizer state (changing the checkpointed tree),
  # leaves the EMA to us and looks at the gradient only, not the loss. A `lax.cond`, not a
  # `where` of new and old: the donated state is then updated in place; a `where` keeps every
  # old buffer alive to the end and XLA copies params, moments and EMA each step (the CPU
  # demo's step: 86 → 77 ms; BENCHMARKS.md, "train_step").
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA of the params (Polyak averaging): decay·ema + (1 − decay)·params.
    decay = train_state.ema_decay(state.step, config.optimizer.ema_decay)
    return params, opt_state, optax.incremental_update(params, state.ema_params, 1.0 - decay)

  params, opt_state, ema_params = jax.lax.cond(
    finite, update, lambda _: (state.params, state.opt_state, state.ema_params), None
  )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema_params=ema_params,
    skipped=state.skipped + (~finite).astype(jnp.int32),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "finite": finite,
    **aux,
    "learning_rate": train_state.learning_rate_schedule(config.optimizer, config.total_steps)(
      state.step
    ),
  }
  return new_state, metrics


def jit_train_step(config, model, tx, mesh, rules, state_shardings):
  """`train_step` as one `jax.jit` over the mesh, with the state donated."""
  keys = tasks.get(config).batch_keys(config)
  batch_shardings = sharding.batch_shardings(mesh, rules, keys)
  return jax.jit(
    functools.partial(train_step, model=model, tx=tx, config=config),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


# ---------------------------------------------------------------------------------------------
# Setup helpers.
# ---------------------------------------------------------------------------------------------
def make_data_iterator(config: ml_collections.ConfigDict):
  """This host's checkpointable training batches (the task's pipeline)."""
  return tasks.get(config).make_iterator(config)


def to_global(batch, config, mesh, rules) -> dict[str, jax.Array]:
  """The task's keys of a host-local batch, as global arrays over the mesh."""
  keys = tasks.get(config).batch_keys(config)
  return sharding.global_batch({k: batch[k] for k in keys}, mesh, rules)


class _Preemption:
  """SIGTERM (TPU maintenance, a scheduler, `kill`) → save a checkpoint and stop, on all hosts.

  One process: a Python SIGTERM handler sets a flag that the loop checks after every step.
  Several processes: JAX's coordination service catches SIGTERM on any host (with its own
  handler, so none is installed here) and `checkpointing.reached_preemption(step)` turns True on
  every host at the same step, so that they all join the same collective save.
  """

  def __init__(self):
    self.signalled = False
    self._previous = None
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    if not self._multihost:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. inside a notebook worker)
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.signalled = True

  def requested(self, mngr, step: int) -> bool:
    """Whether to save and stop after `step`; every process must call this at every step."""
    if self._multihost and not self.signalled:
      self.signalled = checkpointing.reached_preemption(mngr, step)
    return self.signalled

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  """Seconds as "1h02m03s" or "2m03s", for the printed progress line.

  Not `clu.periodic_actions.ReportProgress`: it writes steps/s to the writer and logs the ETA
  as the work unit's notes, but returns neither for the line printed here (`step N/T  loss L
  x steps/s  ETA ...`), and it counts evaluation time as training time.
  """
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# train_and_evaluate
# ---------------------------------------------------------------------------------------------
def initial_params(config: ml_collections.ConfigDict, builder: train_state.StateBuilder) -> Any:
  """The EMA params of the run `config.init_from`, sharded over the builder's mesh, that a new
  run starts from (a distilled student from its teacher); None: fresh params. Params of
  another model (other names or shapes) are a `ConfigError` naming the run."""
  source = config.get("init_from", "")
  if not source:
    return None
  _, step, params = restore.ema_params(source, None, None, builder.mesh)
  want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), builder.abstract.params)
  got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
  if want != got:
    raise config_checks.ConfigError(
      f"init_from={source!r}: its params are not this model's (other names or shapes); expected "
      "a run of the same model config"
    )
  logging.info("starting from the EMA params of step %d of %s", step, source)
  return params


def validate(
  config: ml_collections.ConfigDict,
  *,
  num_devices: int | None = None,
  num_processes: int | None = None,
) -> None:
  """Raises `config_checks.ConfigError` naming the first bad value and what was expected.

  What every run shares is checked by `config_checks` (steps, optimizer, mesh vs devices and
  hosts), the rest by the task (`config.task`, `vdit.tasks`) and the evaluators (`config.evals`).
  The mesh is checked against `num_devices` / `num_processes` (default: this run's; the AOT
  tool passes a TPU topology's).
  """
  config_checks.check_steps(config)
  config_checks.check_init_from(config)
  try:
    task = tasks.get(config)
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None
  config_checks.check_optimizer(config.optimizer)
  shape = config_checks.check_mesh(config, num_devices=num_devices, num_processes=num_processes)
  task.check_config(config, shape)
  evaluators.check_config(config)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: Sequence[str] = ()
) -> train_state.TrainState:
  """Trains (resuming from `workdir` if it has a checkpoint), running `config.evals` on the way
  and at the end (samples, validation loss or accuracy, ...: `vdit.evaluators`).

  Before any compute: the config is checked, the workdir locked against a second trainer, and a
  resume refused if the config differs from the checkpoints' in keys that must not change
  (`workdir_guard.SAFE_TO_CHANGE`, plus the dotted keys or prefixes in `allow_config_change`).
  """
  workdir_guard.check_workdir(workdir)
  validate(config)  # a bad config fails here, before any compute
  with workdir_guard.workdir_lock(workdir):
    workdir_guard.check_config_unchanged(workdir, config, allow_config_change)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  is_main = jax.process_index() == 0
  eval_failures = {}  # (step, eval name) -> error; reported once the training is done

  # --- Mesh -----------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

  # --- Data -----------------------------------------------------------------------------------
  data_iter = make_data_iterator(config)

  # --- Model and state ------------------------------------------------------------------------
  task = tasks.get(config)
  builder = train_state.build(config, mesh, rules, task)
  mngr = checkpointing.manager(workdir, max_to_keep=config.max_checkpoints)
  if mngr.latest_step() is not None:
    # Verified (finite, save-time checksum); damaged newer steps are skipped with a warning and
    # moved aside; if none is intact this raises and nothing has been written.
    try:
      step, state = checkpointing.restore(mngr, builder.abstract, data_iter, move_damaged=True)
    except BaseException:
      mngr.close()
      raise
    logging.info("resumed from checkpoint at step %d", step)
    if is_main:
      print(f"resumed from checkpoint at step {step}", flush=True)
  else:
    state = builder.create(initial_params(config, builder))
  if is_main:  # after the restore: a refused resume leaves the workdir as it was
    checkpointing.write_config(workdir, config)
  start_step = int(state.step)
  logging.info("model: %s parameters", f"{train_state.num_params(state.params):,}")

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))

  # --- The jitted step, and what the evaluators receive --------------------------------------
  step_fn = jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  # The task's predict functions over the sharded state (big_vision's predict_fns): built once,
  # called with `state.ema_params` as they are sharded, never gathered to a host.
  predict_fns = task.predict_fns(config, builder.model, mesh, rules)
  if start_step >= config.total_steps:
    logging.info("already at step %d ≥ total_steps=%d", start_step, config.total_steps)

  # --- Loop -----------------------------------------------------------------------------------
  total = config.total_steps
  # The step metrics since the last log line, averaged on the host (not `clu.metrics`: the
  # keys are the task's, and plain float means of replicated scalars need no merging).
  accumulated: dict[str, list[float]] = {}
  nonfinite_in_a_row = 0
  t_last, step_last = time.time(), start_step
  done = start_step
  try:
    with _Preemption() as preemption, sharding.activate(mesh, rules):
      for step in range(start_step, total):
        batch = to_global(next(data_iter), config, mesh, rules)
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
        for k, v in metrics.items():
          accumulated.setdefault(k, []).append(float(v))
        nonfinite_in_a_row = 0 if metrics["finite"] else nonfinite_in_a_row + 1
        if nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
          raise FloatingPointError(
            f"{nonfinite_in_a_row} non-finite updates in a row at step {step + 1}; aborting "
            f"(max_nonfinite_in_a_row={config.max_nonfinite_in_a_row})"
          )
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
          now = time.time()
          steps_per_sec = (done - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, done
          summary = {k: float(np.mean(v)) for k, v in accumulated.items() if k != "finite"}
          summary["steps_per_sec"] = steps_per_sec
          summary["skipped_updates"] = float(state.skipped)
          writer.write_scalars(done, summary)
          accumulated = {}
          if is_main:
            print(
              f"step {done}/{total}  loss {summary['loss']:.4f}  "
              + (f"acc {summary['accuracy']:.3f}  " if "accuracy" in summary else "")
              + f"{steps_per_sec:.2f} steps/s  "
              f"ETA {_format_eta((total - done) / max(steps_per_sec, 1e-9))}",
              flush=True,
            )
        stop = preemption.requested(mngr, done)
        if done % config.checkpoint_every_steps == 0 or done == total or stop:
          checkpointing.save(mngr, done, state, data_iter, config, force=True)
        if stop:
          break
        if names := evaluators.due(config, done, total):  # `config.evals` (vdit/evaluators)
          results = evaluators.run(
            config, predict_fns, state.ema_params, workdir, done, names=names, writer=writer
          )
          eval_failures.update({(done, k): v for k, v in evaluators.failures(results).items()})
          t_last = time.time()  # evaluation time is not training time
  finally:  # also on an abort: let an in-flight save complete, never leave it half done
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
  if preemption.signalled:
    logging.warning("stopped by SIGTERM at step %d; rerun the same command to resume", done)
    if is_main:
      print(f"preempted: checkpoint saved at step {done}", flush=True)
    return state

  # --- The final step's evals that have no results yet (a rerun after a crash or a resume) ---
  if names := evaluators.missing(config, workdir, int(state.step), total):
    with sharding.activate(mesh, rules):
      results = evaluators.run(
        config, predict_fns, state.ema_params, workdir, int(state.step), names, writer=writer
      )
    eval_failures.update({(int(state.step), k): v for k, v in evaluators.failures(results).items()})
  if eval_failures:  # the training and its checkpoints are complete; the failures are not lost
    listed = "; ".join(
      f"{name} at step {step}: {msg}" for (step, name), msg in eval_failures.items()
    )
    raise evaluators.EvalFailed(
      f"training finished (checkpoint at step {int(state.step)}), but evals failed: {listed}; "
      "the log has their tracebacks; rerunning the same command retries the final step's"
    )
  return state


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def visit(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict | ml_collections.ConfigDict):
        visit(key + ".", v)
      elif isinstance(v, bool | int | float | str):
        flat[key] = v
      else:
        flat[key] = str(v)

  visit("", config)
  return flat
