"""Multi-host: 2 JAX processes on loopback (CPU collectives over gloo), via launch/local.py.

Each process has 4 of the 8 devices, loads only its own share of the data and writes the
checkpoint collectively with the other; the reference is one process with 8 devices stepping
on the same global rows (host 0's rows, then host 1's: the order of the global batch).
"""

import json
import os
import re
import signal
import sys

import jax
import ml_collections
import numpy as np
import pytest

from tests import configs
from tests.test_fault_tolerance import Run
from vdit import checkpointing, sharding, tasks, train, train_state
from vdit.data import packing, pipeline
from vdit.tasks import base as tasks_base

MESH = dict(data=2, fsdp=2, sequence=1, tensor=2)  # params split over both processes' devices


def _config(data_dir, **overrides):
  kw = {
    "total_steps": 3,
    "checkpoint_every_steps": 1000,
    "log_every_steps": 1,
    "optimizer.warmup_steps": 0,
    "optimizer.schedule_steps": 100,
    "optimizer.lr": 1e-3,  # the tolerances below are for this step size
    "mesh": MESH,
  }
  return configs.small(data_dir, **{**kw, **overrides})


def _launch(config_path, workdir, log_dir, processes=2) -> Run:
  launcher = [
    sys.executable,
    "launch/local.py",
    f"--num_processes={processes}",
    f"--devices_per_process={8 // processes}",
    f"--log_dir={log_dir}",
    "--",
  ]
  return Run(config_path, workdir, argv=launcher)


def _logs(log_dir, tail: int | None = 3000) -> str:
  out = []
  for name in sorted(os.listdir(log_dir)):
    if name.endswith(".log"):
      with open(os.path.join(log_dir, name)) as f:
        out.append(f"--- {name}\n" + f.read()[-tail if tail else 0 :])
  return "\n".join(out)


def _single_process(config, steps):
  """The same steps in this process on 8 devices, on the 2 hosts' rows concatenated."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  state = builder.create()
  initial = jax.device_get(state.params)
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  host = ml_collections.ConfigDict(config.input.to_dict())  # one process: half the rows
  host.rows_per_batch = config.input.rows_per_batch // 2
  iters = [
    pipeline.make_iterator(host, seed=config.seed, process_index=i, process_count=2)
    for i in range(2)
  ]
  losses = []
  with sharding.activate(mesh, rules):
    for _ in range(steps):
      parts = [next(it) for it in iters]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh, rules))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state), initial


@pytest.mark.slow
def test_two_processes_match_one(data_dir, tmp_path):
  """2 processes × 4 devices = 1 process × 8 devices: same losses, same checkpointed state;
  only process 0 writes TensorBoard events; each process saved its own data position. The final
  evals run once on both and the processes exit: process 0 writes the sample files and the eval
  JSON while process 1 goes on, so a host deciding alone which evals are still missing from that
  JSON would run one alone and hang."""
  config = _config(data_dir)
  config.sample.prompts, config.sample.steps = ("a red circle moving right",), 2
  config.sample.num_frames, config.sample.height, config.sample.width = 2, 8, 8
  # `loss` runs the task's sharded predict functions (validation batches made global, replicated
  # results) collectively on both processes; `prompts` samples and writes on process 0.
  config.evals = {"prompts": dict(type="prompts"), "loss": dict(type="loss", num_batches=1)}
  workdir, log_dir = str(tmp_path / "run"), str(tmp_path / "logs")
  run = _launch(configs.config_file(tmp_path, config), workdir, log_dir)
  assert run.finish(timeout=1200) == 0, run.stderr + _logs(log_dir)
  assert "JAX process 1/2" in _logs(log_dir, tail=None)
  printed = [float(x) for x in re.findall(r"^step \d+/3  loss ([\d.]+)", run.stdout, re.M)]
  assert len(printed) == 3, run.stdout

  losses, expected, initial = _single_process(config, 3)
  np.testing.assert_allclose(printed, losses, atol=2e-4)  # printed with 4 decimals
  step, state = configs.restored(workdir, config)
  assert step == 3
  # Adam turns reduction-order noise in tiny gradients into ≤ 1% of a step (lr = 1e-3).
  for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  moved = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(initial))
  )
  assert moved > 1e-3  # three real updates: the comparison above is not vacuous
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert len(events) == 1  # process 0 only
  data = sorted(
    f for f in os.listdir(os.path.join(workdir, "checkpoints", "3", "data")) if "of" in f
  )
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]
  assert os.listdir(os.path.join(workdir, "samples", "3"))  # the final evals ran
  with open(os.path.join(workdir, "eval", "3.json")) as f:
    assert np.isfinite(json.load(f)["loss"]["loss"])


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_at_the_same_step(data_dir, tmp_path):
  """SIGTERM to process 1 only (a maintenance event on one host): both processes agree on a
  step through JAX's coordination service, save one checkpoint together and exit 0."""
  config = _config(data_dir, total_steps=10_000)
  workdir, log_dir = str(tmp_path / "run"), str(tmp_path / "logs")
  run = _launch(configs.config_file(tmp_path, config), workdir, log_dir)
  run.wait_for(r"^step 2/", timeout=1200)
  with open(os.path.join(log_dir, "process_1.pid")) as f:
    os.kill(int(f.read()), signal.SIGTERM)
  assert run.finish() == 0, run.stderr + _logs(log_dir)
  stopped = int(re.search(r"preempted: checkpoint saved at step (\d+)", run.stdout).group(1))
  assert checkpointing.latest_step(workdir) == stopped < 10_000
  data_dir = os.path.join(workdir, "checkpoints", str(stopped), "data")
  data = sorted(f for f in os.listdir(data_dir) if "of" in f)
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]
  for i in range(2):  # both reached the sync point at that step (orbax logs it)
    with open(os.path.join(log_dir, f"process_{i}.log")) as f:
      assert f"Reached preemption sync point, step={stopped}" in f.read()


# ---------------------------------------------------------------------------------------------
# Resuming on another number of processes.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_resume_on_one(data_dir, tmp_path):
  """2 processes train 2 steps and checkpoint; the run resumes on 1 process (8 devices) to step
  4. Its data position is re-derived from both processes' (`packing.remap_state`, which
  test_data_packing checks loses no example): the position it saves at step 4 is that of an
  iterator set to the remapped state and advanced 2 batches, and a process that ignored the
  old positions or restored only one of them would save another."""
  config = _config(data_dir, total_steps=2, **{"input.num_packing_bins": 4})
  workdir, log_dir = str(tmp_path / "run"), str(tmp_path / "logs")
  run = _launch(configs.config_file(tmp_path / "two", config), workdir, log_dir)
  assert run.finish(timeout=1200) == 0, run.stderr + _logs(log_dir)
  checkpoints = tmp_path / "run" / "checkpoints"
  saved = checkpointing.saved_data_states(checkpoints / "2" / "data")
  assert [s["shard"] for s in saved] == [[0, 2], [1, 2]]

  config.total_steps = 4
  # 1 process, this test's 8 devices.
  run = Run(configs.config_file(tmp_path / "one", config), workdir)
  assert run.finish(timeout=1200) == 0, run.stderr
  assert "resumed from checkpoint at step 2" in run.stdout
  assert re.findall(r"^step (\d+)/4", run.stdout, re.M) == ["3", "4"], run.stdout

  it = tasks_base.host_iterator(pipeline.make_iterator, config, train=True)  # 1 host: all 8 rows
  it.set_state(packing.remap_state(saved, 0, 1))
  for _ in range(2):
    next(it)
  assert checkpointing.saved_data_states(checkpoints / "4" / "data") == [it.get_state()]
  it.close()
