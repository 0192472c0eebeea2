"""Gaussian diffusion (DDPM) on packed rows: schedules, parameterizations, hybrid loss.

Ho et al. 2020 "DDPM" (Eqs. 4, 6, 7, 12; Sec. 3.3 decoder); Nichol & Dhariwal 2021 "Improved
DDPM" (Sec. 3.1 learned σ and L_hybrid = L_simple + λ·L_vlb; Sec. 3.2 cosine schedule, Eq. 17);
Salimans & Ho 2022 "Progressive Distillation" (Sec. 4, v-prediction); DiT (Peebles & Xie 2023,
Sec. 3.1) trains exactly this: ε-prediction, learned σ, linear schedule, N = 1000.

Discrete time n = 0 … N−1, q(x_n | x0) = N(√ᾱ_n·x0, (1 − ᾱ_n)·I). The model receives the time
t = n / N ∈ [0, 1) per token (its embedding scales t by 1000, so N = 1000 feeds DiT's integer
timesteps); clean conditioning tokens get t = 0. With α = √ᾱ, σ = √(1 − ᾱ):
  x_n = α·x0 + σ·ε,   v = α·ε − σ·x0,   x0 = α·x_n − σ·v,   ε = σ·x_n + α·v.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdit.diffusion import guidance, token_losses
from vdit.segments import per_token

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
COSINE_OFFSET = 0.008  # s in Improved DDPM, Eq. 17
MAX_BETA = 0.999  # Improved DDPM clips cosine betas "to prevent singularities at t = T"


class Schedule(NamedTuple):
  """Float64 numpy tables, each [N] (DDPM Eqs. 4, 6, 7)."""

  betas: np.ndarray  # β_n
  alphas_cumprod: np.ndarray  # ᾱ_n = Π_{m ≤ n} (1 − β_m)
  alphas_cumprod_prev: np.ndarray  # ᾱ_{n−1}, with ᾱ_{−1} = 1
  posterior_mean_coef1: np.ndarray  # of x0 in the mean of q(x_{n−1} | x_n, x0)
  posterior_mean_coef2: np.ndarray  # of x_n
  posterior_variance: np.ndarray  # β̃_n (0 at n = 0)
  posterior_log_variance_clipped: np.ndarray  # log β̃_n with β̃_0 := β̃_1 (Improved DDPM)

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)


def betas(kind: str, num_timesteps: int) -> np.ndarray:
  """β_n [N]: "linear" 1e-4 → 0.02 scaled by 1000/N (DDPM Sec. 4, Improved DDPM App. A), or
  "cosine" with ᾱ(t) ∝ cos²((t + s)/(1 + s)·π/2) and β clipped at 0.999 (Improved DDPM Eq. 17).
  """
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps={num_timesteps} must be >= 2")
  if kind == "linear":
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if kind == "cosine":
    f = lambda u: np.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2
    n = np.arange(num_timesteps, dtype=np.float64)
    return np.minimum(1.0 - f((n + 1) / num_timesteps) / f(n / num_timesteps), MAX_BETA)
  raise ValueError(f"noise schedule kind={kind!r} is unknown; expected one of {SCHEDULES}")


def posterior(ab, ab_prev):
  """q(x_prev | x_cur, x0) = N(c0·x0 + c1·x_cur, var) between noise levels ᾱ ≤ ᾱ_prev.

  DDPM Eq. 7 for the one-step case, and for any pair of levels (respaced sampling, Improved
  DDPM Sec. 4): the step's β = 1 − ᾱ/ᾱ_prev. Works on numpy and jax arrays.
  Returns (c0, c1, var).
  """
  beta = 1.0 - ab / ab_prev
  c0 = ab_prev**0.5 * beta / (1.0 - ab)
  c1 = (1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab)
  return c0, c1, beta * (1.0 - ab_prev) / (1.0 - ab)


def make_schedule(kind: str = "linear", num_timesteps: int = 1000) -> Schedule:
  b = betas(kind, num_timesteps)
  ab = np.cumprod(1.0 - b)
  ab_prev = np.append(1.0, ab[:-1])
  c0, c1, var = posterior(ab, ab_prev)
  return Schedule(b, ab, ab_prev, c0, c1, var, np.log(np.append(var[1], var[1:])))


def snr(ab):
  """Signal-to-noise ratio ᾱ / (1 − ᾱ) (Kingma et al. 2021, Eq. 1)."""
  return ab / (1.0 - ab)


def table(values: np.ndarray, n: jax.Array) -> jax.Array:
  """values[n] as float32 for integer indices n of any shape (inside jit)."""
  return jnp.asarray(values, jnp.float32)[n]


# ---------------------------------------------------------------------------------------------
# Parameterizations (Salimans & Ho 2022, Sec. 4 and App. D).
# ---------------------------------------------------------------------------------------------
def q_sample(x0: jax.Array, noise: jax.Array, ab: jax.Array) -> jax.Array:
  """x_n = √ᾱ·x0 + √(1 − ᾱ)·ε; ab broadcasts against x0 (e.g. [B, L, 1])."""
  return ab**0.5 * x0 + (1.0 - ab) ** 0.5 * noise


def target(prediction: str, x0: jax.Array, noise: jax.Array, ab: jax.Array) -> jax.Array:
  """What the model regresses: ε, v = √ᾱ·ε − √(1 − ᾱ)·x0, or x0."""
  if prediction == "eps":
    return noise
  if prediction == "v":
    return ab**0.5 * noise - (1.0 - ab) ** 0.5 * x0
  if prediction == "x0":
    return x0
  raise ValueError(f"prediction={prediction!r} is unknown; expected one of {PREDICTIONS}")


def to_x0_eps(prediction: str, out: jax.Array, x_t: jax.Array, ab: jax.Array):
  """(x̂0, ε̂) from a model output of any parameterization at noise level ab."""
  a, s = ab**0.5, (1.0 - ab) ** 0.5
  if prediction == "eps":
    return (x_t - s * out) / a, out
  if prediction == "v":
    return a * x_t - s * out, s * x_t + a * out
  if prediction == "x0":
    return out, (x_t - a * out) / s
  raise ValueError(f"prediction={prediction!r} is unknown; expected one of {PREDICTIONS}")


def learned_log_variance(frac_out: jax.Array, log_beta, log_var_min):
  """log Σ = f·log β + (1 − f)·log β̃, f = (out + 1)/2 (Improved DDPM, Eq. 15)."""
  frac = (frac_out + 1.0) / 2.0
  return frac * log_beta + (1.0 - frac) * log_var_min


# ---------------------------------------------------------------------------------------------
# The variational bound terms (DDPM Eq. 5; Improved DDPM Sec. 3.1).
# ---------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(x, mean, log_scale, bins: int = 256):
  """log P(x) of data in [−1, 1] quantized to `bins` levels under N(mean, e^(2·log_scale)).

  The DDPM decoder L_0 (Ho et al. 2020, Sec. 3.3, Eq. 13); the edge bins extend to ±∞.
  """
  half = 1.0 / (bins - 1)
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + half)
  lower = inv_std * (x - mean - half)
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  delta = jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower)
  mid = jnp.log(jnp.maximum(delta, 1e-12))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, mid))


def vlb_terms(
  schedule: Schedule,
  x0: jax.Array,
  x_t: jax.Array,
  n: jax.Array,
  x0_pred: jax.Array,
  frac_out: jax.Array,
) -> jax.Array:
  """L_vlb per token [B, L] in bits per dimension (Improved DDPM, Sec. 3.1).

  KL(q(x_{n−1} | x_n, x0) ‖ p(x_{n−1} | x_n)) for n > 0 and the decoder NLL for n = 0, each
  averaged over P. x0, x_t, x0_pred, frac_out: [B, L, P]; n: [B, L]. The caller passes a
  stop-gradient x0_pred so this term trains only the variance (Improved DDPM, Sec. 3.1).
  """
  n3 = n[..., None]
  c0 = table(schedule.posterior_mean_coef1, n3)
  c1 = table(schedule.posterior_mean_coef2, n3)
  true_mean = c0 * x0 + c1 * x_t
  true_logvar = table(schedule.posterior_log_variance_clipped, n3)
  model_mean = c0 * x0_pred + c1 * x_t
  model_logvar = learned_log_variance(frac_out, table(np.log(schedule.betas), n3), true_logvar)
  kl = jnp.mean(normal_kl(true_mean, true_logvar, model_mean, model_logvar), axis=-1)
  nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar), -1)
  return jnp.where(n == 0, nll, kl) / np.log(2.0)


# ---------------------------------------------------------------------------------------------
# The training loss on a packed batch.
# ---------------------------------------------------------------------------------------------
def loss(
  apply_fn: Callable[[jax.Array, jax.Array, dict], jax.Array],
  batch: dict,
  rng: jax.Array,
  *,
  schedule: Schedule,
  prediction: str = "eps",
  learn_sigma: bool = False,
  text_dropout: float = 0.1,
) -> tuple[jax.Array, dict]:
  """L_simple (+ L_vlb with learned σ) of a packed batch (DDPM Eq. 14; Improved DDPM Eq. 16).

  The packed-batch contract of `flow.loss`: one timestep n ~ U{0 … N−1} per example [B, K]
  gathered to tokens, noise per token, `cond_mask` tokens clean at t = 0, caption/label
  dropout for guidance, the error averaged over P then over `loss_mask` tokens.
  `apply_fn(x_t [B, L, P], t [B, L], batch) -> [B, L, P]` (or [B, L, 2P] with `learn_sigma`:
  the prediction, then the variance interpolation of Improved DDPM Eq. 15). With learned σ
  the per-token loss is mse + vlb, the vlb seeing a stop-gradient prediction (as DiT, λ = 1
  on the mean-over-P bits; Improved DDPM's λ = 0.001 is the same up to its sum-vs-mean scale).
  Returns (loss, metrics) like `flow.loss`: `per_example_loss` [B, K], `t` [B, K] = n / N,
  `dropped` [B, K], `num_tokens`, and `vlb` (0 without learned σ).
  """
  x0 = batch["patches"].astype(jnp.float32)  # [B, L, P]
  seg, cond = batch["segment_ids"], batch["cond_mask"]  # [B, L]
  b, k = batch["shapes"].shape[:2]
  big_n = schedule.num_timesteps
  n_rng, noise_rng, drop_rng = jax.random.split(rng, 3)

  n_ex = jax.random.randint(n_rng, (b, k), 0, big_n)  # [B, K]
  n_tok = per_token(n_ex, seg)  # [B, L]
  ab = table(schedule.alphas_cumprod, n_tok)[..., None]  # [B, L, 1]
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = jnp.where(cond[..., None], x0, q_sample(x0, noise, ab))
  t_tok = jnp.where(cond, 0.0, n_tok / big_n)

  model_batch, dropped = guidance.drop_conditions(drop_rng, batch, text_dropout)
  out = apply_fn(x_t, t_tok, model_batch).astype(jnp.float32)
  p = x0.shape[-1]
  want = 2 * p if learn_sigma else p
  if out.shape[-1] != want:
    raise ValueError(
      f"the model returned {out.shape[-1]} channels; gaussian diffusion with "
      f"learn_sigma={learn_sigma} expects {want} (patch size P={p}"
      + (", then P variance channels)" if learn_sigma else ")")
    )
  pred = out[..., :p]
  err = jnp.mean(jnp.square(pred - target(prediction, x0, noise, ab)), axis=-1)  # [B, L]
  vlb = jnp.zeros_like(err)
  if learn_sigma:
    x0_pred, _ = to_x0_eps(prediction, jax.lax.stop_gradient(pred), x_t, ab)
    vlb = vlb_terms(schedule, x0, x_t, n_tok, x0_pred, out[..., p:])
  value, per_example, num_tokens = token_losses.masked_mean(err + vlb, batch["loss_mask"], seg, k)
  vlb_mean = token_losses.masked_mean(vlb, batch["loss_mask"], seg, k)[0]
  metrics = dict(
    per_example_loss=per_example,
    t=n_ex / big_n,
    dropped=dropped,
    num_tokens=num_tokens,
    vlb=vlb_mean,
  )
  return value, metrics
