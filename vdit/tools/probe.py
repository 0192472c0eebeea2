r"""Probes of a trained `shapes` text-to-video model: where its generation fails.

  python -m vdit.tools.probe --workdir=runs/shapes [--step=N] [--num_prompts=N]

Seven measurements (eight rows), each on the model's own x̂0 or samples (docs/recipe.md,
"Where the failure is"), on the 48 `a {colour} {shape} moving {direction}` combinations of
the tiny variant:

- **fidelity**: real 8×32×32 clips noised to t, the PSNR of the (unguided) x̂0 over the whole
  frame and over the object's pixels, beside the PSNR of the noisy input itself (x_t / (1 − t)).
  A denoiser that draws the object from what it sees gets better as t falls; an x̂0 that stays
  flat while the input sharpens draws a template, not the object. Beside them, the shape the
  `adherence` scorer reads in x̂0 and in the input, with the clip's own caption.
- **direction**: from pure noise at high t, the centroid of the prompted colour in the x̂0 of
  each prompt, fitted over the frames: its velocity along the prompted direction (px/frame,
  same noise for the four direction words). 0 = the direction word does not steer the motion.
- **i2v**: a centred object as the first patch-frame, 8 frames generated after it (fewer where
  training clips were shorter: 6 for the latent demo), once per direction word; the `adherence`
  scorer's accuracies on the generated frames (direction chance: 25%).
- **extend**: the first 4 frames of a real clip given, 8 more generated (`Sampler.extend`,
  prompt = the clip's caption; 4 more for a model trained on clips of at most 8 frames); the
  `adherence` scorer's accuracies on the generated frames. The context shows the object, its
  shape and its motion: a model that carries content along time keeps all three without
  needing the words (real continuations score 100%).
- **edit**: real clips noised to a strength of the schedule and denoised with their own caption
  (SDEdit, `Sampler.edit`); the `adherence` scorer's accuracies on the results. The object,
  its shape and its motion are in the input: a sampler that keeps them at strength 0.1 and
  loses them at 0.3 rounds the object off on its way down (docs/recipe.md, rows P).
- **shape source**: real clips noised to t, x̂0 with the clip's caption but another shape word:
  the shape read in x̂0 as the word's and as the clip's. Which one decides the shape (docs/
  recipe.md, row F3: the clip's, even at t = 0.8). Again from clips blurred in space first, so
  that only the word can give the outline (row BL: the demo model cannot).
- **words**: from one noise, how far x̂0 moves (mean |Δ| in [-1, 1]) when only the colour,
  the shape or the direction word of the prompt changes. A word whose change moves nothing is
  not read (docs/recipe.md: a text encoder that had erased every word but the colour).

Prints a table and writes workdir/probe/<step>.json. Rectified-flow models, in pixel or latent
space (x̂0 decoded by the autoencoder: every measurement is in pixels).
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from vdit import checkpointing, media, sampling
from vdit.data import patchify
from vdit.datasets import shapes
from vdit.diffusion import objectives
from vdit.evaluators import shapes_scorer
from vdit.tasks import video_diffusion

SIZE = (8, 32, 32)  # (frames, height, width) of the probe clips
OBJECT_DISTANCE = 40.0  # RGB distance from the background colour above which a pixel is object
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ATTRIBUTES = ("colour", "shape", "direction")  # the words of a prompt, in `combinations` order
EDIT_STRENGTHS = (0.1, 0.3, 0.6)  # SDEdit strengths of the `edit` probe
BLUR = 1.5  # σ (model units) of the blurred `shape source` row's clips


def combinations(vocab: shapes_scorer.Vocabulary) -> list[tuple[str, str, str]]:
  """(colour, shape, direction) of every prompt, directions innermost."""
  return [(c, s, d) for c in vocab.colours for s in vocab.shapes for d in vocab.directions]


def swap_word(combos, attribute: str) -> list[tuple[str, str, str]]:
  """`combos` with the word of one of ATTRIBUTES replaced by the next word of that attribute
  (in the order the combinations use, wrapping around)."""
  i = ATTRIBUTES.index(attribute)
  words = list(dict.fromkeys(c[i] for c in combos))
  return [
    tuple(words[(words.index(w) + 1) % len(words)] if j == i else w for j, w in enumerate(c))
    for c in combos
  ]


def prompt(colour: str, shape: str, direction: str) -> str:
  return f"a {colour} {shape} moving {direction}"


def real_clips(combos, size=SIZE) -> np.ndarray:
  """One `shapes` clip per combination (plain caption, default speed): uint8 [N, T, H, W, 3]."""
  clips = []
  for i, (colour, shape, direction) in enumerate(combos):
    spec = shapes.ExampleSpec(
      objects=(shapes.ObjectSpec(colour, shape, direction),),
      background=shapes.contrasting_backgrounds([colour])[0],
      num_frames=size[0],
      height=size[1],
      width=size[2],
    )
    clips.append(shapes.make_example(np.random.default_rng(i), spec)["video"])
  return np.stack(clips)


def centred_object(colour: str, shape: str, height: int, width: int) -> np.ndarray:
  """A still of the object in the middle of a contrasting plain background: uint8 [H, W, 3]."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  radius = sum(shapes.ShapesConfig.object_size) / 2 * min(height, width)  # the dataset's mean
  alpha = np.clip(
    0.5 - shapes.signed_distance(shape, xs - width / 2, ys - height / 2, radius), 0, 1
  )
  background = np.asarray(shapes.BACKGROUNDS[shapes.contrasting_backgrounds([colour])[0]])
  image = (
    background * (1 - alpha[..., None]) + np.asarray(shapes.COLOURS[colour]) * alpha[..., None]
  )
  return np.round(image).astype(np.uint8)


def psnr(estimate: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
  """PSNR (dB) of videos in [-1, 1] ([..., 3]), over the pixels of `mask` ([...]) if given."""
  err = np.square(np.clip(estimate, -1, 1) - target).mean(-1)
  mse = err.mean() if mask is None else (err * mask).sum() / max(mask.sum(), 1)
  return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def object_mask(clips: np.ndarray) -> np.ndarray:
  """Pixels far from their clip's most common (background) colour: bool [N, T, H, W]."""
  flat = clips.reshape(len(clips), -1, 3).astype(np.float32)
  background = np.median(flat, axis=1)[:, None, None, None]
  return np.linalg.norm(clips.astype(np.float32) - background, axis=-1) > OBJECT_DISTANCE


def colour_velocity(video: np.ndarray, rgb: Sequence[float]) -> np.ndarray:
  """(vx, vy) px/frame: the least-squares slope of the centroid of pixels near `rgb`
  (soft weights, 1 at the colour, 0 at distance ≥ 150) over the frames of uint8-range video."""
  weight = np.clip(1 - np.linalg.norm(video - np.asarray(rgb, np.float32), axis=-1) / 150, 0, None)
  weight = weight + 1e-6  # [T, H, W]; an empty frame has its centroid in the middle
  ys, xs = np.mgrid[0 : video.shape[1], 0 : video.shape[2]] + 0.5
  total = weight.sum((1, 2))
  cx, cy = (weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total
  frames = np.arange(len(total))
  return np.array([np.polyfit(frames, cx, 1)[0], np.polyfit(frames, cy, 1)[0]])


class Probe:
  """The model of a `sampling.Sampler` as x̂0 = x_t − t·v̂ (conditional, no guidance), read in
  pixels: a latent model's x̂0 is decoded by its autoencoder."""

  def __init__(self, sampler: sampling.Sampler):
    if sampler.spec.objective != "rectified_flow":
      raise ValueError(
        f"objective={sampler.spec.objective!r}: the probes read x̂0 of rectified-flow models"
      )
    self.sampler = sampler
    self.codec = sampler.codec
    self.size = SIZE  # in the model's units: latent frames and cells in latent space
    if self.codec is not None:  # the latent size of SIZE (its frames rounded down to one)
      ft, fs, _ = self.codec.compression
      self.size = (1 + (SIZE[0] - 1) // ft, SIZE[1] // fs, SIZE[2] // fs)
    self.clip_size = sampler.pixel_size(*self.size)  # (T, H, W) of the real clips, in pixels
    self.grid = sampler.grid(*self.size)
    self.patch_size = sampler.patch_size
    self.channels = sampler.channels

    def apply(x, t, rows):
      return objectives.apply_rows(sampler.model, sampler.params, x, t, rows)

    def x0(x, t, rows):
      velocity = objectives.flow_model(sampler.spec, apply, sampling=True)(x, t, rows)
      return x - t[..., None] * velocity

    self._x0 = jax.jit(x0)

  def rows(self, prompts: Sequence[str]) -> dict:
    """One row per prompt at the probe size, on the device."""
    rows = sampling.prompt_rows(
      prompts, self.grid, self.sampler.tokenizer, self.sampler.config.input.max_caption_tokens
    )
    return {k: jnp.asarray(v) for k, v in rows.items()}

  def noise(self, n: int, seed: int) -> np.ndarray:
    """Pure-noise videos in patches at the probe size, [n, L, P], drawn as the run's training
    noise is (`flow.mixed_noise`: correlated along time if the run's is)."""
    length, dim = int(np.prod(self.grid)), int(np.prod(self.patch_size)) * self.channels
    positions = jnp.broadcast_to(jnp.asarray(patchify.grid_positions(self.grid)), (n, length, 3))
    segment_ids = jnp.ones((n, length), jnp.int32)
    noise_fn = objectives.noise_fn(self.sampler.spec, segment_ids, positions)
    return np.asarray(noise_fn(jax.random.PRNGKey(seed), (n, length, dim)))

  def shared_noise(self, n: int, seed: int) -> np.ndarray:
    """One pure-noise video in patches, the same for all `n` rows: [n, L, P]."""
    one = self.noise(1, seed)
    return np.broadcast_to(one, (n, *one.shape[1:]))

  def patches(self, clips: np.ndarray) -> np.ndarray:
    """uint8 clips [N, T, H, W, 3] → the model's clean patches [N, L, P] (encoded in latent
    space)."""
    video = media.from_uint8(clips)
    if self.codec is not None:
      video = self.codec.encode(video)
    return np.stack([patchify.patchify(v, self.patch_size)[0] for v in video])

  def pixels(self, x: np.ndarray) -> np.ndarray:
    """Patches [N, L, P] → videos [N, T, H, W, 3] in [-1, 1] (decoded in latent space)."""
    video = np.stack([patchify.unpatchify(v, self.grid, self.patch_size, self.channels) for v in x])
    return video if self.codec is None else np.clip(self.codec.decode(video), -1.0, 1.0)

  def x0(self, x: np.ndarray, t: float, rows: dict) -> np.ndarray:
    """x̂0 videos [N, T, H, W, 3] in [-1, 1] of noisy patches x [N, L, P] at time t."""
    t_tok = jnp.full(x.shape[:2], t, jnp.float32)
    return self.pixels(np.asarray(self._x0(jnp.asarray(x), t_tok, rows)))


def fidelity(probe: Probe, combos, times: Sequence[float], seed: int = 0) -> list[dict]:
  """Per t: PSNR of x̂0 and of the rescaled noisy input, whole frame and object pixels, and the
  `adherence` scorer's shape accuracy of each (with the clip's own caption: the shape is in the
  input, and the caption names it)."""
  clips = real_clips(combos, probe.clip_size)
  prompts = [prompt(*c) for c in combos]
  target = media.from_uint8(clips)
  mask = object_mask(clips)
  x0 = probe.patches(clips)
  rows = probe.rows(prompts)
  noise = probe.noise(len(x0), seed)
  results = []
  for t in times:
    x_t = (1 - t) * x0 + t * noise
    estimate = probe.x0(x_t, t, rows)
    given = probe.pixels(x_t / (1 - t))
    results.append(
      dict(
        t=t,
        x0_psnr=psnr(estimate, target),
        x0_object_psnr=psnr(estimate, target, mask),
        input_psnr=psnr(given, target),
        input_object_psnr=psnr(given, target, mask),
        x0_shape=_scores(media.to_uint8(estimate), prompts, combos)["shape"],
        input_shape=_scores(media.to_uint8(given), prompts, combos)["shape"],
      )
    )
  return results


def direction_effect(probe: Probe, combos, times: Sequence[float], seed: int = 0) -> list[dict]:
  """Per t: the mean velocity (px/frame) of the prompted colour in x̂0 along the prompted
  direction, from pure noise shared by the four direction words of a colour and shape."""
  rows = probe.rows([prompt(*c) for c in combos])
  noise = probe.shared_noise(len(combos), seed)  # only the words differ between rows
  results = []
  for t in times:
    videos = (probe.x0(t * noise, t, rows) + 1.0) * 127.5
    along = [
      colour_velocity(v, shapes.COLOURS[c]) @ np.asarray(DIRECTION_VECTORS[d], np.float32)
      for v, (c, _, d) in zip(videos, combos)
    ]
    results.append(dict(t=t, velocity_along_prompt=float(np.mean(along))))
  return results


def shape_source(
  probe: Probe, combos, times: Sequence[float], seed: int = 0, blur: float = 0.0
) -> list[dict]:
  """Per t: real clips noised to t, x̂0 with each clip's caption whose shape word is replaced by
  the next shape; the `adherence` scorer's shape accuracy of x̂0 against the word (`word`) and
  against the clip (`clip`). A model that draws the named shape scores high on `word`; one that
  copies the shape it sees, on `clip`. With `blur` > 0 the clean clips are first blurred in
  space by that σ (the model's units: latent cells; `video_diffusion.blur_patches`), so the
  outline is mostly the word's to give (docs/recipe.md, row BL)."""
  word_prompts = [prompt(*c) for c in swap_word(combos, "shape")]
  clip_prompts = [prompt(*c) for c in combos]
  x0 = probe.patches(real_clips(combos, probe.clip_size))
  if blur:
    n, length = x0.shape[:2]
    positions = np.broadcast_to(patchify.grid_positions(probe.grid), (n, length, 3))
    sigma = jnp.full((n, length), blur, jnp.float32)
    x0 = video_diffusion.blur_patches(
      jnp.asarray(x0), positions, jnp.ones((n, length), jnp.int32), probe.patch_size, sigma
    )
    x0 = np.asarray(x0)
  noise = probe.noise(len(x0), seed)
  rows = probe.rows(word_prompts)
  results = []
  for t in times:
    videos = media.to_uint8(probe.x0((1 - t) * x0 + t * noise, t, rows))
    word = _scores(videos, word_prompts, combos)["shape"]
    results.append(dict(t=t, word=word, clip=_scores(videos, clip_prompts, combos)["shape"]))
  return results


def word_effect(probe: Probe, combos, times: Sequence[float], seed: int = 0) -> list[dict]:
  """Per t: the mean |Δx̂0| when one attribute word (colour, shape, direction) of each prompt is
  replaced by the next word of its vocabulary, from pure noise shared by all the prompts."""
  swapped = {name: swap_word(combos, name) for name in ATTRIBUTES}
  base_rows = probe.rows([prompt(*c) for c in combos])
  other_rows = {name: probe.rows([prompt(*c) for c in cs]) for name, cs in swapped.items()}
  noise = probe.shared_noise(len(combos), seed)
  results = []
  for t in times:
    base = probe.x0(t * noise, t, base_rows)
    change = {
      name: float(np.abs(probe.x0(t * noise, t, rows) - base).mean())
      for name, rows in other_rows.items()
    }
    results.append(dict(t=t, **change))
  return results


def trained_frames(sampler: sampling.Sampler) -> int:
  """Pixel frames of the longest clip the model was trained on (`input.max_frames`, in latent
  frames for a latent model)."""
  frames = int(sampler.config.input.max_frames)
  if sampler.codec is None:
    return frames
  return 1 + sampler.codec.compression[0] * (frames - 1)


def extend_forward(sampler: sampling.Sampler, combos, steps: int = 16) -> dict:
  """Adherence of the frames generated after the first 4 of each combination's real clip: 8
  more, or fewer where the model never saw a clip of 12 frames (the latent demo's 8)."""
  given, total = 4, min(12, trained_frames(sampler))
  clips = real_clips(combos, size=(total, *SIZE[1:]))
  videos, prompts = [], []
  for i, combo in enumerate(combos):
    text = prompt(*combo)
    out = sampler.extend([text], clips[i][:given], num_frames=total, steps=steps, seed=i)[0]
    videos.append(out[given:])
    prompts.append(text)
  return _scores(videos, prompts, combos)


_SCORE_KEYS = ("colour", "shape", "direction", "all", "temporal")


def _scores(videos, prompts, combos) -> dict:
  """The adherence scorer's accuracies and temporal score of `videos` against `prompts`."""
  vocab = shapes_scorer.Vocabulary(*(tuple(dict.fromkeys(x)) for x in zip(*combos)))
  scores = shapes_scorer.score_many(videos, prompts, vocab)
  return {k: float(scores[k]) for k in _SCORE_KEYS}


def i2v_direction(sampler: sampling.Sampler, combos, steps: int = 16) -> dict:
  """Adherence of image-to-video from a centred object, one video per combination, scored on
  the generated frames only (the still fills the first patch-frame; it would show the object
  whatever the model does)."""
  _, height, width = SIZE
  frames = min(SIZE[0] + sampler.pt, trained_frames(sampler))
  videos, prompts = [], []
  for i, (colour, shape, direction) in enumerate(combos):
    image = centred_object(colour, shape, height, width)
    text = prompt(colour, shape, direction)
    out = sampler.image_to_video([text], image, num_frames=frames, steps=steps, seed=i)[0]
    videos.append(out[sampler.pt :])
    prompts.append(text)
  return _scores(videos, prompts, combos)


def edit_strengths(sampler: sampling.Sampler, combos, strengths=EDIT_STRENGTHS, steps=16):
  """Per strength: the adherence of each combination's real clip after SDEdit with its own
  caption (the sampler's default sampler, guidance 3)."""
  clips = real_clips(combos)
  prompts = [prompt(*c) for c in combos]
  results = []
  for strength in strengths:
    videos = [
      sampler.edit([text], clip, strength=strength, steps=steps, seed=i)[0]
      for i, (text, clip) in enumerate(zip(prompts, clips))
    ]
    results.append(dict(strength=strength, **_scores(videos, prompts, combos)))
  return results


def run(
  sampler: sampling.Sampler, *, vocab_config: str = "tiny", num_prompts: int | None = None
) -> dict:
  """All seven probes on the first `num_prompts` combinations (None: all), read in pixels (a
  latent model's x̂0 and samples decoded); their rows and values as one JSON-able dict."""
  vocab = shapes_scorer.Vocabulary.of_dataset(vocab_config)
  if set(vocab.directions) - set(DIRECTION_VECTORS):
    raise ValueError(f"the probes know the directions {sorted(DIRECTION_VECTORS)}")
  combos = combinations(vocab)[:num_prompts]  # None: all of them
  probe = Probe(sampler)
  return dict(
    fidelity=fidelity(probe, combos, (0.02, 0.1, 0.2, 0.3, 0.5)),
    direction=direction_effect(probe, combos, (0.95, 0.8, 0.6)),
    words=word_effect(probe, combos, (0.95, 0.6, 0.3)),
    shape_source=shape_source(probe, combos, (0.5, 0.7, 0.8, 0.9)),
    blurred_shape_source=shape_source(probe, combos, (0.3, 0.5, 0.7), blur=BLUR),
    i2v=i2v_direction(sampler, combos),
    extend=extend_forward(sampler, combos),
    edit=edit_strengths(sampler, combos),
  )


def report(result: dict) -> str:
  """The probes as a readable table."""
  lines = []
  lines.append(
    "fidelity: PSNR (dB) of x̂0 / of the noisy input; whole frame, object pixels; shape read"
  )
  for r in result["fidelity"]:
    lines.append(
      f"  t={r['t']:.2f}  x̂0 {r['x0_psnr']:5.1f} / input {r['input_psnr']:5.1f}   "
      f"object: x̂0 {r['x0_object_psnr']:5.1f} / input {r['input_object_psnr']:5.1f}   "
      f"shape: x̂0 {r['x0_shape']:.2f} / input {r['input_shape']:.2f}"
    )
  lines.append("direction: velocity (px/frame) of the prompted colour along the prompted way")
  for r in result["direction"]:
    lines.append(f"  t={r['t']:.2f}  {r['velocity_along_prompt']:+.3f}")
  lines.append("words: mean |Δx̂0| (pixels in [-1, 1]) when one word of the prompt changes")
  for r in result["words"]:
    lines.append(f"  t={r['t']:.2f}  " + "  ".join(f"{a} {r[a]:.4f}" for a in ATTRIBUTES))
  lines.append(
    "shape source: x̂0 of real clips with another shape word; shape read = the word's / the clip's"
  )
  for r in result["shape_source"]:
    lines.append(f"  t={r['t']:.2f}  word {r['word']:.2f} / clip {r['clip']:.2f}")
  lines.append(f"the same from clips blurred by σ = {BLUR} (the outline is the word's to draw)")
  for r in result["blurred_shape_source"]:
    lines.append(f"  t={r['t']:.2f}  word {r['word']:.2f} / clip {r['clip']:.2f}")
  i2v = result["i2v"]
  lines.append("i2v from a centred object: " + ", ".join(f"{k} {v:.2f}" for k, v in i2v.items()))
  ext = result["extend"]
  lines.append("extend 4 real frames: " + ", ".join(f"{k} {v:.2f}" for k, v in ext.items()))
  lines.append("edit real clips with their caption (SDEdit):")
  for r in result["edit"]:
    lines.append(
      f"  strength {r['strength']:.1f}  " + ", ".join(f"{k} {r[k]:.2f}" for k in _SCORE_KEYS)
    )
  return "\n".join(lines)


def _define_flags() -> None:
  """The CLI's flags: defined only when run as a program, so importing this module next to
  another entry point (one process, e.g. the tests) defines no flag twice."""
  flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer(
    "num_prompts", None, "Probe only the first N prompts (a quick look; default: all 48)."
  )
  flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  step = FLAGS.step if FLAGS.step is not None else checkpointing.latest_step(FLAGS.workdir)
  if step is None:
    raise app.UsageError(f"--workdir={FLAGS.workdir!r} has no checkpoint")
  if FLAGS.num_prompts is not None and FLAGS.num_prompts < 1:
    raise app.UsageError(f"--num_prompts={FLAGS.num_prompts}: expected at least 1")
  sampler = sampling.load(FLAGS.workdir, step)
  result = run(sampler, num_prompts=FLAGS.num_prompts) | {"step": int(step)}
  print(report(result))
  out = os.path.join(FLAGS.workdir, "probe", f"{result['step']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  logging.info("wrote %s", out)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
