"""Classifier-free guidance: null-condition dropout in training, guided outputs in sampling.

Ho & Salimans 2022 "Classifier-Free Diffusion Guidance" (Sec. 3.2: one model trained with the
condition dropped to a null token; Eq. 6: the guided prediction). The guidance interval is from
Kynkäänniemi et al. 2024 "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality": guide only at medium noise levels, lo ≤ t ≤ hi.

Per-example dropout is drawn [B, K] and gathered to tokens through segment ids (DESIGN.md,
"The packed batch"). Pure functions of arrays.
"""

import jax
import jax.numpy as jnp

from vdit import batch_spec
from vdit.data.tokenizer import NULL_ID, PAD_ID  # text ids (DESIGN.md): the tokenizer's
from vdit.segments import per_token

NULL_LABEL = batch_spec.PACKED["labels"].pad  # class label of the null condition (labels [B, K])


def drop_text(
  rng: jax.Array,
  text_tokens: jax.Array,
  text_segment_ids: jax.Array,
  num_examples: int,
  rate: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Classifier-free guidance dropout of captions (Ho & Salimans 2022, Sec. 3.2).

  Each example is dropped with probability `rate`. A dropped caption becomes [NULL]: its
  first token is replaced by NULL_ID and its other tokens turn into padding (id PAD_ID,
  segment 0), so it encodes exactly like the empty caption. text_tokens,
  text_segment_ids: [B, M]. Returns (tokens [B, M], segment_ids [B, M], dropped [B, K] bool).
  """
  b = text_tokens.shape[0]
  dropped = jax.random.uniform(rng, (b, num_examples)) < rate  # [B, K]
  in_dropped = per_token(dropped, text_segment_ids) & (text_segment_ids > 0)  # [B, M]
  first = jnp.concatenate(
    [
      jnp.ones_like(text_segment_ids[:, :1], bool),
      text_segment_ids[:, 1:] != text_segment_ids[:, :-1],
    ],
    axis=1,
  )
  tokens = jnp.where(in_dropped, jnp.where(first, NULL_ID, PAD_ID), text_tokens)
  segment_ids = jnp.where(in_dropped & ~first, 0, text_segment_ids)
  return tokens, segment_ids, dropped


def drop_conditions(rng: jax.Array, batch: dict, rate: float) -> tuple[dict, jax.Array]:
  """The batch the model sees in training: captions → [NULL] and labels → −1, per example.

  One draw per example drops both (text and class), so the model learns the fully
  unconditional prediction that guidance subtracts. Returns (model batch, dropped [B, K]).
  """
  k = batch["shapes"].shape[1]
  tokens, text_seg, dropped = drop_text(
    rng, batch["text_tokens"], batch["text_segment_ids"], k, rate
  )
  model_batch = dict(batch, text_tokens=tokens, text_segment_ids=text_seg)
  if "labels" in batch:
    model_batch["labels"] = jnp.where(dropped, NULL_LABEL, batch["labels"])
  return model_batch, dropped


def cfg(
  out_cond: jax.Array,
  out_uncond: jax.Array,
  scale: jax.Array | float,
  t: jax.Array | None = None,
  interval: tuple[float, float] = (0.0, 1.0),
  channels: int | None = None,
) -> jax.Array:
  """Guided output u + s·(c − u) (Ho & Salimans 2022, Eq. 6); s = 1 gives c.

  out_cond, out_uncond: [B, L, C]; t: [B, L] the model time of each token (noise level,
  1 = pure noise). Guidance applies only where lo ≤ t ≤ hi (Kynkäänniemi et al. 2024, Sec. 3);
  elsewhere the output is the conditional one. Only the first `channels` channels (the
  prediction) are guided; the rest (a learned variance, Improved DDPM Sec. 3.1) are taken
  from the conditional output, as in DiT's `forward_with_cfg`. Every prediction type (ε, v,
  x0, velocity) is an affine function of the output at fixed x_t, so guiding the raw output
  is the same as guiding ε.
  """
  channels = out_cond.shape[-1] if channels is None else channels
  if t is None:
    s = jnp.asarray(scale, out_cond.dtype)
  else:
    lo, hi = interval
    inside = (t >= lo) & (t <= hi)  # [B, L]
    s = jnp.where(inside, scale, 1.0)[..., None].astype(out_cond.dtype)
  c, u = out_cond[..., :channels], out_uncond[..., :channels]
  guided = u + s * (c - u)
  return jnp.concatenate([guided, out_cond[..., channels:]], axis=-1)
