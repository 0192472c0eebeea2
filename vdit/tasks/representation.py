"""Frozen encoders whose features other runs align to (REPA, Yu et al. 2024; VA-VAE, Yao et al.
2025): the encoder of a captioning run (`configs/caption/video.py`) reads packed rows of
spacetime patches, and `alignment_loss` pulls a projection of a model's own features towards it.
"""

import functools

import jax
import jax.numpy as jnp

from vdit import config_checks, tasks
from vdit.tasks import captioning, restore


@functools.cache
def encoder(workdir: str, flag: str):
  """`features(patches, positions, segment_ids) -> [B, L, E]` of the frozen encoder of the
  captioning run in `workdir` (the target network of REPA and of the autoencoder's
  alignment), E and the run's config. Its EMA params are loaded once
  (replicated) and enter the train step as constants."""
  config = captioning.load_run_config(workdir, "video", flag)
  task = tasks.get(config)
  model = task.build_model(config)
  _, _, params = restore.ema_params(workdir, None, config)

  def features(patches, positions, segment_ids):
    context, _ = model.apply(
      {"params": params}, patches, positions, segment_ids, None, None, method=model.encode
    )
    return jax.lax.stop_gradient(context.astype(jnp.float32))

  return features, int(config.model.width), config


def checked_encoder(workdir: str, flag: str):
  """`encoder(workdir, flag)` for a config check: a missing or wrong run is a ConfigError
  naming `flag`; restored here, before any compute and outside the jitted step that reads it."""
  try:
    return encoder(workdir, flag)
  except (ValueError, FileNotFoundError) as e:
    raise config_checks.ConfigError(str(e)) from None


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of [..., E] vectors along the last axis → [...]."""
  return jnp.sum(_unit(a) * _unit(b), axis=-1)


def alignment_loss(projected, target, mask) -> jax.Array:
  """REPA's loss (Yu et al. 2024, Eq. 8): minus the cosine similarity of each token's projected
  hidden state [B, L, E] and the encoder's feature of its clean patch [B, L, E], averaged over
  the `mask` tokens [B, L]."""
  sim = cosine(projected, target)
  return -jnp.sum(sim * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def structure_loss(projected, target, margins=(0.5, 0.25)) -> jax.Array:
  """VA-VAE's vision-foundation loss (Yao et al. 2025, Eqs. 2–3) on [B, N, E] tokens of each
  clip: the marginal cosine loss relu(1 − m1 − cos(p_i, f_i)), and the marginal distance-matrix
  loss relu(|cos(p_i, p_j) − cos(f_i, f_j)| − m2) over the pairs of one clip, each averaged."""
  m1, m2 = margins
  p, f = _unit(projected), _unit(target)
  per_token = jnp.mean(jax.nn.relu(1.0 - m1 - cosine(p, f)))
  gram = lambda x: jnp.einsum("bne,bme->bnm", x, x)  # noqa: E731
  matrix = jnp.mean(jax.nn.relu(jnp.abs(gram(p) - gram(f)) - m2))
  return per_token + matrix
