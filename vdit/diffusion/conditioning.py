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
  keyframes        any subset of the patch-frames, at least one given and one not: each given
                   with a rate r ~ U(0, 1) drawn per example; half of these examples have their
                   given patch-frames made stills (an image as a keyframe, as sampling builds it)

Every task leaves at least one patch-frame to generate: a task that cannot (T' = 1 images for
all tasks, T' = 2 for interpolation) falls back to `none`. Pure, jit-able functions of the
packed batch (DESIGN.md, "The packed batch"): per example [B, K], gathered with segment ids,
frames read from `positions[..., 0]` (patch-time index) and `shapes[..., 0]` (T').

`keyframes` comes last in `TASKS` and is drawn only when its weight is > 0 (a static decision on
the Python probabilities): with weight 0 the draws are those of the five tasks before it, bit for
bit, so configs that do not use it train exactly as before it existed.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vdit.segments import per_token

TASKS = ("none", "image_to_video", "extend_forward", "extend_backward", "interpolate", "keyframes")
KEYFRAMES = TASKS.index("keyframes")  # last: see the module docstring
# Half plain generation (the capability every other one builds on), half conditioned tasks.
DEFAULT_PROBS = dict(
  none=0.5, image_to_video=0.2, extend_forward=0.1, extend_backward=0.1, interpolate=0.1
)
KEYFRAME_STILLS = 0.5  # the rate of keyframes examples whose given patch-frames are stills


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
  `keyframes` examples (T' ≥ 2) have first = last = 0: their frames are `keyframes_mask`'s.
  """
  task_rng, k_rng, a_rng, b_rng = jax.random.split(rng, 4)
  frames = shapes[..., 0]  # [B, K]
  drawn = probs if probs[KEYFRAMES] > 0 else probs[:KEYFRAMES]  # weight 0: the old draws exactly
  logits = jnp.log(jnp.asarray(drawn, jnp.float32))
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
  valid &= (task != KEYFRAMES) | (frames >= 2)  # and one given
  task = jnp.where(valid, task, TASKS.index("none"))
  return task, jnp.where(valid, first, 0), jnp.where(valid, last, 0)


def keyframes_mask(
  rng: jax.Array, segment_ids: jax.Array, t_index: jax.Array, num_examples: int
) -> tuple[jax.Array, jax.Array]:
  """The `keyframes` task's given tokens [B, L] and its stills [B, K] (bool), for every example.

  Each example draws a rate r ~ U(0, 1); each of its patch-frames draws u ~ U(0, 1) from
  `fold_in` of (row, segment id, patch-time index), so all tokens of a patch-frame agree and no
  table of patch-frames is needed. Given: u < r, and the patch-frame of the smallest u of the
  example always, the one of the largest u never — at least one given and one generated
  whenever the example's tokens span two patch-frames (else none is given).
  segment_ids, t_index: [B, L]; num_examples: K.
  """
  rate_rng, frame_rng, still_rng = jax.random.split(rng, 3)
  b, length = segment_ids.shape
  rate = jax.random.uniform(rate_rng, (b, num_examples))
  stills = jax.random.bernoulli(still_rng, KEYFRAME_STILLS, (b, num_examples))

  def frame_u(row, seg, t):  # one uniform per (row, example, patch-frame)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(frame_rng, row), seg), t)
    return jax.random.uniform(key)

  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
  u = jax.vmap(jax.vmap(frame_u))(rows, segment_ids, t_index)  # [B, L]

  def extremes(seg, u):  # per-example min and max of u over its tokens, gathered to them
    lo = jax.ops.segment_min(u, seg, num_segments=num_examples + 1)
    hi = jax.ops.segment_max(u, seg, num_segments=num_examples + 1)
    return lo[seg], hi[seg]

  lo, hi = jax.vmap(extremes)(segment_ids, u)
  given = ((u < per_token(rate, segment_ids)) | (u == lo)) & (u < hi) & (segment_ids > 0)
  return given, stills


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
  if probs[KEYFRAMES] > 0:  # static: with weight 0 nothing is drawn (see the module docstring)
    kf_rng = jax.random.fold_in(rng, KEYFRAMES)  # the tasks' own keys stay as they were
    kf_given, kf_stills = keyframes_mask(kf_rng, seg, t_index, batch["shapes"].shape[1])
    kf_given &= per_token(task, seg) == KEYFRAMES
    given |= kf_given
    still |= kf_given & per_token(kf_stills, seg)
  cond = batch["cond_mask"] | given
  out = dict(
    batch,
    patches=still_first_frame(batch["patches"], still, frames_per_patch),
    cond_mask=cond,
    loss_mask=batch["loss_mask"] & ~cond,
  )
  return out, dict(task=task, cond_tokens=jnp.sum(cond.astype(jnp.float32)))
