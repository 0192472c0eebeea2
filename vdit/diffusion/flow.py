"""Rectified flow / flow matching on packed rows (pure, jit-friendly functions of arrays).

Convention (Liu et al. 2022 "Flow Straight and Fast"; Esser et al. 2024 "SD3", Sec. 2):
x_t = (1 − t)·x0 + t·ε with t = 0 data and t = 1 noise; the model predicts the velocity
v = dx_t/dt = ε − x0, and sampling integrates dx/dt = v from t = 1 down to t = 0 (Euler, or
Heun's second-order method; `sample`).

Training times are uniform or logit-normal (SD3, Sec. 3.1), optionally shifted toward noise by
each example's own size (`resolution_shift`, SD3 Sec. 5.3.2); sampling uses the same shift.
Everything per example (time, shift, guidance dropout) is drawn per segment, [B, K], and
gathered to tokens with `segment_ids` (DESIGN.md, "The packed batch").
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdit.diffusion import guidance, token_losses
from vdit.diffusion.conditioning import FRAME_UNIFORM
from vdit.segments import per_token, place_ids

TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun", "stochastic")
# Batch key of an optional degraded clean input that x_t is built from (`loss`), at t ≥
# DEGRADED_T_MIN only: below it the sampler's own inputs already hold the object's outline, and
# the 1/t² weight of restoring it would swamp the loss.
DEGRADED_INPUT = "degraded_patches"
DEGRADED_T_MIN = 0.3


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


def time_from_uniform(
  u: jax.Array, kind: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> jax.Array:
  """`sample_time`'s distribution as a function of uniforms u ∈ (0, 1) (its inverse CDF): u, or
  σ(mean + std·Φ⁻¹(u)) for logit-normal. The per-patch-frame times of diffusion forcing."""
  if kind == "uniform":
    return u
  if kind == "logit_normal":
    u = jnp.clip(u, 1e-6, 1 - 1e-6)
    return jax.nn.sigmoid(mean + std * jax.scipy.special.ndtri(u))
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


def mixed_noise(
  rng: jax.Array,
  shape: tuple[int, ...],
  segment_ids: jax.Array,
  positions: jax.Array,
  correlation: float = 0.0,
  dtype=jnp.float32,
) -> jax.Array:
  """Standard normal noise [B, L, P] for packed patches whose tokens at one place of one example
  share a fraction `correlation` of their variance across patch-frames: PYoCo's mixed noise
  (Ge et al. 2023, "Preserve Your Own Correlation", Eq. 4), ε = √c·ε_place + √(1 − c)·ε_token.

  Every element stays N(0, 1); a token and the token at the same (h, w) in another patch-frame
  of its example have correlation c, so a denoiser that decides content from its own noise
  decides alike along time. 0 = independent noise (the same draw as `jax.random.normal(rng)`).
  segment_ids: [B, L]; positions: [B, L, 3] (t, h, w) patch coordinates.
  """
  if not correlation:
    return jax.random.normal(rng, shape, dtype)
  if not 0.0 < correlation < 1.0:
    raise ValueError(f"noise correlation={correlation} must be in [0, 1)")
  own_rng, place_rng = jax.random.split(rng)
  own = jax.random.normal(own_rng, shape, dtype)
  places = place_ids(segment_ids, positions)  # [B, L]: one id per (example, h, w)

  def place_noise(row, place):  # the same draw for every token of one place of one row
    return jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(place_rng, row), place), shape[-1:], dtype
    )

  rows = jnp.broadcast_to(jnp.arange(shape[0])[:, None], places.shape)
  shared = jax.vmap(jax.vmap(place_noise))(rows, places)
  return jnp.sqrt(correlation) * shared + jnp.sqrt(1.0 - correlation) * own


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 − t)·x0 + t·ε; x0, noise: [B, L, P]; t: [B, L]."""
  t = t[..., None]
  return (1 - t) * x0 + t * noise


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
  t_min: float | None = None,
  self_condition: float = 0.0,
  noise_correlation: float = 0.0,
  input_perturbation: float = 0.0,
) -> tuple[jax.Array, dict]:
  """Flow-matching loss ‖v_θ(x_t, t) − (ε − x0)‖² on a packed batch (SD3, Eq. 2 with v).

  `apply_fn(x_t [B, L, P], t [B, L], batch) -> v [B, L, P]` runs the model; it receives the
  batch *after* guidance dropout (read `text_tokens`, `text_segment_ids`, `labels` from it).
  Uses batch keys `patches`, `segment_ids`, `shapes`, `text_tokens`, `text_segment_ids`,
  `labels` (optional), `cond_mask`, `loss_mask`.

  One time per example ([B, K]); with `shift_base_tokens` it is shifted by each example's own
  size, `resolution_shift(shapes)`, so two videos of different sizes packed in one row get
  different noise levels. Diffusion forcing (`conditioning`, key `FRAME_UNIFORM` in the batch):
  its tokens take their patch-frame's time instead, the same distribution and shift.
  Independent noise per token; `cond_mask` tokens stay clean
  (x_t = x0, t = 0); with `noise_correlation` the noise is `mixed_noise` (positions from the
  batch). With probability `text_dropout` an example's caption becomes [NULL] and
  its label −1 (null), for classifier-free guidance. The loss is the squared error averaged
  over P, then over `loss_mask` tokens.

  Self-conditioning (`self_condition` > 0, Chen et al. 2023 "Analog Bits", Sec. 3.2): then
  `apply_fn(x_t, t, batch, x0_prev)` also takes an estimate of x0. With probability
  `self_condition` per batch the model first runs with x0_prev = 0 and its estimate (gradient
  stopped) is fed to the pass that is trained; otherwise x0_prev = 0 (the sampler's first step).

  Input perturbation (`input_perturbation` = γ > 0, Ning et al. 2023 "Input Perturbation Reduces
  Exposure Bias in Diffusion Models"): the model reads x_t built from noise + γ·ξ (ξ another
  draw of the same kind) while the target stays that of the unperturbed x_t, so it learns not
  to trust its input more than the sampler's own (imperfect) inputs deserve.

  A degraded clean input (batch key `DEGRADED_INPUT`, [B, L, P], e.g.
  `video_diffusion.blur_patches`): x_t is built from it instead of x0 where t ≥ `DEGRADED_T_MIN`,
  while the target stays the velocity whose x̂0 is the true x0, so the model learns to restore
  from the words what the degradation removed (the sampler's own mid-path inputs are such
  blurred objects; docs/recipe.md, rows BL).

  Returns (loss, metrics) with metrics `per_example_loss` [B, K] (0 for empty examples),
  `t` [B, K], `dropped` [B, K] and `num_tokens`.
  """
  x0 = batch["patches"].astype(jnp.float32)  # [B, L, P]
  seg = batch["segment_ids"]  # [B, L]
  cond = batch["cond_mask"]  # [B, L]
  b, k = batch["shapes"].shape[:2]
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)

  t_ex = sample_time(t_rng, (b, k), time_sampling, logit_mean, logit_std)  # [B, K]
  if shift_base_tokens:
    t_ex = shift_time(t_ex, resolution_shift(batch["shapes"], shift_base_tokens))
  t_tok = per_token(t_ex, seg)  # [B, L]
  if FRAME_UNIFORM in batch:  # diffusion forcing: a time per patch-frame (`conditioning`)
    u = batch[FRAME_UNIFORM]
    t_frame = time_from_uniform(jnp.maximum(u, 0.0), time_sampling, logit_mean, logit_std)
    if shift_base_tokens:
      shift = resolution_shift(batch["shapes"], shift_base_tokens)
      t_frame = shift_time(t_frame, per_token(shift, seg))
    t_tok = jnp.where(u >= 0, t_frame, t_tok)
  t_tok = jnp.where(cond, 0.0, t_tok)
  noise = mixed_noise(noise_rng, x0.shape, seg, batch["positions"], noise_correlation, x0.dtype)
  degraded = batch.get(DEGRADED_INPUT)
  x_in = x0
  if degraded is not None:  # only where t ≥ DEGRADED_T_MIN (the target's weight stays bounded)
    x_in = jnp.where((t_tok >= DEGRADED_T_MIN)[..., None], degraded.astype(jnp.float32), x0)
  x_t = jnp.where(cond[..., None], x0, interpolate(x_in, noise, t_tok))
  if t_min is None:
    target = noise - x0
  else:
    target = (x_t - x0) / jnp.maximum(t_tok, t_min)[..., None]
  if degraded is not None:  # the velocity whose x̂0 is the true x0 (not the degraded one)
    restore = (x_t - x0) / jnp.maximum(t_tok, DEGRADED_T_MIN)[..., None]
    target = jnp.where((t_tok >= DEGRADED_T_MIN)[..., None], restore, target)
  if input_perturbation:  # its own stream (fold_in): the other draws keep their numbers
    extra = mixed_noise(
      jax.random.fold_in(rng, 4), x0.shape, seg, batch["positions"], noise_correlation, x0.dtype
    )
    x_t = jnp.where(cond[..., None], x0, x_t + input_perturbation * t_tok[..., None] * extra)

  model_batch, dropped = guidance.drop_conditions(drop_rng, batch, text_dropout)
  if self_condition:
    zeros = jnp.zeros_like(x0)

    def estimate():
      v0 = apply_fn(x_t, t_tok, model_batch, zeros).astype(jnp.float32)
      return jax.lax.stop_gradient(x0_estimate(x_t, v0, t_tok, t_min or 0.0))

    # Its own stream (not a 4th split): runs without self-conditioning keep their numbers.
    use = jax.random.uniform(jax.random.fold_in(rng, 3)) < self_condition
    x0_prev = jax.lax.cond(use, estimate, lambda: zeros)
    v = apply_fn(x_t, t_tok, model_batch, x0_prev).astype(jnp.float32)
  else:
    v = apply_fn(x_t, t_tok, model_batch).astype(jnp.float32)
  if v.shape != x0.shape:
    raise ValueError(f"the model returned {v.shape}; rectified flow expects {x0.shape}")

  err = jnp.mean(jnp.square(v - target), axis=-1)  # [B, L]
  value, per_example, num_tokens = token_losses.masked_mean(err, batch["loss_mask"], seg, k)
  metrics = dict(per_example_loss=per_example, t=t_ex, dropped=dropped, num_tokens=num_tokens)
  return value, metrics


def x0_estimate(x: jax.Array, v: jax.Array, t: jax.Array, t_min: float = 0.0) -> jax.Array:
  """The clean estimate x̂0 = x − max(t, t_min)·v behind a velocity v at x [B, L, P], t [B, L]
  (exactly the model's x̂0 when `velocity_from_x0(fn, t_min)` made v)."""
  return x - jnp.maximum(t, t_min)[..., None] * v


def noised(x0: jax.Array, noise: jax.Array, strength: float, shift=1.0) -> jax.Array:
  """The SDEdit start x_t at t = shift_time(strength) (Meng et al. 2022, Sec. 3.2)."""
  t = shift_time(jnp.full(x0.shape[:-1], strength, jnp.float32), shift)
  return interpolate(x0, noise, t)


def sample(
  velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
  x_start: jax.Array,
  steps: int,
  *,
  method: str = "euler",
  cond_mask: jax.Array | None = None,
  x_cond: jax.Array | None = None,
  shift: jax.Array | float = 1.0,
  strength: float = 1.0,
  rng: jax.Array | None = None,
  eta: float = 1.0,
  noise_fn: Callable[[jax.Array, tuple[int, ...]], jax.Array] | None = None,
  correct_at_zero: bool = True,
  self_condition: bool = False,
  t_min: float = 0.0,
  cond_time: float = 0.0,
) -> jax.Array:
  """Integrates dx/dt = v(x, t) from t = shift_time(strength) down to t = 0 (data).

  `velocity_fn(x [B, L, P], t [B, L]) -> v [B, L, P]` (compose guidance inside it, e.g. with
  `guidance.cfg`). `x_start` [B, L, P] is noise (strength 1), or the SDEdit start
  `noised(x0, noise, strength, shift)`. The `steps` steps are uniform in the unshifted time
  s ∈ [0, strength], mapped through `shift_time` (a scalar or a per-token [B, L] shift, so
  each example of a packed row keeps its own). `method`: "euler" (one model call per step)
  or "heun" (Heun's 2nd-order trapezoid, two calls per step; Karras et al. 2022, Alg. 1 —
  a velocity model is finite at t = 0, so the last step is corrected too; with
  `correct_at_zero=False`, for an x0 model whose (x − x̂0)/t is undefined at t = 0, the step
  that ends there is an Euler step, as in Alg. 1), or "stochastic"
  (DDIM with η on this path, Song et al. 2021, Eq. 12, one call per step: x̂0 and ε̂ from
  the velocity, then x_t' = (1 − t')·x̂0 + √(t'² − c²)·ε̂ + c·z with fresh z ~ N(0, I) from
  `rng` (drawn by `noise_fn(rng, shape)` if given, e.g. `mixed_noise`) and c = η·t'·s/t,
  s² = t² − ((1 − t)/(1 − t'))²·t'², the DDPM posterior's std at η = `eta` = 1; η = 0 is the
  Euler step exactly. Fresh noise at every step keeps a denoiser's error that follows each
  token's own noise from being carried, unchanged, to t = 0, as the deterministic ODE does).
  Tokens in
  `cond_mask` [B, L] are held at `x_cond` [B, L, P] with t = 0 (image-to-video, extension,
  interpolation), or at time `cond_time` > 0 with `x_cond` their noised values (a noisy
  context: the lightly noised given frames of diffusion forcing, `Sampler.long`). With
  `self_condition`, `velocity_fn(x, t, x0_prev)` also receives the
  previous call's estimate x̂0 = `x0_estimate(x, v, t, t_min)` (zeros at the first call).
  Returns x0 [B, L, P].
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if method not in SAMPLERS:
    raise ValueError(f"flow sampler method={method!r} is unknown; expected one of {SAMPLERS}")
  if (cond_mask is None) != (x_cond is None):
    raise ValueError("cond_mask and x_cond must be given together")
  if method == "stochastic" and rng is None:
    raise ValueError("the stochastic flow sampler needs an rng")
  ones = jnp.ones(x_start.shape[:-1], jnp.float32)  # [B, L]
  fresh = noise_fn or (lambda key, shape: jax.random.normal(key, shape, jnp.float32))

  def clamp(x, t):
    if cond_mask is None:
      return x, t
    return jnp.where(cond_mask[..., None], x_cond, x), jnp.where(cond_mask, cond_time, t)

  def velocity(x, t, prev):
    # -> (v, the x̂0 the next call is conditioned on)
    x, t = clamp(x, t)
    if not self_condition:
      return velocity_fn(x, t).astype(jnp.float32), prev
    v = velocity_fn(x, t, prev).astype(jnp.float32)
    return v, x0_estimate(x, v, t, t_min)

  def body(i, carry):
    x, prev = carry
    t_cur = shift_time(strength * (1.0 - i / steps) * ones, shift)  # [B, L]
    t_next = shift_time(strength * (1.0 - (i + 1) / steps) * ones, shift)
    dt = (t_next - t_cur)[..., None]
    d, prev = velocity(x, t_cur, prev)
    if method == "euler":
      return x + dt * d, prev
    if method == "stochastic":
      t, t2 = t_cur[..., None], t_next[..., None]
      x0_hat, eps_hat = x - t * d, x + (1 - t) * d
      s2 = jnp.maximum(jnp.square(t) - jnp.square((1 - t) / (1 - t2) * t2), 0.0)
      c = eta * t2 * jnp.sqrt(s2) / t
      z = fresh(jax.random.fold_in(rng, i), x.shape)
      x = (1 - t2) * x0_hat + jnp.sqrt(jnp.maximum(t2**2 - c**2, 0.0)) * eps_hat + c * z
      return x, prev
    d2, prev2 = velocity(x + dt * d, t_next, prev)
    if correct_at_zero:
      return x + dt * 0.5 * (d + d2), prev2
    inner = (t_next > 0)[..., None]  # the step that ends at t = 0 is an Euler step
    return x + dt * jnp.where(inner, 0.5 * (d + d2), d), jnp.where(inner, prev2, prev)

  x = x_start.astype(jnp.float32)
  x, _ = jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))
  return clamp(x, ones)[0]


FLOW_PREDICTIONS = ("velocity", "x0", "preconditioned", "x0_gated")
X0_PREDICTIONS = ("x0", "x0_gated")  # x̂0 converted to a velocity, the loss weight bounded
GATE_BIAS = -4.0  # a gated x0 model starts with its gate almost closed (sigmoid(-4) = 0.018)


def preconditioning(t: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array]:
  """(a, b) with v = a·x_t + b·F for a network output F preconditioned as in EDM.

  EDM (Karras et al. 2022, Table 1 and Appendix B.6) on the rectified-flow path
  x_t = (1 − t)·x0 + t·ε with data std σ: x̂0 = c_skip·x_t + c_out·F, with
  c_skip = (1 − t)σ² / D, c_out = tσ / √D, D = (1 − t)²σ² + t², so F's target has unit
  variance at every t: F ≈ x0/σ at t = 1 (the network draws the content) and F ≈ −ε at
  t = 0 (it only corrects its own input, which the skip passes through; a narrow network
  need not squeeze every patch through its width). The velocity (x_t − x̂0)/t is then
  a·x_t + b·F with a = (t − σ²(1 − t)) / D and b = −σ / √D, finite at every t ∈ [0, 1].
  t: [...] → a, b: [..., 1].
  """
  t = t[..., None]
  d = jnp.square(1 - t) * sigma_data**2 + jnp.square(t)
  return (t - sigma_data**2 * (1 - t)) / d, -sigma_data / jnp.sqrt(d)


def velocity_from_preconditioned(fn: Callable, sigma_data: float = 0.5) -> Callable:
  """Wraps a network F (`fn(x, t, *a)`, x [B, L, P], t [B, L]) preconditioned as in EDM
  (`preconditioning`) into one that returns the flow velocity."""

  def velocity(x, t, *args):
    a, b = preconditioning(t.astype(jnp.float32), sigma_data)
    return a * x + b * fn(x, t, *args).astype(x.dtype)

  return velocity


def velocity_from_gated_x0(fn: Callable, t_min: float = 0.05) -> Callable:
  """Wraps a model that outputs an x0 estimate F [P] and a gate logit G [1] per token into one
  that returns the flow velocity, with x̂0 = g·x_t/(1 − t) + (1 − g)·F, g = σ(G + GATE_BIAS).

  The gate lets a token take its clean value from its own input where that is reliable (low
  t, detail the network would blur) and from the network where it is not (high t, where
  passing the input lets the noise through, as EDM's fixed skip does). `fn(x, t, *a)` returns
  [B, L, P + 1]; the input's rescaling 1/(1 − t) is bounded at 10.
  """

  def velocity(x, t, *args):
    out = fn(x, t, *args).astype(x.dtype)
    gate = jax.nn.sigmoid(out[..., -1:] + GATE_BIAS)
    rescaled = x / jnp.maximum(1 - t, 0.1)[..., None]
    x0_hat = gate * rescaled + (1 - gate) * out[..., :-1]
    return (x - x0_hat) / jnp.maximum(t, t_min)[..., None]

  return velocity


def velocity_from_x0(fn: Callable, t_min: float = 0.05) -> Callable:
  """Wraps a model that predicts clean data x̂0 into one that returns the flow velocity.

  v̂ = (x_t − x̂0) / max(t, t_min), since x_t = (1 − t)·x0 + t·ε gives v = ε − x0 = (x_t − x0)/t.
  Predicting x0 and regressing the velocity ("x-prediction", Li & He 2025, "Back to Basics:
  Let Denoising Generative Models Denoise", Sec. 3) is what lets a narrow transformer work on
  high-dimensional pixel patches: it need not reproduce the noise in its output. `fn(x, t, *a)`
  with x [B, L, P], t [B, L].
  """

  def velocity(x, t, *args):
    x0_hat = fn(x, t, *args)
    return (x - x0_hat.astype(x.dtype)) / jnp.maximum(t, t_min)[..., None]

  return velocity
