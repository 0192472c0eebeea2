"""Tasks: the zoo (ViT, NaViT, ViViT, DiT) trains and evaluates through the same trainer."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit import config_checks, datasets, sharding, tasks, train
from vdit.data import dense
from vdit.data.patchify import patchify, unpatchify
from vdit.tasks import image_diffusion, video_diffusion

ZOO = {
  "vit": "configs/vit/digits.py",
  "navit": "configs/navit/digits.py",
  "vivit": "configs/vivit/video.py",
  "dit": "configs/dit/digits.py",
}


def _config(name, data_dir, **overrides):
  c = configs.load("tiny", ZOO[name])
  c.input.data_dir = data_dir
  c.total_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.optimizer.warmup_steps = 1
  if name == "dit":
    c.sample.per_class, c.sample.steps = 1, 2
  return configs.override(c, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_trains_resumes_and_evaluates(name, data_dir, tmp_path, monkeypatch):
  """Each tiny zoo config trains through `train_and_evaluate`, resumes, and evaluates: top-1
  over the whole validation split for classifiers, a PNG class grid for DiT. The workdir is a
  relative path (orbax needs absolute ones: `checkpointing` resolves it)."""
  monkeypatch.chdir(tmp_path)
  workdir = name
  config = _config(name, data_dir)
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2 and int(state.skipped) == 0
  resumed = train.train_and_evaluate(_config(name, data_dir, total_steps=3), workdir)
  assert int(resumed.step) == 3
  if name == "dit":
    assert os.path.getsize(os.path.join(workdir, "samples", "3", "classes.png")) > 0
  else:
    with open(os.path.join(workdir, "eval", "3.json")) as f:
      results = json.load(f)["classification"]
    inp = config.input
    source = datasets.data_source(inp.dataset, "validation", data_dir=data_dir, config="tiny")
    assert results["examples"] == len(source)  # every validation example, exactly once
    assert 0.0 <= results["top1"] <= 1.0 and np.isfinite(results["loss"])


@pytest.mark.parametrize("name", ["vit", "navit", "vivit"])
def test_classifier_fits_a_batch(name, data_dir):
  """Repeated updates on one batch drive its training accuracy to 1: the loss, labels and
  gradients are wired to the right examples (NaViT: per packed slot)."""
  config = _config(name, data_dir, **{"optimizer.lr": 3e-3, "optimizer.warmup_steps": 1})
  config.total_steps = 60
  losses, metrics, _ = configs.fit_one_batch(config, 60)
  assert losses[-1] < 0.2 * losses[0], losses[::10]
  assert float(metrics["accuracy"]) >= 0.95


def test_dit_task_loss_at_init(data_dir):
  """adaLN-Zero: DiT outputs 0 at init, so the ε-MSE part of the loss is E[ε²] = 1 (with ε
  prediction; the tiny config predicts x0)."""
  config = _config("dit", data_dir, **{"diffusion.prediction": "eps"})
  task = tasks.get(config)
  model = task.build_model(config)
  params = model.init(jax.random.key(0), *task.dummy_inputs(config))["params"]
  batch = {k: jnp.asarray(v) for k, v in next(task.make_iterator(config)).items()}
  loss, metrics = task.loss(model, params, batch, jax.random.key(1), config)
  np.testing.assert_allclose(float(loss) - float(metrics["vlb"]), 1.0, atol=0.03)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  generate = task.predict_fns(config, model, mesh, rules)["generate"]  # `class_samples`' function
  images = generate(params, np.array([0, 3, -1]), steps=2, guidance_scale=2.0)
  assert images.shape == (3, 16, 16, 3) and np.all(np.isfinite(images))


def test_dit_task_drops_labels_in_the_loss(data_dir):
  """Guidance dropout of the DiT task is the loss's (`diffusion.text_dropout`, as VideoDiT's):
  dropping every label is training on null labels (−1); keeping them is not."""
  config = _config("dit", data_dir)
  task = tasks.get(config)
  model = task.build_model(config)
  params = model.init(jax.random.key(0), *task.dummy_inputs(config))["params"]
  params = configs.off_zero_init(params)
  batch = {k: jnp.asarray(v[:4]) for k, v in next(task.make_iterator(config)).items()}
  assert bool(jnp.all(batch["label"] >= 0))

  def loss(rate, labels):
    config = _config("dit", data_dir, **{"diffusion.text_dropout": rate})
    return task.loss(model, params, dict(batch, label=labels), jax.random.key(1), config)[0]

  dropped = loss(1.0, batch["label"])
  np.testing.assert_array_equal(dropped, loss(0.0, jnp.full_like(batch["label"], -1)))
  assert abs(float(loss(0.0, batch["label"]) - dropped)) > 1e-4


def test_as_rows_is_one_example_per_row():
  images = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  rows = image_diffusion.as_rows(images, jnp.array([3, -1]), jnp.array([True, False]))
  assert rows["patches"].shape == (2, 24, 3)
  np.testing.assert_array_equal(rows["patches"][1, 7], images[1, 1, 1])
  np.testing.assert_array_equal(rows["shapes"][:, 0], [[1, 4, 6], [1, 4, 6]])
  assert rows["loss_mask"][0].all() and not rows["loss_mask"][1].any()


def test_dense_pipeline_sizes_eval_pass_and_resume(data_dir):
  config = _config("vivit", data_dir, **{"input.dataset": "shapes"})
  it = dense.make_iterator(config.input, seed=0)
  batch = next(it)
  assert batch["video"].shape == (16, 8, 32, 32, 3) and batch["video"].dtype == np.float32
  assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
  assert set(np.unique(batch["label"])) <= {0, 1, 2, 3}
  state = it.get_state()
  expected = [next(it)["video"] for _ in range(2)]
  it2 = dense.make_iterator(config.input, seed=0)
  it2.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(it2)["video"], want)
  # One evaluation pass: each of the 200 validation clips once, the last batch padded.
  ev = list(dense.make_iterator(dict(config.input, split="validation"), seed=0, train=False))
  valid = np.concatenate([b["valid"] for b in ev])
  assert valid.sum() == 200 and len(valid) == 16 * 13
  assert np.all(np.concatenate([b["label"] for b in ev])[~valid] == -1)


def test_dense_fit_crop_vs_squash():
  video = np.zeros((2, 10, 40, 3), np.float32)
  video[:, :, :10] = 1.0  # the left quarter is bright
  crop = dense.FixedSize((3, 8, 8), "crop").map({"video": video, "label": 1})
  squash = dense.FixedSize((3, 8, 8), "squash").map({"video": video, "label": 1})
  assert crop["video"].shape == squash["video"].shape == (3, 8, 8, 3)
  assert crop["video"].max() == 0.0  # the centre crop cuts the bright quarter away
  np.testing.assert_allclose(squash["video"][:, :, :2], 1.0)  # squash keeps it
  np.testing.assert_array_equal(crop["video"][2], crop["video"][1])  # last frame repeated


def test_one_object_skips_second_objects_of_either_dataset():
  assert dense.one_object({}) and dense.one_object({"num_objects": np.int64(1)})
  assert dense.one_object({"digits": np.array([3, -1])})
  assert not dense.one_object({"num_objects": np.int64(2)})  # shapes
  assert not dense.one_object({"digits": np.array([3, 4])})  # moving_digits


def test_vivit_shapes_reads_ink_crops(data_dir):
  """`dataset=shapes` switches the ViViT to the object's colour-free crop at 16×16; the
  photo_pans default keeps the whole squashed frame."""
  default = configs.load("tiny", ZOO["vivit"])
  assert default.input.fit == "squash" and tuple(default.input.size) == (8, 32, 32)
  config = configs.load("tiny,dataset=shapes", ZOO["vivit"])
  config.input.data_dir = data_dir
  assert config.input.fit == "ink" and tuple(config.input.size) == (8, 16, 16)
  task = tasks.get(config)
  task.check_config(config, {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1})
  batch = next(iter(task.make_iterator(config, train=False, split="validation")))
  video = batch["video"][batch["valid"]]
  assert video.shape[1:] == (8, 16, 16, 3) and len(video)
  np.testing.assert_array_equal(video[..., 0], video[..., 2])  # an opacity map: no colour
  assert video.max() > 0.5 and video.min() == -1.0  # object on paper


@pytest.mark.parametrize(
  ("name", "overrides", "message"),
  [
    ("vit", {"input.size": (2, 32, 32)}, "a ViT reads images"),
    ("vivit", {"input.size": (8, 30, 32)}, "not a multiple of the model's patch"),
    ("dit", {"diffusion.objective": "rectified_flow"}, "needs diffusion.objective='gaussian'"),
    ("dit", {"input.size": (1, 32, 48)}, "must be (1, I, I)"),
    ("dit", {"model.class_dropout_prob": 0.0}, "gives DiT no null-class row"),
    ("navit", {"model.name": "vit"}, "input.size=None must be"),
    ("vit", {"task": "segmentation"}, "task='segmentation' is unknown"),
    ("vit", {"input.fit": "stretch"}, "input.fit='stretch' is not supported"),
  ],
)
def test_bad_zoo_configs_fail_clearly(name, overrides, message, data_dir):
  config = _config(name, data_dir, **overrides)
  with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
    train.validate(config)


def test_blur_patches_is_a_gaussian_blur_of_each_example_alone():
  """`video_diffusion.blur_patches` on a row packing two videos: inside each video's canvas (2
  cells from its edge) it is scipy's separable Gaussian of the frames, with each example's own
  σ; the other example never leaks in; σ = 0 gives the patches back."""
  from scipy import ndimage

  rng = np.random.default_rng(0)
  size = (1, 2, 2)
  videos = [rng.normal(size=(2, 8, 12, 3)), rng.normal(size=(2, 6, 6, 3))]
  sigmas = [0.8, 1.3]
  cut = [patchify(v.astype(np.float32), size) for v in videos]
  row = np.concatenate([p for p, _, _ in cut])[None]
  pos = np.concatenate([q for _, q, _ in cut])[None]
  seg = np.concatenate([np.full(len(p), i + 1) for i, (p, _, _) in enumerate(cut)])[None]
  sigma = np.concatenate([np.full(len(p), s) for (p, _, _), s in zip(cut, sigmas, strict=True)])
  out = np.asarray(video_diffusion.blur_patches(row, pos, seg, size, jnp.asarray(sigma[None])))[0]
  start = 0
  for video, (p, _, grid), s in zip(videos, cut, sigmas, strict=True):
    taps = np.exp(-(np.arange(-2, 3) ** 2) / (2 * s**2))
    want = ndimage.correlate1d(video, taps / taps.sum(), axis=1)
    want = ndimage.correlate1d(want, taps / taps.sum(), axis=2)
    got = unpatchify(out[start : start + len(p)], grid, size, 3)
    np.testing.assert_allclose(got[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2], atol=1e-5)
    start += len(p)
  other = row.copy()
  other[0, : len(cut[0][0])] += 10.0  # the first video changes: the second's blur must not
  moved = np.asarray(video_diffusion.blur_patches(other, pos, seg, size, jnp.asarray(sigma[None])))
  np.testing.assert_array_equal(moved[0, len(cut[0][0]) :], out[len(cut[0][0]) :])
  same = video_diffusion.blur_patches(row, pos, seg, size, jnp.zeros(seg.shape))
  np.testing.assert_array_equal(np.asarray(same), row)
