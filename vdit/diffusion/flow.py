"""Rectified flow / flow matching on packed rows (pure, jit-friendly functions of arrays).

Convention (Liu et al. 2022 "Flow Straight and Fast"; Esser et al. 2024 "SD3", Sec. 2):
x_t = (1 − t)·x0 + t·ε with t = 0 data and t = 1 noise; the model predicts the velocity
v = dx_t/dt = ε − x0, and sampling integrates dx/dt = v from t = 1 down to t = 0.

Everything per example (time, shift, guidance dropout) is drawn per segment, [B, K], and
gathered to tokens with `segment_ids` (DESIGN.md, "The packed batch").
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdit.models.layers import per_token

__all__ = [
  "NULL_ID",
  "PAD_ID",
  "cfg_velocity",
  "drop_text",
  "euler_sample",
  "interpolate",
  "loss",
  "per_token",
  "sample_time",
  "shift_time",
]

PAD_ID = 0  # text token ids (DESIGN.md): PAD=0, BOS=1, NULL=2, words >= 3
NULL_ID = 2
TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_time(
  rng: jax.Array,
  shape: tuple[int, ...],
  kind: str = "uniform",
  mean: float = 0.0,
  std: float = 1.0,
) -> jax.Array:
  """Training times in (0, 1): uniform, or logit-normal σ(N(mean, std²)) (SD3, Sec. 3.1)."""
  if kind == "uniform":
    return jax.random.uniform(rng, shape)
  if kind == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))
  raise ValueError(f"time sampling kind={kind!r} is unknown; expected one of {TIME_SAMPLINGS}")


def shift_time(t: jax.Array, shift: jax.Array | float) -> jax.Array:
  """Timestep shift t' = s·t / (1 + (s − 1)·t) toward noise for s > 1 (SD3, Sec. 5.3.2)."""
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(shapes: jax.Array, base_tokens: int) -> jax.Array:
  """Per-example shift sqrt(tokens / base_tokens) from patch grids [B, K, 3] -> [B, K].

  Larger videos keep more signal at a given t, so they need more noise (SD3, Sec. 5.3.2).
  Empty slots (grid 0) get shift 1.
  """
  tokens = jnp.prod(shapes, axis=-1).astype(jnp.float32)
  return jnp.where(tokens > 0, jnp.sqrt(tokens / base_tokens), 1.0)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 − t)·x0 + t·ε; x0, noise: [B, L, P]; t: [B, L]."""
  t = t[..., None]
  return (1 - t) * x0 + t * noise


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


def loss(
  apply_fn: Callable[[jax.Array, jax.Array, dict], jax.Array],
  batch: dict,
  rng: jax.Array,
  *,
  time_sampling: str = "uniform",
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
  shift_base_tokens: int | None = None,
  text_dropout: float = 0.1,
) -> tuple[jax.Array, dict]:
  """Flow-matching loss ‖v_θ(x_t, t) − (ε − x0)‖² on a packed batch (SD3, Eq. 2 with v).

  `apply_fn(x_t [B, L, P], t [B, L], batch) -> v [B, L, P]` runs the model; it receives the
  batch *after* guidance dropout (read `text_tokens`, `text_segment_ids`, `labels` from it).
  Uses batch keys `patches`, `segment_ids`, `shapes`, `text_tokens`, `text_segment_ids`,
  `labels` (optional), `cond_mask`, `loss_mask`.

  One time per example ([B, K], optionally shifted by resolution); independent noise per
  token; `cond_mask` tokens stay clean (x_t = x0, t = 0). With probability `text_dropout` an
  example's caption becomes [NULL] and its label −1 (null), for classifier-free guidance.
  The loss is the squared error averaged over P, then over `loss_mask` tokens.
  Returns (loss, metrics) with metrics `per_example_loss` [B, K] (0 for empty examples),
  `t` [B, K], `dropped` [B, K] and `num_tokens`.
  """
  x0 = batch["patches"].astype(jnp.float32)  # [B, L, P]
  seg = batch["segment_ids"]  # [B, L]
  cond = batch["cond_mask"]  # [B, L]
  b, k = batch["shapes"].shape[:2]
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)

  t_ex = sample_time(t_rng, (b, k), time_sampling, logit_mean, logit_std)  # [B, K]
  if shift_base_tokens is not None:
    t_ex = shift_time(t_ex, resolution_shift(batch["shapes"], shift_base_tokens))
  t_tok = jnp.where(cond, 0.0, per_token(t_ex, seg))  # [B, L]
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = jnp.where(cond[..., None], x0, interpolate(x0, noise, t_tok))
  target = noise - x0

  tokens, text_seg, dropped = drop_text(
    drop_rng, batch["text_tokens"], batch["text_segment_ids"], k, text_dropout
  )
  model_batch = dict(batch, text_tokens=tokens, text_segment_ids=text_seg)
  if "labels" in batch:
    model_batch["labels"] = jnp.where(dropped, -1, batch["labels"])
  v = apply_fn(x_t, t_tok, model_batch).astype(jnp.float32)

  err = jnp.mean(jnp.square(v - target), axis=-1)  # [B, L]
  weight = batch["loss_mask"].astype(jnp.float32)  # [B, L]
  num_tokens = jnp.sum(weight)
  value = jnp.sum(err * weight) / jnp.maximum(num_tokens, 1.0)
  onehot = (seg[..., None] == jnp.arange(1, k + 1)) * weight[..., None]  # [B, L, K]
  per_example = jnp.einsum("bl,blk->bk", err, onehot) / jnp.maximum(onehot.sum(1), 1.0)
  metrics = dict(per_example_loss=per_example, t=t_ex, dropped=dropped, num_tokens=num_tokens)
  return value, metrics


def cfg_velocity(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance v_u + s·(v_c − v_u) (Ho & Salimans 2022, Eq. 6); s=1: v_c."""
  return v_uncond + scale * (v_cond - v_uncond)


def euler_sample(
  velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
  x1: jax.Array,
  steps: int,
  *,
  cond_mask: jax.Array | None = None,
  x_cond: jax.Array | None = None,
  shift: jax.Array | float = 1.0,
) -> jax.Array:
  """Euler integration of dx/dt = v(x, t) from t = 1 (x1, noise) to t = 0 (data).

  `velocity_fn(x [B, L, P], t [B, L]) -> v [B, L, P]` (compose guidance inside it, e.g. with
  `cfg_velocity`). Uniform steps in t, optionally shifted (`shift_time`; a scalar or a
  per-token [B, L] array). Tokens in `cond_mask` [B, L] are held at `x_cond` [B, L, P] with
  t = 0 (image-to-video, extension, interpolation). Returns x0 [B, L, P].
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if (cond_mask is None) != (x_cond is None):
    raise ValueError("cond_mask and x_cond must be given together")
  ones = jnp.ones(x1.shape[:-1], jnp.float32)  # [B, L]

  def clamp(x, t):
    if cond_mask is None:
      return x, t
    return jnp.where(cond_mask[..., None], x_cond, x), jnp.where(cond_mask, 0.0, t)

  def body(i, x):
    s_cur = 1.0 - i / steps
    s_next = 1.0 - (i + 1) / steps
    t_cur = shift_time(s_cur * ones, shift)
    t_next = shift_time(s_next * ones, shift)
    x, t_in = clamp(x, t_cur)
    v = velocity_fn(x, t_in)
    return x + (t_next - t_cur)[..., None] * v.astype(x.dtype)

  x = jax.lax.fori_loop(0, steps, body, x1.astype(jnp.float32))
  return clamp(x, ones)[0]
