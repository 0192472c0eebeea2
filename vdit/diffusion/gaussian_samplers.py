"""Samplers for Gaussian diffusion: DDPM ancestral, DDIM (η), DPM-Solver++(2M), DDIM inversion.

Any number of steps (up to N): the sampler visits `steps` timesteps n_0 > … > n_{S−1} = 0
(evenly spaced — respacing, Improved DDPM Sec. 4 — or, for DPM-Solver++, evenly spaced in
log-SNR) and finally steps to the clean level ᾱ = 1 (x = x̂0). Each step is one model call;
the loop is one `lax.fori_loop` inside jit.

  DDPM:  ancestral sampling of the posterior q(x_prev | x_n, x̂0) (Ho et al. 2020, Alg. 2),
         variance β̃ (fixed) or learned (Improved DDPM Eq. 15, respaced).
  DDIM:  x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε̂ + σ·z, σ = η·√β̃ (Song et al. 2021, Eq. 12);
         η = 0 is deterministic and invertible (`ddim_invert`), η = 1 is DDPM.
  DPM-Solver++(2M): multistep 2nd-order solver in the data prediction x̂0 (Lu et al. 2022,
         "DPM-Solver++", Alg. 2); first order on the first and the last step.

`model_fn(x [B, L, P], t [B, L]) -> out [B, L, P or 2P]` with t = n / N (see `gaussian`);
compose guidance inside it. Tokens in `cond_mask` are held at `x_cond` with t = 0.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdit.diffusion import gaussian

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "logsnr"}
TINY = 1e-20


def timesteps(
  schedule: gaussian.Schedule, steps: int, strength: float = 1.0, spacing: str = "uniform"
) -> np.ndarray:
  """`steps` distinct timesteps from round(strength·(N − 1)) down to 0, int32 [S].

  spacing="uniform": evenly spaced indices (Improved DDPM Sec. 4; DDIM's linear τ).
  spacing="logsnr": nearest indices to evenly spaced λ = log(α/σ), made strictly decreasing
  (DPM-Solver, Lu et al. 2022, App. D: its step-size control assumes comparable steps in λ).
  """
  big_n = schedule.num_timesteps
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength} must be in (0, 1]")
  start = int(round(strength * (big_n - 1)))
  if steps > start + 1:
    raise ValueError(
      f"steps={steps} exceeds the {start + 1} timesteps available at strength={strength} "
      f"with num_timesteps={big_n}"
    )
  if steps == 1:
    return np.array([start], np.int32)
  if spacing == "uniform":
    return np.round(np.linspace(start, 0, steps)).astype(np.int32)
  if spacing != "logsnr":
    raise ValueError(f"spacing={spacing!r} is unknown; expected 'uniform' or 'logsnr'")
  lam = 0.5 * np.log(gaussian.snr(schedule.alphas_cumprod[: start + 1]))  # increasing to n = 0
  targets = np.linspace(lam[start], lam[0], steps)
  ts = np.array([np.argmin(np.abs(lam - x)) for x in targets])
  for i in range(1, steps):  # strictly decreasing, leaving room for the remaining steps
    ts[i] = min(ts[i], ts[i - 1] - 1)
  return np.maximum(ts, np.arange(steps - 1, -1, -1)).astype(np.int32)


def levels(schedule: gaussian.Schedule, ts: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per step of `ts`, float32: ᾱ at the visited timestep, ᾱ of the level the step lands on (1
  after the last), and the model's time input n/N."""
  ab = schedule.alphas_cumprod[ts]
  ab_next = np.append(ab[1:], 1.0)
  return tuple(jnp.asarray(a, jnp.float32) for a in (ab, ab_next, ts / schedule.num_timesteps))


def noised(schedule, x0: jax.Array, noise: jax.Array, strength: float) -> jax.Array:
  """The SDEdit start x_n at n = round(strength·(N − 1)) (Meng et al. 2022, Sec. 3.2)."""
  n = int(round(strength * (schedule.num_timesteps - 1)))
  return gaussian.q_sample(x0, noise, float(schedule.alphas_cumprod[n]))


def sample(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  x_start: jax.Array,
  steps: int,
  *,
  schedule: gaussian.Schedule,
  prediction: str = "eps",
  learn_sigma: bool = False,
  method: str = "ddim",
  eta: float = 0.0,
  rng: jax.Array | None = None,
  cond_mask: jax.Array | None = None,
  x_cond: jax.Array | None = None,
  strength: float = 1.0,
) -> jax.Array:
  """Denoises x_start [B, L, P] (noise, or `noised(...)` for SDEdit) to x0 [B, L, P].

  `rng` is needed by the stochastic samplers (DDPM, DDIM with η > 0).
  """
  if method not in SAMPLERS:
    raise ValueError(f"gaussian sampler method={method!r} is unknown; expected one of {SAMPLERS}")
  if (cond_mask is None) != (x_cond is None):
    raise ValueError("cond_mask and x_cond must be given together")
  stochastic = method == "ddpm" or (method == "ddim" and eta > 0)
  if stochastic and rng is None:
    raise ValueError(f"sampler {method!r} (eta={eta}) draws noise: pass rng")
  rng = jax.random.key(0) if rng is None else rng
  p = x_start.shape[-1]
  ts = timesteps(schedule, steps, strength, SPACING[method])
  ab_all, ab_next_all, t_all = levels(schedule, ts)
  ones = jnp.ones(x_start.shape[:-1], jnp.float32)  # [B, L]

  def clamp(x, t):
    if cond_mask is None:
      return x, t
    return jnp.where(cond_mask[..., None], x_cond, x), jnp.where(cond_mask, 0.0, t)

  def denoise(x, i):
    """(x̂0, ε̂, variance-interpolation output or None) of the model at step i."""
    x, t = clamp(x, t_all[i] * ones)
    out = model_fn(x, t).astype(jnp.float32)
    x0, eps = gaussian.to_x0_eps(prediction, out[..., :p], x, ab_all[i])
    return x, x0, eps, (out[..., p:] if learn_sigma else None)

  def body(i, carry):
    x, x0_prev, h_prev = carry
    ab, ab_next = ab_all[i], ab_next_all[i]
    last = i == steps - 1
    x, x0, eps, frac = denoise(x, i)
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    c0, c1, var = gaussian.posterior(ab, ab_next)
    if method == "ddpm":
      log_var = jnp.log(jnp.maximum(var, TINY))
      if frac is not None:
        log_var = gaussian.learned_log_variance(frac, jnp.log(1.0 - ab / ab_next), log_var)
      noise = jnp.where(last, 0.0, jnp.exp(0.5 * log_var)) * z
      return c0 * x0 + c1 * x + noise, x0, h_prev
    if method == "ddim":
      sigma = eta * jnp.sqrt(var)
      direction = jnp.sqrt(jnp.maximum(1.0 - ab_next - sigma**2, 0.0)) * eps
      return jnp.sqrt(ab_next) * x0 + direction + sigma * z, x0, h_prev
    # DPM-Solver++(2M), with λ = log(α/σ): x' = (σ'/σ)·x + α'·(1 − e^{−h})·D.
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    a_next, s_next = jnp.sqrt(ab_next), jnp.sqrt(1.0 - ab_next)
    exp_neg_h = (s_next * a) / (a_next * s)  # 0 on the last step (σ' = 0, λ' = ∞)
    h = jnp.where(last, 1.0, -jnp.log(jnp.maximum(exp_neg_h, TINY)))
    r = h_prev / h
    second = (i > 0) & ~last
    d = jnp.where(second, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
    return (s_next / s) * x + a_next * (1.0 - exp_neg_h) * d, x0, h

  init = (x_start.astype(jnp.float32), jnp.zeros_like(x_start, jnp.float32), jnp.float32(1.0))
  x, _, _ = jax.lax.fori_loop(0, steps, body, init)
  return clamp(x, ones)[0]


def ddim_invert(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  x0: jax.Array,
  steps: int,
  *,
  schedule: gaussian.Schedule,
  prediction: str = "eps",
  strength: float = 1.0,
) -> jax.Array:
  """Runs deterministic DDIM (η = 0) backwards: clean x0 [B, L, P] → x at the first timestep.

  Each step re-noises x̂0 with the ε̂ the model predicts at the destination timestep from the
  current, less noisy x (the standard approximation ε̂(x_{n−1}, n) ≈ ε̂(x_n, n); Song et al.
  2021, Sec. 4.3 / Eq. 14), so `sample(..., method="ddim", eta=0)` maps the result back to
  x0 up to O(1/steps).
  """
  p = x0.shape[-1]
  ab_all, ab_next_all, t_all = levels(schedule, timesteps(schedule, steps, strength))
  ones = jnp.ones(x0.shape[:-1], jnp.float32)

  def body(j, x):
    i = steps - 1 - j  # from the last (least noisy) sampling step back to the first
    ab, ab_here = ab_all[i], ab_next_all[i]  # destination level, current level
    out = model_fn(x, t_all[i] * ones).astype(jnp.float32)[..., :p]
    _, eps = gaussian.to_x0_eps(prediction, out, x, ab)
    x0_hat = (x - jnp.sqrt(1.0 - ab_here) * eps) / jnp.sqrt(ab_here)
    return jnp.sqrt(ab) * x0_hat + jnp.sqrt(1.0 - ab) * eps

  return jax.lax.fori_loop(0, steps, body, x0.astype(jnp.float32))
