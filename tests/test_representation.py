"""Alignment to a frozen encoder: REPA in VideoDiT, VA-VAE in the autoencoder.

One tiny captioner (1 step, pixel (2, 4, 4) patches) is the frozen encoder of both: the runs
that name it check it before any compute, and their losses carry the alignment term.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit import config_checks, tasks, train
from vdit.tasks import representation


@pytest.fixture(scope="module")
def encoder_run(data_dir, tmp_path_factory):
  c = configs.load("tiny", "configs/caption/video.py")
  c.input.update(dataset_config="test", data_dir=data_dir, read_threads=0, prefetch_batches=0)
  c.input.update(tokens_per_row=256, max_tokens_per_example=128, rows_per_batch=8)
  c.input.update(max_examples_per_row=4, text_tokens_per_row=64, num_packing_bins=4)
  c.model.update(width=32, depth=1, decoder_depth=1, num_heads=2)
  c.evals = {}
  c.total_steps = 1
  run = str(tmp_path_factory.mktemp("captioner"))
  train.train_and_evaluate(c, run)
  return run


def _loss_and_grads(config, params=None, seed=0):
  """(loss, metrics, grads, params) of the task's loss on its first training batch, at
  perturbed init params (so that zero-initialised paths carry gradients) or `params`."""
  task = tasks.get(config)
  batch = {k: jnp.asarray(v) for k, v in next(task.make_iterator(config)).items()}
  model = task.build_model(config)
  if params is None:
    init = jax.jit(lambda r: nn.unbox(model.init(r, *task.dummy_inputs(config)))["params"])
    params = init(jax.random.key(seed))
    params = configs.off_zero_init(params)

  def loss_fn(p):
    return task.loss(model, p, batch, jax.random.key(1), config)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, metrics, grads, params


def test_structure_loss_is_zero_for_aligned_features_and_counts_margins():
  f = jax.random.normal(jax.random.key(0), (2, 6, 4))
  np.testing.assert_allclose(representation.structure_loss(3.0 * f, f), 0.0, atol=1e-6)
  # Opposite features: cosine −1 (hinge 1 − 0.5 + 1 = 1.5); their Gram matrices are equal.
  np.testing.assert_allclose(representation.structure_loss(-f, f), 1.5, rtol=1e-6)


def test_repa_in_videodit_trains_and_checks_its_encoder(data_dir, encoder_run):
  config = configs.small(data_dir)
  config.diffusion.repa_encoder = encoder_run
  config.model.update(repa_depth=1, repa_dim=32)
  train.validate(config)
  loss, metrics, grads, params = _loss_and_grads(config)
  assert np.isfinite(float(loss)) and -1.0 <= float(metrics["repa_similarity"]) <= 1.0
  assert float(jnp.abs(grads["repa_fc3"]["kernel"]).max()) > 0
  # Without the encoder the same params (less the projector) give the loss without the term.
  plain_params = {k: v for k, v in params.items() if not k.startswith("repa_")}
  plain_loss, _, _, _ = _loss_and_grads(configs.small(data_dir), plain_params)
  weight = config.diffusion.repa_weight
  np.testing.assert_allclose(loss, plain_loss - weight * metrics["repa_similarity"], rtol=1e-4)

  for key, value, message in (
    ("model.repa_dim", 16, r"repa_dim=16: expected .* the encoder's width 32"),
    ("model.repa_depth", 3, r"repa_depth=3, .* in \[1, model.depth=2\]"),
    ("input.patch_size", (1, 4, 4), r"reads input.patch_size=\(2, 4, 4\); this run has"),
    ("diffusion.repa_encoder", "/nonexistent/run", "holds no run"),
  ):
    bad = configs.override(
      configs.small(data_dir),
      **{"diffusion.repa_encoder": encoder_run, "model.repa_depth": 1, "model.repa_dim": 32},
    )
    configs.override(bad, **{key: value})
    with pytest.raises(config_checks.ConfigError, match=message):
      train.validate(bad)
  orphan = configs.override(configs.small(data_dir), **{"model.repa_depth": 1})
  with pytest.raises(config_checks.ConfigError, match="need diffusion.repa_encoder"):
    train.validate(orphan)


def test_autoencoder_alignment_trains_and_checks_its_encoder(data_dir, encoder_run):
  def config(**overrides):
    c = configs.load("tiny,frames", "configs/vae/video.py")
    c.input.update(data_dir=data_dir, rows_per_batch=8, dataset_config="test")
    c.input.mixture = (("shapes", "test", 1.0),)
    c.model.update(channels=(8, 8, 8), latent_channels=4)
    c.evals = {}
    return configs.override(c, **overrides)

  aligned = config(**{"loss.align_encoder": encoder_run, "model.align_dim": 32})
  train.validate(aligned)
  loss, metrics, grads, _ = _loss_and_grads(aligned)
  assert 0.0 < float(metrics["align"]) < 3.0
  assert float(jnp.abs(grads["align_proj"]["kernel"]).max()) > 0
  np.testing.assert_allclose(
    loss, metrics["recon"] + aligned.loss.align_weight * metrics["align"], rtol=1e-5
  )
  for overrides, message in (
    ({"loss.align_encoder": encoder_run}, "give both"),
    ({"loss.align_encoder": encoder_run, "model.align_dim": 16}, r"model.align_dim=16"),
    (
      {"loss.align_encoder": encoder_run, "model.align_dim": 32, "model.align_frames": 1},
      r"reads \(2, 4, 4\) patches .* expected \(1, 4, 4\)",
    ),
  ):
    with pytest.raises(config_checks.ConfigError, match=message):
      train.validate(config(**overrides))
