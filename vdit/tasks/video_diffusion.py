"""VideoDiT text-to-video on packed spacetime patches: the Sora recipe (the default task)."""

from typing import Any

import jax
import ml_collections

from vdit import batch_spec, config_checks, sampling
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

  def evaluate(self, config, params, workdir: str, step: int) -> dict[str, Any]:
    """Sample videos for `config.sample.prompts` (GIF + MP4 under workdir/samples/<step>/)."""
    if not config.sample.prompts or jax.process_index() != 0:
      return {}
    paths = sampling.write_config_samples(config, params, workdir, step)
    print("samples written:\n  " + "\n  ".join(paths), flush=True)
    return {"files": paths}
