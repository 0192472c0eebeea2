"""Progressive distillation of a rectified-flow sampler, its guidance folded in.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (Alg. 2):
a student initialised from its teacher learns to take in one step what the teacher's sampler
takes in two, so N teacher steps become N/2; each round's student is the next round's teacher
(16 → 8 → 4 → 2 → 1). Meng et al. 2023, "On Distillation of Guided Diffusion Models": the
teacher's step is the *guided* one, so the student samples with one conditional call per step
instead of two.

On rectified flow (x_t = (1 − t)·x0 + t·ε, Euler steps uniform in the unshifted time s and
mapped through each example's resolution shift, as `flow.sample`) the student's target at a
grid time t_k of its N-step grid is the velocity that lands where the teacher's two Euler steps
t_k → t_mid → t_k+1 land (or its S = `substeps` steps of the S·N-step grid: several halvings in
one round):

  v* = (x_t − x̃) / (t_k − t_k+1),  x̃ = the guided teacher's Euler steps from x_t.

The loss is ‖v_student(x_t, t_k) − v*‖² over the loss tokens; the student is then sampled with
Euler at N steps and guidance 1. Given (`cond_mask`) tokens stay clean at t = 0 in both, as the
sampler holds them, so every frame-conditioning mode is distilled with the same loss.
Pure functions of arrays; the models come in as velocity functions.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vdit import section_spec
from vdit.diffusion import flow, token_losses
from vdit.segments import per_token


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `distill` section of a run: its keys, types and defaults (`vdit.section_spec`)."""

  teacher: str = ""  # the workdir of the run distilled from; "" = no distillation
  steps: int = 0  # the student's Euler steps
  substeps: int = 2  # the teacher's steps per student step (2: progressive distillation)


def settings(section: Mapping[str, Any] | None) -> Settings:
  """The `distill` section (absent in runs from before it: no distillation)."""
  return section_spec.read(Settings, section, "distill")


def grid_times(
  rng: jax.Array,
  shift: jax.Array | float,
  segment_ids: jax.Array,
  num_examples: int,
  steps: int,
  substeps: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """One step of the student's `steps`-step grid per example: (k [B, K], the times [S + 1, B, L]
  per token from t_k to t_k+1 through the teacher's S = `substeps` steps), uniform in the
  unshifted time s and mapped through `shift` (a scalar or per-token [B, L]): exactly the times
  `flow.sample` visits with `steps` (the student) and S·`steps` steps (the teacher)."""
  b = segment_ids.shape[0]
  k = jax.random.randint(rng, (b, num_examples), 0, steps)  # [B, K]
  k_tok = per_token(k, segment_ids).astype(jnp.float32)  # [B, L]
  times = [1.0 - (k_tok + j / substeps) / steps for j in range(substeps + 1)]
  return k, jnp.stack([flow.shift_time(s, shift) for s in times])


def teacher_target(
  teacher: Callable[[jax.Array, jax.Array], jax.Array],
  x_t: jax.Array,
  times: jax.Array,
  cond_mask: jax.Array,
  x0: jax.Array,
) -> jax.Array:
  """v* [B, L, P]: the one-step velocity from x_t at times[0] [B, L] to where the Euler steps of
  the (guided) `teacher(x, t) -> velocity` through `times` [S + 1, B, L] land at times[-1];
  `cond_mask` tokens held at x0, t = 0."""

  def clamp(x, tt):
    return jnp.where(cond_mask[..., None], x0, x), jnp.where(cond_mask, 0.0, tt)

  x = x_t
  for t_from, t_to in zip(times[:-1], times[1:]):
    x, tt = clamp(x, t_from)
    x = x + (t_to - t_from)[..., None] * teacher(x, tt).astype(jnp.float32)
  dt = jnp.maximum(times[0] - times[-1], 1e-6)[..., None]
  return jax.lax.stop_gradient((x_t - x) / dt)


def loss(
  student: Callable[[jax.Array, jax.Array], jax.Array],
  teacher: Callable[[jax.Array, jax.Array], jax.Array],
  batch: dict,
  rng: jax.Array,
  *,
  steps: int,
  substeps: int = 2,
  shift: jax.Array | float = 1.0,
  noise_correlation: float = 0.0,
) -> tuple[jax.Array, dict]:
  """The progressive-distillation loss of a packed batch (keys `patches`, `segment_ids`,
  `positions`, `shapes`, `cond_mask`, `loss_mask`): the student's velocity at a random step of
  its `steps`-step grid against `teacher_target` of the teacher's `substeps` steps (2:
  progressive distillation; more: several halvings in one round). `student`/`teacher(x
  [B, L, P], t [B, L])` return velocities (the teacher's guided, captions as in `batch`). The
  noise is the run's (`flow.mixed_noise` with `noise_correlation`). Returns (loss, metrics:
  `per_example_loss` [B, K], `t` [B, K] (each example's unshifted s_k), `num_tokens`)."""
  if steps < 1:
    raise ValueError(f"distillation steps={steps} must be >= 1")
  x0 = batch["patches"].astype(jnp.float32)
  seg, cond = batch["segment_ids"], batch["cond_mask"]
  k_ex = batch["shapes"].shape[1]
  grid_rng, noise_rng = jax.random.split(rng)
  k, times = grid_times(grid_rng, shift, seg, k_ex, steps, substeps)
  t = times[0]
  noise = flow.mixed_noise(noise_rng, x0.shape, seg, batch["positions"], noise_correlation)
  t_in = jnp.where(cond, 0.0, t)
  x_t = jnp.where(cond[..., None], x0, flow.interpolate(x0, noise, t_in))
  target = teacher_target(teacher, x_t, times, cond, x0)
  v = student(x_t, t_in).astype(jnp.float32)
  err = jnp.mean(jnp.square(v - target), axis=-1)  # [B, L]
  value, per_example, num_tokens = token_losses.masked_mean(err, batch["loss_mask"], seg, k_ex)
  t_ex = 1.0 - k.astype(jnp.float32) / steps  # the unshifted s of each example's step
  return value, dict(per_example_loss=per_example, t=t_ex, num_tokens=num_tokens)
