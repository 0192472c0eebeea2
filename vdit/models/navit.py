"""NaViT: a ViT over packed images of native resolution (Dehghani et al. 2023, "Patch n' Pack").

Input is the packed batch of DESIGN.md: patches [B, L, P], positions [B, L, 3] (t, h, w; t is 0
for images and ignored), segment_ids [B, L] (1..K, 0 = padding) and shapes [B, K, 3] (each
example's patch grid). Attention never crosses examples (Sec. 3.1, "masked self attention"),
positions are factorized learned embeddings φ_h(h) + φ_w(w) of absolute or fractional
coordinates (Sec. 3.1, "factorized & fractional positional embeddings"), pooling is a per-example
attention probe ("masked pooling"), so the logits are per example: [B, K, classes].
Continuous token dropping (Sec. 3.2) is `drop_tokens`, a pure function on packed rows that
keeps each example's original coordinates.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit import segments
from vdit.axes import BATCH, EMBED, LENGTH, PATCH
from vdit.models import layers, vit
from vdit.models.vit import VARIANTS, Encoder, MAPHead, class_head, classification_loss

__all__ = ["NaViT", "FactorizedPositionEmbedding", "drop_tokens", "classification_loss"]
POSEMB_KINDS = ("absolute", "fractional")


class FactorizedPositionEmbedding(nn.Module):
  """Learned φ_h(h) + φ_w(w) (NaViT, Sec. 3.1, the "sum" combination).

  "absolute": a table row per coordinate, 0..size−1 (larger coordinates use the last row).
  "fractional": the coordinate divided by the example's grid size, in [0, 1), bucketed into
  `size` rows, so any resolution maps onto the same table (aspect-ratio aware, length-agnostic).
  """

  size: int  # rows per axis: max grid side (absolute) or number of buckets (fractional)
  kind: str = "fractional"  # see POSEMB_KINDS
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, positions, grid, width: int):
    # positions: [B, L, 2] int (h, w); grid: [B, L, 2] int, the grid of each token's example.
    if self.kind not in POSEMB_KINDS:
      raise ValueError(f"posemb kind={self.kind!r} is unknown; expected one of {POSEMB_KINDS}")
    if self.kind == "fractional":
      frac = positions.astype(jnp.float32) / jnp.maximum(grid, 1).astype(jnp.float32)
      index = jnp.floor(frac * self.size).astype(jnp.int32)
    else:
      index = positions.astype(jnp.int32)
    index = jnp.clip(index, 0, self.size - 1)
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, EMBED))
    out = 0.0
    for axis, name in enumerate(("h", "w")):
      table = self.param(f"pos_{name}", init, (self.size, width), self.param_dtype)
      out = out + jnp.take(table, index[..., axis], axis=0)
    return out  # [B, L, D]


def drop_tokens(
  rng: jax.Array, rate: jax.Array | float, segment_ids: jax.Array, *arrays: jax.Array
) -> tuple[jax.Array, ...]:
  """Continuous token dropping inside packed rows (NaViT, Sec. 3.2), as a pure function.

  Each token of example k is kept with probability 1 − rate[b, k] (rate: float or [B, K]; the
  rate may differ per example, e.g. by resolution). Kept tokens move to the front of their row
  in their original order (so every example stays contiguous) and the freed tail becomes
  padding (segment 0, zeros). `arrays` ([B, L, ...], e.g. patches and positions) follow the
  same permutation; positions therefore keep the original coordinates.
  Returns (segment_ids, *arrays, keep) where keep: [B, L] bool marks the kept tokens in the
  *input* order.
  """
  rate = jnp.asarray(rate, jnp.float32)
  token_rate = rate if rate.ndim == 0 else segments.per_token(rate, segment_ids)
  keep = jnp.logical_and(jax.random.uniform(rng, segment_ids.shape) >= token_rate, segment_ids > 0)
  order = jnp.argsort(jnp.logical_not(keep), axis=1, stable=True)  # kept first, in order
  kept_sorted = jnp.take_along_axis(keep, order, axis=1)

  def gather(a):
    index = order.reshape(order.shape + (1,) * (a.ndim - 2))
    out = jnp.take_along_axis(a, index, axis=1)
    mask = kept_sorted.reshape(kept_sorted.shape + (1,) * (a.ndim - 2))
    return jnp.where(mask, out, jnp.zeros_like(out))

  return (gather(segment_ids), *(gather(a) for a in arrays), keep)


class NaViT(layers.Runtime):
  """Packed patches -> per-example logits [B, K, classes] (features [B, K, D] if classes=0)."""

  num_classes: int
  width: int  # D
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  posemb_kind: str = "fractional"  # see POSEMB_KINDS
  posemb_size: int = 64  # table rows per axis (max grid side, or fractional buckets)

  @classmethod
  def from_variant(cls, variant: str, num_classes: int, **kwargs) -> "NaViT":
    """NaViT.from_variant("B", 1000): ViT sizes by name (the patch size is the data's)."""
    size = variant.partition("/")[0]
    if size not in VARIANTS:
      raise ValueError(f"variant={variant!r}: size {size!r} is not one of {sorted(VARIANTS)}")
    return cls(num_classes=num_classes, **{**VARIANTS[size], **kwargs})

  @nn.compact
  def __call__(
    self,
    patches: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    shapes: jax.Array,
  ) -> jax.Array:
    # patches: [B, L, P]; positions: [B, L, 3] (t, h, w); segment_ids: [B, L]; shapes: [B, K, 3].
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if positions.shape[-1] != 3 or shapes.shape[-1] != 3:
      raise ValueError(
        f"positions {tuple(positions.shape)} and shapes {tuple(shapes.shape)} must end in 3 "
        "(t, h, w)"
      )
    x = layers.dense(self.width, (PATCH, EMBED), name="embedding", **kw)(patches)  # [B, L, D]
    grid = segments.per_token(shapes[..., 1:], segment_ids)  # [B, L, 2]
    pos = FactorizedPositionEmbedding(
      self.posemb_size, self.posemb_kind, self.param_dtype, name="posemb"
    )(positions[..., 1:], grid, self.width)
    x = nn.with_logical_constraint(x + pos.astype(x.dtype), (BATCH, LENGTH, EMBED))
    x = Encoder(self.depth, name="encoder", **vit.options(self, vit.ENCODER_FIELDS))(x, segment_ids)
    pooled = MAPHead(name="map_head", **vit.options(self, vit.BLOCK_FIELDS))(
      x, segment_ids, num_queries=shapes.shape[1]
    )  # [B, K, D]
    if self.num_classes <= 0:
      return pooled
    return class_head(self.num_classes, **kw)(pooled)
