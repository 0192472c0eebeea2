"""DiT: class-conditional Gaussian diffusion on fixed-size images (Peebles & Xie 2023).

The images are fixed-size frames (`vdit.data.dense`, `input.size = (1, I, I)`), in pixel space
(`model.in_channels = 3`) until the autoencoder's latents are used. The loss is
`vdit.diffusion.objectives.loss` (gaussian) — the ε-prediction / learned-σ hybrid loss VideoDiT
uses with `diffusion.objective="gaussian"` — on a one-example-per-row view of the batch (every
pixel a token), with label dropout (`diffusion.text_dropout`, `guidance.drop_conditions`: labels
to −1) for classifier-free guidance; the model's `class_dropout_prob > 0` only gives it the
null-class row.
The `class_samples` evaluator writes a PNG grid with `predict_fns`' `generate`: one row per class,
guided by `sample.guidance`.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit import config_checks, sharding
from vdit.diffusion import gaussian_samplers, guidance, objectives
from vdit.tasks import base


def as_rows(images: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Images [B, H, W, C] as packed rows of one example each: pixels are the tokens, so the
  packed diffusion losses apply unchanged (`patches` [B, H·W, C])."""
  b, h, w, c = images.shape
  ones = jnp.ones((b, h * w), jnp.int32)
  return {
    "patches": images.reshape(b, h * w, c),
    "segment_ids": ones,
    "shapes": jnp.broadcast_to(jnp.asarray([1, h, w], jnp.int32), (b, 1, 3)),
    "text_tokens": jnp.zeros((b, 1), jnp.int32),
    "text_segment_ids": jnp.zeros((b, 1), jnp.int32),
    "labels": labels[:, None],
    "cond_mask": jnp.zeros((b, h * w), bool),
    "loss_mask": ones.astype(bool) & valid[:, None],
  }


class ImageDiffusion(base.DenseTask):
  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    m = config.model
    config_checks.choice("model.name (task image_diffusion)", m.name, ("dit",))
    config_checks.check_input(config, dense=True)
    config_checks.check_model_common(m, mesh_shape)
    config_checks.check_diffusion(config.diffusion)
    if config.diffusion.objective != "gaussian":
      raise config_checks.ConfigError(
        f"diffusion.objective={config.diffusion.objective!r}: the DiT task trains 'gaussian'"
      )
    if bool(config.diffusion.learn_sigma) != bool(m.learn_sigma):
      raise config_checks.ConfigError(
        f"model.learn_sigma={m.learn_sigma} and diffusion.learn_sigma="
        f"{config.diffusion.learn_sigma} must agree"
      )
    t, h, w = config.input.size
    if t != 1 or h != w or h % m.patch_size:
      raise config_checks.ConfigError(
        f"input.size={(t, h, w)} must be (1, I, I) with I a multiple of model.patch_size="
        f"{m.patch_size}"
      )
    if m.in_channels != 3:
      raise config_checks.ConfigError(f"model.in_channels={m.in_channels}: pixels have 3")
    if config.diffusion.text_dropout > 0 and not m.get("class_dropout_prob", 0.1) > 0:
      # Without the row, a dropped label (−1) would read the last class's embedding.
      raise config_checks.ConfigError(
        f"model.class_dropout_prob={m.class_dropout_prob} gives DiT no null-class row, but "
        f"diffusion.text_dropout={config.diffusion.text_dropout} drops labels to it: expected "
        "class_dropout_prob > 0 (or text_dropout = 0)"
      )

  def dummy_inputs(self, config):
    _, h, w = config.input.size
    return (
      jnp.zeros((1, h, w, 3), jnp.float32),
      jnp.zeros((1,), jnp.float32),
      jnp.zeros((1,), jnp.int32),
    )

  def loss(self, model, params, batch, rng, config):
    spec = objectives.Spec.from_config(config.diffusion)
    images = batch["video"][:, 0]
    b, h, w, c = images.shape
    rows = as_rows(images, batch["label"], batch["valid"])

    def apply_fn(x_t, t_tok, model_batch):
      out = model.apply(
        {"params": params}, x_t.reshape(b, h, w, c), t_tok[:, 0], model_batch["labels"][:, 0]
      )
      return out.reshape(b, h * w, -1)

    loss, aux = objectives.loss(spec, apply_fn, rows, rng)
    return loss, {"vlb": aux["vlb"], "tokens": aux["num_tokens"]}

  def predict_fns(self, config, model, mesh, rules) -> base.PredictFns:
    """`generate(params, labels, *, steps, guidance_scale, seed)` → float images [N, H, W, 3]
    (the `class_samples` evaluator; compiled once per number of labels, steps and guidance
    scale), and the base `batches`."""
    compiled = functools.cache(functools.partial(sample_fn, config, model))

    def generate(params, labels, *, steps: int, guidance_scale: float, seed: int = 0):
      return compiled(len(labels), steps, guidance_scale)(params, labels, seed)

    return super().predict_fns(config, model, mesh, rules) | {"generate": generate}


def sample_fn(config, model, n: int, steps: int, guidance_scale: float):
  """`fn(params, labels [n], seed)` → float images [n, H, W, 3]: `steps` of the config's sampler
  with classifier-free guidance, one jit (params and labels are arguments: the params stay as
  sharded, and a new seed or label set does not recompile)."""
  spec = objectives.Spec.from_config(config.diffusion)
  _, h, w = config.input.size
  sampler = spec.default_sampler
  spec.check_request(steps, 1.0, sampler, spec.guidance_interval)

  def model_fn(params, labels, x, t):
    null = jnp.full_like(labels, -1)
    both = jnp.concatenate([x, x]).reshape(2 * n, h, w, 3)
    out = model.apply(
      {"params": params}, both, jnp.concatenate([t, t])[:, 0], jnp.concatenate([labels, null])
    )
    out = out.reshape(2 * n, h * w, -1)
    return guidance.cfg(out[:n], out[n:], guidance_scale, t, spec.guidance_interval, channels=3)

  @jax.jit
  def run(params, labels, rng):
    noise_rng, sample_rng = jax.random.split(rng)
    x = jax.random.normal(noise_rng, (n, h * w, 3))
    return gaussian_samplers.sample(
      functools.partial(model_fn, params, labels),
      x,
      steps,
      schedule=spec.gaussian_schedule,
      prediction=spec.prediction,
      learn_sigma=spec.learn_sigma,
      method=sampler,
      eta=spec.ddim_eta,
      rng=sample_rng,
    )

  def fn(params, labels, seed: int = 0) -> np.ndarray:
    labels = jnp.asarray(labels, jnp.int32)
    return sharding.to_host(run(params, labels, jax.random.key(seed))).reshape(n, h, w, 3)

  return fn
