"""Per-token losses of packed rows reduced to a batch loss and per-example losses.

Both objectives (rectified flow, Gaussian diffusion) produce a per-token error [B, L]; this is
the one place it is averaged over `loss_mask` tokens (DESIGN.md, "The packed batch").
"""

import jax
import jax.numpy as jnp


def masked_mean(
  err: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, num_examples: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean of err [B, L] over loss_mask tokens, and per example.

  Returns (loss scalar, per-example loss [B, K] (0 for examples without loss tokens),
  number of loss tokens). The loss is the token-weighted mean, so long videos weigh more.
  """
  weight = loss_mask.astype(jnp.float32)  # [B, L]
  num_tokens = jnp.sum(weight)
  value = jnp.sum(err * weight) / jnp.maximum(num_tokens, 1.0)
  slots = jnp.arange(1, num_examples + 1)
  onehot = (segment_ids[..., None] == slots) * weight[..., None]  # [B, L, K]
  per_example = jnp.einsum("bl,blk->bk", err, onehot) / jnp.maximum(onehot.sum(1), 1.0)
  return value, per_example, num_tokens
