"""Training: mesh invariance, exact resume, and the entry points end to end."""

import json
import os

import jax
import numpy as np
import pytest

from tests import configs
from vdit import checkpointing, sharding, tasks, train, train_state


def _one_step(config, mesh, batch_np):
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  state = builder.create()
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  with sharding.activate(mesh, rules):
    batch = sharding.global_batch(batch_np, mesh, rules)
    state, metrics = step_fn(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics), state


def test_mesh_invariance(data_dir):
  """One step on 1 device and on a (data=2, fsdp=2, tensor=2) mesh: same loss and params."""
  config = configs.small(data_dir, **{"model.num_heads": 2, "model.text_heads": 2})
  batch_np = next(train.make_data_iterator(config))
  one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  many = sharding.make_mesh({"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2})
  params_1, metrics_1, _ = _one_step(config, one, batch_np)
  params_8, metrics_8, state_8 = _one_step(config, many, batch_np)
  # The sharded run really is sharded: some weight is split over fsdp/tensor.
  specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state_8.params)}
  assert any("fsdp" in s or "tensor" in s for s in specs), specs
  np.testing.assert_allclose(metrics_1["loss"], metrics_8["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_1["grad_norm"], metrics_8["grad_norm"], rtol=1e-4)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_1, params_8
  )


def test_resume_equals_uninterrupted(data_dir, tmp_path):
  """N steps straight vs N/2, stop, resume to N: same params, EMA, RNG and data order."""
  kw = {"optimizer.schedule_steps": 6, "total_steps": 6, "checkpoint_every_steps": 3}
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(configs.small(data_dir, **kw), straight)
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(configs.small(data_dir, **{**kw, "total_steps": 3}), resumed)
  assert checkpointing.latest_step(resumed) == 3
  train.train_and_evaluate(configs.small(data_dir, **kw), resumed)
  step_a, a = configs.restored(straight, configs.small(data_dir, **kw))
  step_b, b = configs.restored(resumed, configs.small(data_dir, **kw))
  assert step_a == step_b == 6
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # The data iterator positions were saved and match, too.
  for name in ("straight", "resumed"):
    assert os.listdir(tmp_path / name / "checkpoints" / "6" / "data")


TINY_FLAGS = [
  *configs.TINY_CLI_FLAGS,
  "--config.sample.steps=2",
  "--config.evals.adherence.num_prompts=2",
  "--config.evals.adherence.steps=2",
  "--config.evals.adherence.sizes=((8,32,32),)",  # one size here; three in test_evaluators
]


@pytest.mark.slow
def test_entry_points_train_resume_sample(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  common = [*TINY_FLAGS, f"--workdir={workdir}", f"--config.input.data_dir={data_dir}"]
  out = configs.run_module("vdit.main", *common, "--config.total_steps=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 2/2" in out.stdout and "steps/s" in out.stdout and "ETA" in out.stdout
  assert "samples written" in out.stdout
  gifs = [p for p in out.stdout.split() if p.endswith(".gif")]
  assert gifs and all(os.path.exists(p) for p in gifs)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  with open(os.path.join(workdir, "eval", "2.json")) as f:  # config.evals ran at the last step
    assert {"loss", "samples", "adherence"} <= set(json.load(f))

  out = configs.run_module("vdit.main", *common, "--config.total_steps=4")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 3/4" in out.stdout and "step 1/4" not in out.stdout  # resumed at 2
  assert checkpointing.latest_step(workdir) == 4

  gif = str(tmp_path / "x.gif")
  out = configs.run_module(
    "vdit.sample",
    f"--workdir={workdir}",
    "--prompt=a red circle moving right",
    "--num_frames=4",
    "--height=24",
    "--width=40",  # a size never used in training
    "--steps=2",
    f"--out={gif}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  from vdit import media  # noqa: PLC0415

  frames = media.read_video(gif)
  assert frames.shape == (4, 24, 40, 3)

  # NPZ output at a size that is not whole patches (generated on whole patches, then cropped;
  # the GIF above was whole patches).
  npz = str(tmp_path / "x.npz")
  size = ("--num_frames=3", "--height=30", "--width=17")
  prompt = "--prompt=a blue square moving left"
  out = configs.run_module(
    "vdit.sample", f"--workdir={workdir}", prompt, *size, "--steps=1", f"--out={npz}"
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert media.read_video(npz).shape == (3, 30, 17, 3)


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  out = configs.run_module(
    "vdit.sample", f"--workdir={tmp_path}", "--prompt=x", f"--out={tmp_path}/x.gif"
  )
  assert out.returncode != 0
  assert "not a vdit workdir" in out.stderr or "no checkpoint" in out.stderr
  assert "Traceback" not in out.stderr
