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
