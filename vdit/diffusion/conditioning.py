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
  retake           a contiguous range of n ~ U{1 … T'−1} patch-frames generated (anywhere), the
                   rest given: regenerating a stretch of a video (`retake_frames`)
  inpaint          a box of the patch grid, the same in every patch-frame, generated, the rest
                   given (`box`): regenerating a region across time
  outpaint         the complement: the box given, the band around it (any widths, one side or
                   more) generated — a video on a larger canvas
  forcing          diffusion forcing (Chen et al. 2024, "Diffusion Forcing"; SkyReels-V2): no
                   token given, each patch-frame at its own noise level, independent uniforms
                   u ~ U(0, 1) per patch-frame (`frame_uniforms`) that the loss maps through
                   the run's time sampling and shift (`flow.loss`, key `frame_uniform`): the
                   model learns to denoise frames next to cleaner or noisier ones, which is what
                   a long video sampled chunk by chunk with lightly noised context frames asks
                   (`Sampler.long`). Rectified flow only, and a model with per-token time
                   conditioning (not `model.shared_conditioning`, whose one time per example
                   cannot hold it; `config_checks`)

Every task leaves at least one token to generate: a task that cannot (T' = 1 images for the frame
tasks and forcing, T' = 2 for interpolation, a 1-token frame H'·W' = 1 for inpaint/outpaint) falls
back to `none`; images can be inpainted and outpainted. Pure, jit-able functions of the packed batch
(DESIGN.md, "The packed batch"): per example [B, K], gathered with segment ids, places read from
`positions` (the (t, h, w) patch index, kept through token dropping) and `shapes` (T', H', W').

The tasks from `keyframes` on were added later. The categorical draw runs over the tasks up to
the last one with a weight > 0 (at least the first five; a static decision on the Python
probabilities), and each later task draws its own randomness from `fold_in(rng, its index)`
only when its weight is > 0: with their weights 0 the draws are those of the tasks before them,
bit for bit, so configs that do not use them train exactly as before they existed.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vdit.segments import per_token

TASKS = (
  *("none", "image_to_video", "extend_forward", "extend_backward", "interpolate"),
  *("keyframes", "retake", "inpaint", "outpaint", "forcing"),  # added later: module docstring
)
KEYFRAMES, RETAKE, INPAINT, OUTPAINT, FORCING = (TASKS.index(n) for n in TASKS[-5:])
# Half plain generation (the capability every other one builds on), half conditioned tasks.
DEFAULT_PROBS = dict(
  none=0.5, image_to_video=0.2, extend_forward=0.1, extend_backward=0.1, interpolate=0.1
)
KEYFRAME_STILLS = 0.5  # the rate of keyframes examples whose given patch-frames are stills
# The batch key of the `forcing` task: [B, L] float, each token's patch-frame uniform in [0, 1)
# (mapped to a time by the loss), −1 where the example's own time applies.
FRAME_UNIFORM = "frame_uniform"


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


def _randint(key: jax.Array, lo, hi) -> jax.Array:
  """Uniform integers in [lo, hi] per element of the broadcast shape (lo where hi < lo)."""
  lo, hi = jnp.asarray(lo), jnp.asarray(hi)
  u = jax.random.uniform(key, jnp.broadcast_shapes(lo.shape, hi.shape))
  return lo + jnp.floor(u * jnp.maximum(hi - lo + 1, 0)).astype(jnp.int32)


def sample_tasks(
  rng: jax.Array, shapes: jax.Array, probs: tuple[float, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One task per example and its given patch-frame counts.

  shapes: [B, K, 3] patch grids (T' = shapes[..., 0]; 0 for empty slots); probs in `TASKS`
  order. Returns (task [B, K] int32 index into TASKS, first [B, K], last [B, K]) where
  `first`/`last` count given leading/trailing patch-frames; always first + last < T'.
  The later tasks (`keyframes` on) have first = last = 0: their tokens are `condition_batch`'s.
  """
  task_rng, k_rng, a_rng, b_rng = jax.random.split(rng, 4)
  frames = shapes[..., 0]  # [B, K]
  used = 1 + max(i for i, p in enumerate(probs) if p > 0)
  drawn = probs[: max(used, KEYFRAMES)]  # later tasks at weight 0: the old draws exactly
  logits = jnp.log(jnp.asarray(drawn, jnp.float32))
  task = jax.random.categorical(task_rng, logits, shape=frames.shape).astype(jnp.int32)
  k = _randint(k_rng, 1, frames - 1)  # extension: 1 … T'−1
  a = _randint(a_rng, 1, frames - 2)  # interpolation: a ∈ 1 … T'−2, b ∈ 1 … T'−1−a
  b = _randint(b_rng, 1, frames - 1 - a)
  name = lambda n: task == TASKS.index(n)
  first = jnp.select(
    [name("image_to_video"), name("extend_forward"), name("interpolate")], [1, k, a], 0
  )
  last = jnp.select([name("extend_backward"), name("interpolate")], [k, b], 0)
  valid = first + last < frames  # at least one patch-frame left to generate
  valid &= ((task != KEYFRAMES) & (task != RETAKE)) | (frames >= 2)  # and one given
  valid &= (task != FORCING) | (frames >= 2)  # two patch-frames to give two noise levels
  cells = shapes[..., 1] * shapes[..., 2]  # H'·W'
  valid &= ((task != INPAINT) & (task != OUTPAINT)) | (cells >= 2)
  task = jnp.where(valid, task, TASKS.index("none"))
  return task, jnp.where(valid, first, 0), jnp.where(valid, last, 0)


def retake_frames(rng: jax.Array, shapes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The `retake` task's generated patch-frames [start, stop) per example [B, K]: n ~ U{1 …
  T'−1} of them from start ~ U{0 … T'−n}; the patch-frames before and after are given."""
  n_rng, start_rng = jax.random.split(rng)
  frames = shapes[..., 0]
  n = _randint(n_rng, 1, frames - 1)
  start = _randint(start_rng, 0, frames - n)
  return start, start + n


def box(rng: jax.Array, shapes: jax.Array) -> tuple[jax.Array, ...]:
  """The `inpaint`/`outpaint` tasks' box per example [B, K]: patch rows [top, bottom) and columns
  [left, right), the same in every patch-frame. Its height is U{1 … H'}, its width U{1 … W'}
  (U{1 … W'−1} at full height: never the whole frame, when H'·W' ≥ 2), its place uniform."""
  h_rng, w_rng, top_rng, left_rng = jax.random.split(rng, 4)
  rows, cols = shapes[..., 1], shapes[..., 2]
  height = _randint(h_rng, 1, rows)
  width = _randint(w_rng, 1, cols - (height == rows))
  top, left = _randint(top_rng, 0, rows - height), _randint(left_rng, 0, cols - width)
  return top, top + height, left, left + width


def patch_frame_uniforms(rng: jax.Array, segment_ids: jax.Array, t_index: jax.Array) -> jax.Array:
  """One u ~ U(0, 1) per (row, example, patch-frame), gathered to its tokens [B, L]: drawn from
  `fold_in` of (row, segment id, patch-time index), so all tokens of a patch-frame agree and no
  table of patch-frames is needed. segment_ids, t_index: [B, L]."""
  b, length = segment_ids.shape

  def frame_u(row, seg, t):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, row), seg), t)
    return jax.random.uniform(key)

  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
  return jax.vmap(jax.vmap(frame_u))(rows, segment_ids, t_index)


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
  b = segment_ids.shape[0]
  rate = jax.random.uniform(rate_rng, (b, num_examples))
  stills = jax.random.bernoulli(still_rng, KEYFRAME_STILLS, (b, num_examples))
  u = patch_frame_uniforms(frame_rng, segment_ids, t_index)  # [B, L]

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
  loss_mask becomes loss_mask & ~cond_mask. With the `forcing` task's weight > 0 the batch also
  gets `FRAME_UNIFORM` (see there). Returns (batch, metrics) with metrics `task`
  [B, K] and `cond_tokens` (the number of conditioning tokens).
  """
  seg, shapes = batch["segment_ids"], batch["shapes"]  # [B, L], [B, K, 3]
  task, first, last = sample_tasks(rng, shapes, probs)
  t_index, h_index, w_index = (batch["positions"][..., i] for i in range(3))  # [B, L] each
  num_frames = per_token(shapes[..., 0], seg)
  given = frames_mask(t_index, num_frames, per_token(first, seg), per_token(last, seg))
  given = given & (seg > 0)
  token_task = per_token(task, seg)
  still = given & (token_task == TASKS.index("image_to_video"))
  # The later tasks: static on the weights (with 0 nothing is drawn, see the module docstring),
  # each from its own fold_in key (the earlier tasks' keys stay as they were).
  if probs[KEYFRAMES] > 0:
    kf_given, kf_stills = keyframes_mask(
      jax.random.fold_in(rng, KEYFRAMES), seg, t_index, shapes.shape[1]
    )
    kf_given &= token_task == KEYFRAMES
    given |= kf_given
    still |= kf_given & per_token(kf_stills, seg)
  if probs[RETAKE] > 0:
    start, stop = retake_frames(jax.random.fold_in(rng, RETAKE), shapes)
    free = (t_index >= per_token(start, seg)) & (t_index < per_token(stop, seg))
    given |= (token_task == RETAKE) & ~free & (seg > 0)
  if probs[INPAINT] > 0 or probs[OUTPAINT] > 0:
    top, bottom, left, right = (
      per_token(x, seg) for x in box(jax.random.fold_in(rng, INPAINT), shapes)
    )
    inside = (h_index >= top) & (h_index < bottom) & (w_index >= left) & (w_index < right)
    painted = ((token_task == INPAINT) & ~inside) | ((token_task == OUTPAINT) & inside)
    given |= painted & (seg > 0)
  cond = batch["cond_mask"] | given
  out = dict(
    batch,
    patches=still_first_frame(batch["patches"], still, frames_per_patch),
    cond_mask=cond,
    loss_mask=batch["loss_mask"] & ~cond,
  )
  if probs[FORCING] > 0:  # the key exists only then: the loss of other runs is untouched
    u = patch_frame_uniforms(jax.random.fold_in(rng, FORCING), seg, t_index)
    out[FRAME_UNIFORM] = jnp.where((token_task == FORCING) & (seg > 0) & ~cond, u, -1.0)
  return out, dict(task=task, cond_tokens=jnp.sum(cond.astype(jnp.float32)))
