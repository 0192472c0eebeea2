"""Classifiers: ViT (images) and ViViT (videos) on fixed-size clips, NaViT on packed rows.

`config.model.name` picks the model; the batches follow: NaViT reads the packed rows of
`vdit.data.pipeline` (native aspect ratio and resolution, token dropping, labels [B, K]), ViT
and ViViT the fixed-size clips of `vdit.data.dense` (`input.size`). The loss is softmax
cross-entropy (`vit.classification_loss`); the `top1` evaluator reports top-1 on the validation
split with `predict_fns()["logits"]`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from vdit import batch_spec, config_checks, models
from vdit.models import vit
from vdit.tasks import base

PACKED_MODELS = ("navit",)
DENSE_MODELS = ("vit", "vivit")


def _packed(config) -> bool:
  return config.model.name in PACKED_MODELS


class Classification(base.Task):
  def batch_keys(self, config) -> tuple[str, ...]:
    return batch_spec.PACKED_KEYS if _packed(config) else batch_spec.DENSE_KEYS

  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    m = config.model
    config_checks.choice("model.name (task classification)", m.name, PACKED_MODELS + DENSE_MODELS)
    config_checks.check_input(config, dense=not _packed(config))
    config_checks.check_model_common(m, mesh_shape)
    config_checks.positive("model.num_classes", m.num_classes)
    if not _packed(config):
      t, h, w = config.input.size
      p = m.get("patch_size") or tuple(m.get("tubelet", (1, 16, 16)))[1]
      tub = tuple(m.tubelet) if m.name == "vivit" else (1, p, p)
      if m.name == "vit" and t != 1:
        raise config_checks.ConfigError(f"input.size={(t, h, w)}: a ViT reads images (T = 1)")
      for dim, size, patch in zip("THW", (t, h, w), tub):
        if size % patch:
          raise config_checks.ConfigError(
            f"input.size {dim}={size} is not a multiple of the model's patch {patch}"
          )

  def dummy_inputs(self, config):
    if _packed(config):
      inp = config.input
      length, k = inp.tokens_per_row, inp.max_examples_per_row
      return (
        jnp.zeros((1, length, models.patch_dim(config)), jnp.float32),
        jnp.zeros((1, length, 3), jnp.int32),
        jnp.ones((1, length), jnp.int32),
        jnp.ones((1, k, 3), jnp.int32),
      )
    return (jnp.zeros((1, *_video_shape(config)), jnp.float32),)

  def make_iterator(self, config, *, train: bool = True, split=None):
    if _packed(config):
      return super().make_iterator(config, train=train, split=split)
    return base.dense_iterator(config, train=train, split=split)

  def logits(self, model, params, batch, config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [..., C], labels [...], valid [...]) of a batch: per slot for NaViT."""
    if _packed(config):
      logits = model.apply(
        {"params": params},
        batch["patches"],
        batch["positions"],
        batch["segment_ids"],
        batch["shapes"],
      )
      return logits, batch["labels"], batch["labels"] >= 0
    video = batch["video"]
    x = video[:, 0] if config.model.name == "vit" else video
    return model.apply({"params": params}, x), batch["label"], batch["valid"]

  def loss(self, model, params, batch, rng, config):
    del rng
    logits, labels, valid = self.logits(model, params, batch, config)
    loss, metrics = vit.classification_loss(logits, labels, valid)
    return loss, {"accuracy": metrics["accuracy"], "examples": metrics["count"]}

  def predict_fns(self, config, model, mesh, rules) -> base.PredictFns:
    """`logits(params, batch)` → (logits [..., C], labels [...], valid [...]), global (the
    `top1` evaluator), and the base `batches`."""
    logits = lambda params, batch: self.logits(model, params, batch, config)
    keys = self.batch_keys(config)
    return super().predict_fns(config, model, mesh, rules) | {
      "logits": base.on_global_batch(logits, keys, mesh, rules)
    }


def _video_shape(config) -> tuple[int, ...]:
  t, h, w = (int(s) for s in config.input.size)
  return (h, w, 3) if config.model.name == "vit" else (t, h, w, 3)
