"""Packed rows: per-example values gathered to the tokens of their segment.

A packed row holds K examples as segments 1..K of its L tokens (0: padding; DESIGN.md, "The
packed batch"). The diffusion objectives and the models both need an example's value (its time,
label, shift, grid) at each of its tokens; this is the one place that gather is written.
"""

import jax
import jax.numpy as jnp


def per_token(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Gathers per-example values [B, K, ...] to tokens [B, L, ...] via `segment_ids` (1..K).

  Padding tokens (segment 0) get example 1's value: finite, and masked out downstream.
  """
  index = jnp.clip(segment_ids - 1, 0, values.shape[1] - 1)  # [B, L]
  index = index.reshape(index.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


# Patch-grid sides up to this many patches get distinct `place_ids` (int32 range: K ≤ 2,000).
MAX_GRID_SIDE = 1024


def place_ids(segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
  """One id per (example, spatial position): [B, L] int32, equal for the tokens of one example
  at the same (h, w) in every patch-frame and distinct otherwise; 0 for padding.

  As segment ids of an attention mask they give temporal attention: each token attends along
  time at its own place (TimeSformer's divided space-time attention, Bertasius et al. 2021).
  positions: [B, L, 3] (t, h, w) patch coordinates.
  """
  h, w = positions[..., 1], positions[..., 2]
  ids = (segment_ids * MAX_GRID_SIDE + h) * MAX_GRID_SIDE + w + 1
  return jnp.where(segment_ids > 0, ids, 0).astype(jnp.int32)


def extents(segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
  """The grid (T, H, W) of each token's example, in patches: [B, L, 3] int32 (the largest
  position of its segment + 1; padding tokens get their own padding segment's). positions:
  [B, L, 3]."""
  length = segment_ids.shape[1]

  def row(seg, pos):  # [L], [L, 3]
    top = jax.ops.segment_max(pos, seg, num_segments=length + 1)  # [L + 1, 3]
    return top[seg] + 1

  return jax.vmap(row)(segment_ids, positions).astype(jnp.int32)
