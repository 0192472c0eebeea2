"""Frame conditioning, trained: random image-to-video / extension / interpolation tasks.

Sora (Brooks et al. 2024, "Video generation models as world simulators") generates from
images, extends videos forward and backward, and connects two videos, all with one model.
Here the model learns these in training: each example of a packed row is turned, with the
step's rng, into one task of `TASKS`; the given patch-frames are marked in `cond_mask`, stay
clean (t = 0, see `flow.loss` / `gaussian.loss`) and carry no loss:

  none             plain generation (text-to-video; images are 1-frame videos: text-to-image)
  image_to_video   the first patch-frame given, as a still (its pt frames all equal frame 0,
                   exactly what sampling builds from one image)
  extend_forward   the first k patch-frames given, 1 ≤ k ≤ T'−1
  extend_backward  the last k patch-frames given
  interpolate      the first a and the last b given, a, b ≥ 1, a + b ≤ T'−1 (connecting clips;
                   looping is interpolation from a keyframe back to itself)

Every task leaves at least one patch-frame to generate: a task that cannot (T' = 1 images for
all tasks, T' = 2 for interpolation) falls back to `none`. Pure, jit-able functions of the
packed batch (DESIGN.md, "The packed batch"): per example [B, K], gathered with segment ids,
frames read from `positions[..., 0]` (patch-time index) and `shapes[..., 0]` (T').
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vdit.segments import per_token

TASKS = ("none", "image_to_video", "extend_forward", "extend_backward", "interpolate")
# Half plain generation (the capability every other one builds on), half conditioned tasks.
DEFAULT_PROBS = dict(
  none=0.5, image_to_video=0.2, extend_forward=0.1, extend_backward=0.1, interpolate=0.1
)


def task_probs(probs: Mapping[str, float]) -> tuple[float, ...]:
  """Probabilities in `TASKS` order from a {task: weight} mapping (normalized)."""
  unknown = sorted(set(probs) - set(TASKS))
  if unknown:
    raise ValueError(f"unknown conditioning tasks {unknown}; expected names from {TASKS}")
  weights = [float(probs.get(name, 0.0)) for name in TASKS]
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"conditioning task weights {dict(probs)} must be >= 0 with a positive sum")
  return tuple(w / sum(weights) for w in weights)


def frames_mask(t_index, num_frames, first, last):
  """True where a token's patch-frame is among the first `first` or the last `last` of
  its example's `num_frames` patch-frames. Array-agnostic (numpy in sampling, jax here)."""
  return (t_index < first) | (t_index >= num_frames - last)


def sample_tasks(
  rng: jax.Array, shapes: jax.Array, probs: tuple[float, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One task per example and its given patch-frame counts.

  shapes: [B, K, 3] patch grids (T' = shapes[..., 0]; 0 for empty slots); probs in `TASKS`
  order. Returns (task [B, K] int32 index into TASKS, first [B, K], last [B, K]) where
  `first`/`last` count given leading/trailing patch-frames; always first + last < T'.
  """
  task_rng, k_rng, a_rng, b_rng = jax.random.split(rng, 4)
  frames = shapes[..., 0]  # [B, K]
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  task = jax.random.categorical(task_rng, logits, shape=frames.shape).astype(jnp.int32)

  def draw(key, count):  # uniform integer in [1, count] (1 when count < 1)
    u = jax.random.uniform(key, frames.shape)
    return 1 + jnp.floor(u * jnp.maximum(count, 0)).astype(jnp.int32)

  k = draw(k_rng, frames - 1)  # extension: 1 … T'−1
  a = draw(a_rng, frames - 2)  # interpolation: a ∈ 1 … T'−2, b ∈ 1 … T'−1−a
  b = draw(b_rng, frames - 1 - a)
  name = lambda n: task == TASKS.index(n)
  first = jnp.select(
    [name("image_to_video"), name("extend_forward"), name("interpolate")], [1, k, a], 0
  )
  last = jnp.select([name("extend_backward"), name("interpolate")], [k, b], 0)
  valid = first + last < frames  # at least one patch-frame left to generate
  task = jnp.where(valid, task, TASKS.index("none"))
  return task, jnp.where(valid, first, 0), jnp.where(valid, last, 0)


def still_first_frame(patches: jax.Array, mask: jax.Array, frames_per_patch: int) -> jax.Array:
  """Replaces, where mask [B, L], each patch's pt frames by its first frame (a still image).

  patches: [B, L, P] with P flattened as (pt, ph, pw, C) (`vdit.data.patchify`).
  """
  b, length, p = patches.shape
  sub = patches.reshape(b, length, frames_per_patch, p // frames_per_patch)
  still = jnp.broadcast_to(sub[:, :, :1], sub.shape).reshape(b, length, p)
  return jnp.where(mask[..., None], still, patches)


def condition_batch(
  rng: jax.Array, batch: dict, probs: tuple[float, ...], frames_per_patch: int
) -> tuple[dict, dict]:
  """Turns examples into conditioned tasks: sets `cond_mask`, `loss_mask`, image-to-video stills.

  The new cond_mask is OR-ed with the batch's (a pipeline may already mark given tokens);
  loss_mask becomes loss_mask & ~cond_mask. Returns (batch, metrics) with metrics `task`
  [B, K] and `cond_tokens` (the number of conditioning tokens).
  """
  seg = batch["segment_ids"]  # [B, L]
  task, first, last = sample_tasks(rng, batch["shapes"], probs)
  t_index = batch["positions"][..., 0]  # [B, L]
  num_frames = per_token(batch["shapes"][..., 0], seg)
  given = frames_mask(t_index, num_frames, per_token(first, seg), per_token(last, seg))
  given = given & (seg > 0)
  still = given & (per_token(task, seg) == TASKS.index("image_to_video"))
  cond = batch["cond_mask"] | given
  out = dict(
    batch,
    patches=still_first_frame(batch["patches"], still, frames_per_patch),
    cond_mask=cond,
    loss_mask=batch["loss_mask"] & ~cond,
  )
  return out, dict(task=task, cond_tokens=jnp.sum(cond.astype(jnp.float32)))
