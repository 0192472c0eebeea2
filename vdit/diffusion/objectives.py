"""`config.diffusion` → the training loss and the sampler of the chosen objective.

The one place that maps config keys to the pure functions of `flow`, `gaussian`,
`gaussian_samplers`, `conditioning`. `Spec` is frozen and hashable, so it can be a static
argument of `jax.jit`; it fills defaults for keys an older run's config may lack.

  objective="rectified_flow"  samplers "euler" (default), "heun"
  objective="gaussian"        samplers "ddim" (default), "ddpm", "dpmpp_2m"
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vdit import section_spec
from vdit.diffusion import conditioning, flow, gaussian, gaussian_samplers, guidance
from vdit.segments import per_token

OBJECTIVES = ("rectified_flow", "gaussian")
SAMPLERS = {"rectified_flow": flow.SAMPLERS, "gaussian": gaussian_samplers.SAMPLERS}
DEFAULT_SAMPLER = {"rectified_flow": "euler", "gaussian": "ddim"}


@dataclasses.dataclass(frozen=True)
class Spec:
  """The diffusion settings of a run (`config.diffusion`), with defaults."""

  objective: str = "rectified_flow"
  time_sampling: str = "uniform"  # rectified flow: "uniform" | "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  shift_base_tokens: int = 0  # rectified flow: per-example shift √(tokens / base); 0 = none
  flow_prediction: str = "velocity"  # rectified flow: the model outputs "velocity" or "x0"
  flow_t_min: float = 0.05  # rectified flow, x0 prediction: v = (x_t − x̂0) / max(t, t_min)
  flow_eta: float = 1.0  # rectified flow, "stochastic" sampler: share of fresh noise per step
  flow_sigma_data: float = 0.5  # rectified flow, "preconditioned": the data std σ of EDM
  text_dropout: float = 0.1
  # rectified flow: the rate of self-conditioned training batches (the model also reads its
  # previous x̂0, `flow.loss`); > 0 makes the model self-conditioned, so the sampler feeds it.
  self_condition: float = 0.0
  # rectified flow: the share of each token's noise that is common to its place (h, w) in every
  # patch-frame of its example (`flow.mixed_noise`, PYoCo), in training and sampling; 0 = none.
  noise_correlation: float = 0.0
  # rectified flow: γ of input perturbation (`flow.loss`): the model reads x_t built from
  # noise + γ·ξ, the target stays that of the unperturbed x_t; 0 = off.
  input_perturbation: float = 0.0
  # rectified flow: blurred inputs (`vdit.tasks.video_diffusion`): with probability
  # `input_blur_rate` an example's clean input is blurred by σ ~ U(0, input_blur) cells before it
  # is noised, the target staying the sharp x0; 0 = off.
  input_blur: float = 0.0
  input_blur_rate: float = 0.5
  # REPA: a captioning run whose frozen encoder's features the hidden states of
  # `model.repa_depth` are pulled towards, with weight `repa_weight`; "" = off.
  repa_encoder: str = ""
  repa_weight: float = 0.5
  cond_probs: tuple[float, ...] = conditioning.task_probs(conditioning.DEFAULT_PROBS)
  schedule: str = "linear"  # gaussian: "linear" | "cosine"
  num_timesteps: int = 1000  # gaussian: N
  prediction: str = "eps"  # gaussian: "eps" | "v" | "x0"
  learn_sigma: bool = False  # gaussian: the model also outputs P variance channels
  sampler: str = ""  # "" → DEFAULT_SAMPLER[objective]
  ddim_eta: float = 0.0
  guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only for lo ≤ t ≤ hi

  @classmethod
  def from_config(cls, diffusion: Mapping[str, Any]) -> "Spec":
    """The section with defaults for absent keys; an unknown key or a value of the wrong type
    is a ValueError naming it (`vdit.section_spec`)."""
    d = dict(diffusion.to_dict() if hasattr(diffusion, "to_dict") else diffusion)
    if isinstance(d.get("cond_probs"), Mapping):  # {task: weight} in configs
      try:
        d["cond_probs"] = conditioning.task_probs(dict(d["cond_probs"]))
      except ValueError as e:
        raise ValueError(f"diffusion.cond_probs: {e}") from None
    return section_spec.read(cls, d, "diffusion")

  @property
  def default_sampler(self) -> str:
    return self.sampler or DEFAULT_SAMPLER[self.objective]

  def output_dim(self, patch_dim: int) -> int:
    """Model output channels: P, 2P with a learned variance, P + 1 with a gated x0."""
    if self.objective == "gaussian" and self.learn_sigma:
      return 2 * patch_dim
    if self.objective == "rectified_flow" and self.flow_prediction == "x0_gated":
      return patch_dim + 1
    return patch_dim

  @property
  def predicts_x0(self) -> bool:
    """Rectified flow with an x0 estimate converted to a velocity (plain or gated)."""
    return self.objective == "rectified_flow" and self.flow_prediction in flow.X0_PREDICTIONS

  def check_sampler(self, sampler: str) -> str:
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective={self.objective!r} is unknown; expected one of {OBJECTIVES}")
    if sampler not in SAMPLERS[self.objective]:
      raise ValueError(
        f"sampler={sampler!r} does not fit objective={self.objective!r}; expected one of "
        f"{SAMPLERS[self.objective]}"
      )
    return sampler

  def check_request(self, steps: int, strength: float, sampler: str, interval) -> None:
    """Raises ValueError for a sampling request this objective cannot serve."""
    if steps < 1:
      raise ValueError(f"steps={steps} must be >= 1")
    if not 0.0 < strength <= 1.0:
      raise ValueError(f"strength={strength} must be in (0, 1]")
    self.check_sampler(sampler)
    if self.objective == "gaussian":
      gaussian_samplers.timesteps(self.gaussian_schedule, steps, strength)
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
      raise ValueError(f"guidance_interval={tuple(interval)} must be (lo, hi), 0 <= lo <= hi <= 1")

  @property
  def gaussian_schedule(self) -> gaussian.Schedule:
    return gaussian.make_schedule(self.schedule, self.num_timesteps)


def loss(
  spec: Spec, apply_fn: Callable[[jax.Array, jax.Array, dict], jax.Array], batch: dict, rng
) -> tuple[jax.Array, dict]:
  """The objective's loss on a packed batch (see `flow.loss`, `gaussian.loss`)."""
  if spec.objective == "rectified_flow":
    return flow.loss(
      flow_model(spec, apply_fn),
      batch,
      rng,
      time_sampling=spec.time_sampling,
      logit_mean=spec.logit_mean,
      logit_std=spec.logit_std,
      shift_base_tokens=spec.shift_base_tokens or None,
      text_dropout=spec.text_dropout,
      t_min=spec.flow_t_min if spec.predicts_x0 else None,
      self_condition=spec.self_condition,
      noise_correlation=spec.noise_correlation,
      input_perturbation=spec.input_perturbation,
    )
  if spec.objective == "gaussian":
    return gaussian.loss(
      apply_fn,
      batch,
      rng,
      schedule=spec.gaussian_schedule,
      prediction=spec.prediction,
      learn_sigma=spec.learn_sigma,
      text_dropout=spec.text_dropout,
    )
  raise ValueError(f"objective={spec.objective!r} is unknown; expected one of {OBJECTIVES}")


# Sampling converts x0 predictions exactly, v = (x_t − x̂0)/t: `flow_t_min` only bounds the loss
# weight in training. With it, every Euler step below t_min would remove only t/t_min of the
# remaining noise (a third of the noise at t_min survives to t = 0). Tokens at t = 0 are given
# frames, whose velocity the sampler discards.
SAMPLING_T_MIN = 1e-4


def flow_model(spec: Spec, fn: Callable, *, sampling: bool = False) -> Callable:
  """The model as a velocity function for rectified flow (converting x0 predictions; exactly
  when `sampling`, with the loss weight bound `flow_t_min` in training)."""
  t_min = SAMPLING_T_MIN if sampling else spec.flow_t_min
  if spec.flow_prediction == "x0":
    return flow.velocity_from_x0(fn, t_min)
  if spec.flow_prediction == "x0_gated":
    return flow.velocity_from_gated_x0(fn, t_min)
  if spec.flow_prediction == "preconditioned":
    return flow.velocity_from_preconditioned(fn, spec.flow_sigma_data)
  if spec.flow_prediction != "velocity":
    raise ValueError(
      f"flow_prediction={spec.flow_prediction!r} is unknown; expected one of "
      f"{flow.FLOW_PREDICTIONS}"
    )
  return fn


def token_shift(spec: Spec, shapes: jax.Array, segment_ids: jax.Array) -> jax.Array | float:
  """The rectified-flow time shift of each token's own example, [B, L] (1 when off)."""
  if not spec.shift_base_tokens:
    return 1.0
  return per_token(flow.resolution_shift(shapes, spec.shift_base_tokens), segment_ids)


def noise_fn(spec: Spec, segment_ids: jax.Array, positions: jax.Array) -> Callable:
  """`noise_fn(rng, shape)`: the run's diffusion noise for rows with these segment ids [B, L] and
  positions [B, L, 3], correlated along time as in training (`flow.mixed_noise` with
  `spec.noise_correlation`; 0 = independent). The samplers' starting and fresh noise."""
  return lambda rng, shape: flow.mixed_noise(
    rng, shape, segment_ids, positions, spec.noise_correlation
  )


def sample(
  spec: Spec,
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  noise: jax.Array,
  steps: int,
  *,
  sampler: str | None = None,
  shapes: jax.Array,
  segment_ids: jax.Array,
  positions: jax.Array | None = None,
  cond_mask: jax.Array | None = None,
  x_cond: jax.Array | None = None,
  x_init: jax.Array | None = None,
  strength: float = 1.0,
  rng: jax.Array | None = None,
  cond_time: float = 0.0,
) -> jax.Array:
  """Generates x0 [B, L, P] from noise [B, L, P] with the objective's sampler.

  `model_fn(x, t) -> out` (guidance composed in). `shapes` [B, K, 3] and `segment_ids`
  [B, L] give each example's resolution shift (the same as in training); with `positions`
  [B, L, 3], the stochastic sampler's fresh noise is correlated along time as the training noise
  (`spec.noise_correlation`), else independent. SDEdit: `x_init`
  [B, L, P] is noised to `strength` ∈ (0, 1] and denoised from there (strength 1 ignores it).
  `cond_time` > 0 (rectified flow only): the `cond_mask` tokens are held at `x_cond` as noisy
  tokens of that time (`flow.sample`), not clean ones.
  """
  sampler = spec.check_sampler(sampler or spec.default_sampler)
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength} must be in (0, 1]")
  if cond_time and spec.objective != "rectified_flow":
    raise ValueError(f"cond_time={cond_time} (a noisy context) needs rectified flow")
  if spec.objective == "rectified_flow":
    shift = token_shift(spec, shapes, segment_ids)
    x = noise if x_init is None or strength == 1.0 else flow.noised(x_init, noise, strength, shift)
    return flow.sample(
      flow_model(spec, model_fn, sampling=True),
      x,
      steps,
      method=sampler,
      cond_mask=cond_mask,
      x_cond=x_cond,
      shift=shift,
      strength=strength,
      rng=rng,
      noise_fn=None if positions is None else noise_fn(spec, segment_ids, positions),
      eta=spec.flow_eta,
      correct_at_zero=not spec.predicts_x0,
      self_condition=spec.self_condition > 0,
      t_min=SAMPLING_T_MIN if spec.predicts_x0 else 0.0,
      cond_time=cond_time,
    )
  schedule = spec.gaussian_schedule
  x = noise
  if x_init is not None and strength < 1.0:
    x = gaussian_samplers.noised(schedule, x_init, noise, strength)
  return gaussian_samplers.sample(
    model_fn,
    x,
    steps,
    schedule=schedule,
    prediction=spec.prediction,
    learn_sigma=spec.learn_sigma,
    method=sampler,
    eta=spec.ddim_eta,
    rng=rng,
    cond_mask=cond_mask,
    x_cond=x_cond,
    strength=strength,
  )


def encode_rows(model, params, rows: dict) -> Any:
  """The captions of a row batch encoded once (`VideoDiT.encode_text`): what every denoising
  step of these rows reads."""
  return model.apply(
    {"params": params},
    rows["text_tokens"],
    rows["text_segment_ids"],
    rows.get("text_embeddings"),
    method="encode_text",
  )


def apply_rows(
  model, params, x: jax.Array, t: jax.Array, rows: dict, text: Any = None, **kwargs
) -> jax.Array:
  """The VideoDiT call (as in `train_step`) on x [B, L, P] at t [B, L] with the rest of a row
  batch from `rows`: positions, segment ids, labels, and the captions encoded by `encode_rows`
  (`text`, or encoded here when None)."""
  text = encode_rows(model, params, rows) if text is None else text
  return model.apply(
    {"params": params},
    x,
    t,
    rows["positions"],
    rows["segment_ids"],
    text,
    rows["labels"],
    method="denoise",
    **kwargs,
  )


def guided_model(
  model,
  params: Any,
  rows: dict,
  scale: float,
  interval: tuple[float, float],
  text: Any = None,
) -> Callable:
  """The guided model function `model_fn(x, t, x0_prev=None)` of N videos x [N, L, P] over
  `rows` [2N, ...], the N conditional rows then their N null rows (caption [NULL], label −1):
  one `apply_rows` on both halves, then `guidance.cfg` with `scale` for t in `interval`.
  `rows` of N rows (no null rows: guidance 1, e.g. a distilled student) is the plain
  conditional call, one model call a step. `text`: the rows' captions from `encode_rows`;
  None encodes them at every call."""

  def model_fn(x, t, x0_prev=None):
    n, p = x.shape[0], x.shape[-1]
    prev = {} if x0_prev is None else {"x0_prev": x0_prev}
    if rows["segment_ids"].shape[0] == n:
      return apply_rows(model, params, x, t, rows, text, **prev)
    # The conditional and null rows see the same noisy video (and, for a self-conditioned
    # model, the same previous guided estimate x0_prev).
    prev = {k: jnp.concatenate([v, v]) for k, v in prev.items()}
    xx, tt = jnp.concatenate([x, x]), jnp.concatenate([t, t])
    out = apply_rows(model, params, xx, tt, rows, text, **prev)
    return guidance.cfg(out[:n], out[n:], scale, t, interval, channels=p)

  return model_fn


@functools.partial(
  jax.jit, static_argnames=("model", "spec", "steps", "sampler", "strength", "cond_time")
)
def sample_rows(
  model,
  params: Any,
  rows: dict,
  noise: jax.Array,
  x_cond: jax.Array,
  cond_mask: jax.Array,
  x_init: jax.Array,
  rng: jax.Array,
  scale: float,
  interval: tuple[float, float],
  *,
  spec: Spec,
  steps: int,
  sampler: str,
  strength: float,
  cond_time: float = 0.0,
) -> jax.Array:
  """The whole guided sampling loop of a packed-row model as one jitted function.

  The captions are encoded once (`encode_rows`), then each step calls the denoiser through
  `guided_model`. `rows` [2N, ...] are the N conditional rows then their N null rows; noise,
  x_cond, x_init [N, L, P]; cond_mask [N, L]. Guidance `scale` applies for t in `interval`;
  `cond_time` > 0: the given tokens are noisy ones of that time (`sample`).
  """
  text = encode_rows(model, params, rows)
  n = noise.shape[0]
  return sample(
    spec,
    guided_model(model, params, rows, scale, interval, text),
    noise,
    steps,
    sampler=sampler,
    shapes=rows["shapes"][:n],
    segment_ids=rows["segment_ids"][:n],
    positions=rows["positions"][:n],
    cond_mask=cond_mask,
    x_cond=x_cond,
    x_init=x_init,
    strength=strength,
    rng=rng,
    cond_time=cond_time,
  )
