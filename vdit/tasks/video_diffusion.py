"""VideoDiT text-to-video on packed spacetime patches: the Sora recipe (the default task)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from vdit import batch_spec, config_checks, latent_codec, sampling
from vdit.diffusion import conditioning, objectives
from vdit.tasks import base


def packed_apply(model, params):
  """VideoDiT as the diffusion losses call it: `(x_t, t per token, packed batch) -> output`."""

  def apply_fn(x_t, t_tok, batch, x0_prev=None):
    prev = {} if x0_prev is None else {"x0_prev": x0_prev}  # self-conditioned models only
    return model.apply(
      {"params": params},
      x_t,
      t_tok,
      batch["positions"],
      batch["segment_ids"],
      batch["text_tokens"],
      batch["text_segment_ids"],
      batch["labels"],
      batch.get("text_embeddings"),  # precomputed caption embeddings, if the run uses them
      **prev,
    )

  return apply_fn


class VideoDiffusion(base.Task):
  """Diffusion loss (`config.diffusion`) on packed rows, some examples frame-conditioned."""

  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    config_checks.check_video_diffusion(config, mesh_shape)

  def batch_keys(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    extra = ("text_embeddings",) if config.input.get("text_embeddings") else ()
    return batch_spec.PACKED_KEYS + extra

  def loss(self, model, params, batch, rng, config):
    """First some examples become conditioned tasks (image-to-video, extension, interpolation;
    `diffusion.conditioning`): their given frames are clean and carry no loss."""
    cond_rng, loss_rng = jax.random.split(rng)
    spec = objectives.Spec.from_config(config.diffusion)
    batch, cond_metrics = conditioning.condition_batch(
      cond_rng, batch, spec.cond_probs, config.input.patch_size[0]
    )

    loss, aux = objectives.loss(spec, packed_apply(model, params), batch, loss_rng)
    return loss, {"tokens": aux["num_tokens"], "cond_tokens": cond_metrics["cond_tokens"]}

  def predict_fns(self, config, model, mesh, rules) -> base.PredictFns:
    """Besides the base `batches`:

    `validation_loss(params, batch, rng)` → (per-example loss [B, K], its noise level t
    [B, K], loss tokens per example [B, K]) of the global batch: the training objective with
    uniform times, no caption dropout and no frame conditioning (plain text-to-video), so that
    checkpoints compared on the same rng see the same noise (the `loss` evaluator).

    `sampler(params)` → a `sampling.Sampler` of these params (their sharding kept), this model
    and the run's codec (loaded once): `samples`, `prompts`, `adherence`, `digits`, `frechet`.
    """
    spec = dataclasses.replace(
      objectives.Spec.from_config(config.diffusion), time_sampling="uniform", text_dropout=0.0
    )

    def validation_loss(params, batch, rng):
      k = batch["shapes"].shape[1]
      seg, mask = batch["segment_ids"], batch["loss_mask"] | batch["cond_mask"]
      tokens = jnp.stack([jnp.sum((seg == i + 1) & mask, axis=1) for i in range(k)], axis=1)
      batch = dict(batch, cond_mask=batch["cond_mask"] & False)
      _, aux = objectives.loss(spec, packed_apply(model, params), batch, rng)
      return aux["per_example_loss"], aux["t"], tokens

    @functools.cache
    def codec():
      return latent_codec.load(config.autoencoder) if config.get("autoencoder") else None

    def sampler(params) -> sampling.Sampler:
      return sampling.Sampler(config=config, params=params, model=model, codec=codec())

    keys = self.batch_keys(config)
    return super().predict_fns(config, model, mesh, rules) | {
      "validation_loss": base.on_global_batch(validation_loss, keys, mesh, rules),
      "sampler": sampler,
    }
