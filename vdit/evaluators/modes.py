"""`modes`: does every conditioning mode of the sampler do what it says, on real `shapes` clips?

Each of `num_videos` real validation clips (one object, at least the requested number of frames,
the aspect ratios nearest the requested size's, resized to it) drives every mode of the task's
sampler (`vdit.sampling.Sampler`) with its own caption:

  i2v          the clip's first frame → a video: the frame comes back and the object moves as
               the caption says.
  extend_fwd   the clip's first half given, the second half generated.
  extend_bwd   the clip's second half given, the first half generated.
  interpolate  the clip's first and last quarter given, the middle generated.
  keyframes    two of the clip's frames given as images, frame 0 and the last frame of the
               patch-frame past the middle (`keyframe`; 5 of 8 frames): each fills its
               patch-frame as a still, the video is generated through and beyond them.
  loop         a loop from the clip's first frame: the last frame leads back to the first.
  edit         SDEdit at `strength` with the caption's colour word changed to the next colour of
               the vocabulary: the object takes the new colour and keeps its shape and motion.
  retake       the middle half of the frames regenerated, the others given.
  inpaint      a centred box of half the height and width regenerated in every frame.
  outpaint     the clip's centre strip of half its width given, on a canvas of the full width:
               the border generated.
  long         (opt-in: `modes=(..., "long")`, it samples videos `long_length`× longer) a video
               `long_length` (4) times the longest training clip from the caption alone,
               window by window (`Sampler.long`: windows of that clip's length, half of each
               given to the next).
The regions of retake, inpaint and outpaint are whole patches (`region`; a margin of a quarter
of the patches, rounded, on either side), in the output's pixels: a latent run's patches of
latent cells cover fs × fs pixels each, and its `size` is in latent units.

Scores, `{mode}_{score}`, means over the clips:
  colour, shape, direction, all, temporal   `shapes_scorer` against the prompt (for `edit` the
               new colour with the clip's shape and direction; for `loop` only colour, shape and
               temporal: a loop's object comes back, it has no one direction);
  given_psnr   dB between the given frames and the same frames of the output (pixel space:
               exact, reported as 99; latent space: within the VAE's round trip); inpaint and
               outpaint: over the kept pixels;
  new_psnr     dB between the generated frames and the clip's own frames there (the objects
               move at constant speed: the clip is the answer), and `hold_psnr`, that of the
               nearest given frame held still: a model that does not continue the motion;
               inpaint and outpaint: over the generated pixels, beside `fill_psnr`, that of
               those pixels painted each frame's median kept colour (the background without
               the object: a model that only extends the background);
  new_direction  the direction scored on the generated frames alone (not for inpaint and
               outpaint, whose generated pixels are a region of every frame);
  seam         loop: the mean |last − first| frame difference over the mean difference of
               consecutive frames (≈ 1: seamless; ≫ 1: a jump);
  track        edit: mean distance (px) between the object's centroid in the output and in the
               clip.
  long_colour, long_shape, long_direction, long_all  `shapes_scorer` on every slice of the long
               video one window long (non-overlapping), averaged over the windows and the videos
               (the issue's "adherence per window"); long_identity, the share of windows whose
               object has the first window's colour and shape; long_persistence, long_smoothness,
               long_temporal over the whole video (one object throughout, constant motion);
               long_video_all, `all` read off the whole video; long_direction_w0, _w1, ...
               the direction per window (which windows keep moving as asked).
`real_*` are the scorer's results on the chosen clips (the ceiling). The outputs of each mode
are written as one grid GIF, `workdir/samples/<step>/modes_<mode>.gif` (the clips: `modes_real`).
"""

import os

import numpy as np

from vdit import sampling
from vdit.data import transforms
from vdit.datasets import shapes
from vdit.diffusion import given_frames
from vdit.evaluators import Context, NotApplicable, predict_fn, shapes_scorer, validation
from vdit.evaluators.adherence import write_grid

MODES = (
  *("i2v", "extend_fwd", "extend_bwd", "interpolate", "loop", "edit"),
  *("retake", "inpaint", "outpaint", "keyframes"),
)
LONG = "long"  # not in MODES (not run by default): videos several training clips long
REGIONS = {"retake": (0,), "inpaint": (1, 2), "outpaint": (2,)}  # the axes each halves
SCORES = ("colour", "shape", "direction", "all", "temporal")


def clips(data, num_videos: int, size: tuple[int, int, int], vocab: shapes_scorer.Vocabulary):
  """(uint8 clips [N, T, H, W, 3], captions) from a `shapes` split: the `num_videos` clips with
  one object of the vocabulary and ≥ T frames whose aspect ratio is nearest H:W (ties in split
  order), their first T frames resized to H × W. ValueError if fewer qualify."""
  t, h, w = size
  found = []  # (aspect-ratio distance, split index, video, caption), each example read once
  for i in range(len(data)):
    ex = data[i]
    video, caption = ex["video"], validation.caption_of(ex)
    objects = shapes_scorer.parse_caption(caption)
    if len(objects) == 1 and objects[0].colour in vocab.colours and len(video) >= t:
      found.append((abs(np.log(video.shape[1] / video.shape[2] * w / h)), i, video, caption))
  if len(found) < num_videos:
    raise ValueError(
      f"num_videos={num_videos}: only {len(found)} validation clips have one object and ≥ {t} "
      "frames"
    )
  nearest = sorted(found, key=lambda f: f[:2])[:num_videos]
  videos = [transforms.area_resize(np.asarray(v[:t], np.float32), h, w) for _, _, v, _ in nearest]
  return np.round(np.stack(videos)).astype(np.uint8), [c for *_, c in nearest]


def recoloured(caption: str, vocab: shapes_scorer.Vocabulary) -> str:
  """The caption with its object's colour word replaced by the next colour of `vocab`."""
  (obj,) = shapes_scorer.parse_caption(caption)
  new = vocab.colours[(vocab.colours.index(obj.colour) + 1) % len(vocab.colours)]
  return caption.replace(f"a {obj.colour} {obj.shape}", f"a {new} {obj.shape}", 1)


def frames(mode: str, t: int, pt: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(given, generated) frame masks [T] of a T-frame video in a frame-conditioning mode or
  retake (None for the others); given spans are whole patch-frames of `pt` frames. In i2v the
  image fills the first patch-frame as a still: only its frame 0 is the clip's, and the rest is
  generated."""
  index = np.arange(t)
  if mode == "retake":
    given = kept(region(mode, (t, 1, 1), (pt, 1, 1)), (pt, 1, 1))[:, 0, 0]
    return given, ~given
  if mode == "keyframes":  # each image fills its patch-frame as a still: those are not generated
    key = keyframe(t, pt)
    stills = (index < pt) | (index // pt == key // pt)
    return (index == 0) | (index == key), ~stills
  half, quarter = max(pt, t // 2 // pt * pt), max(pt, t // 4 // pt * pt)
  given = {
    "i2v": index < 1,
    "extend_fwd": index < half,
    "extend_bwd": index >= t - half,
    "interpolate": (index < quarter) | (index >= t - quarter),
  }.get(mode)
  if given is None:
    return None
  return given, ~given & ~((mode == "i2v") & (index < pt))


def keyframe(t: int, pt: int) -> int:
  """The second keyframe's index in a T-frame video: the last frame of the patch-frame past the
  middle (frame 5 of 8 with pt = 2), so that frames are generated between and after it."""
  return t // pt // 2 * pt + pt - 1


def region(mode: str, shape: tuple[int, int, int], patch: tuple[int, int, int]) -> np.ndarray:
  """The pixels [T, H, W] a region mode asks to regenerate in a clip of `shape` (T, H, W):
  retake the middle half of the frames, inpaint a centred box of half the height and width in
  every frame, outpaint all but a centred strip of half the width (the crop that is given).
  Each middle half leaves a margin of whole patches (`patch` = (pt, ph, pw) pixels, counted
  from the top-left as the sampler's canvas) on either side: a quarter of the patches, rounded,
  ≥ 1. Fewer than 3 patches along an axis the mode halves → ValueError."""
  middle = np.ones(shape, bool)
  for axis in REGIONS[mode]:
    n, p = shape[axis], patch[axis]
    count = -(-n // p)
    if count < 3:
      name = ("frames", "height", "width")[axis]
      raise ValueError(
        f"{mode}: the {name} ({n}) span {count} patch(es) of {p}; a centred region with a "
        "margin kept on either side needs ≥ 3"
      )
    lo = max(1, (count + 2) // 4) * p
    span = (np.arange(n) >= lo) & (np.arange(n) < n - lo)
    middle &= np.expand_dims(span, [a for a in range(3) if a != axis])
  return ~middle if mode == "outpaint" else middle


def kept(regen: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
  """The pixels [T, H, W] the sampler keeps when asked to regenerate `regen` [T, H, W]: a patch
  (`patch` pixels on the canvas of whole patches from the top-left, its extra pixels repeating
  the edge) is kept only if all its pixels are; the others are generated."""
  pad = [(0, -n % p) for n, p in zip(regen.shape, patch)]
  cells = given_frames.pool_all(~np.pad(regen, pad, mode="edge"), patch)
  for axis, p in enumerate(patch):
    cells = cells.repeat(p, axis)
  return cells[tuple(slice(n) for n in regen.shape)]


def filled(clip: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """The clip with its pixels outside `keep` [T, H, W] painted, frame by frame, the per-channel
  median of the frame's kept pixels: the background without the object (the inpaint and
  outpaint baseline)."""
  out = clip.copy()
  for frame, k in zip(out, keep):
    frame[~k] = np.round(np.median(frame[k], axis=0)).astype(np.uint8)
  return out


def pixel_patch(sampler) -> tuple[int, int, int]:
  """A token's footprint (frames, rows, columns) in the sampler's output pixels (latent space:
  its latent cells are fs × fs pixels each; time compression 1, as `evaluate` requires)."""
  fs = sampler.codec.compression[1] if sampler.codec is not None else 1
  pt, ph, pw = sampler.patch_size
  return pt, fs * ph, fs * pw


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """dB between uint8 arrays; identical arrays give 99."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return 99.0 if mse == 0 else float(min(99.0, 10 * np.log10(255.0**2 / mse)))


def held(clip: np.ndarray, given: np.ndarray) -> np.ndarray:
  """The clip with every frame replaced by its nearest given frame (a still continuation)."""
  at = np.flatnonzero(given)
  nearest = at[np.argmin(np.abs(np.arange(len(clip))[:, None] - at[None]), axis=1)]
  return clip[nearest]


def seam(video: np.ndarray) -> float:
  """Loop seam: mean |last − first| over the mean |consecutive difference| of a video."""
  v = np.asarray(video, np.float32)
  return float(np.abs(v[-1] - v[0]).mean() / max(np.abs(np.diff(v, axis=0)).mean(), 1e-3))


def track(video: np.ndarray, colour: str, clip: np.ndarray, clip_colour: str) -> float:
  """Mean distance (px) between the centroids of the `colour` object in `video` and of the
  `clip_colour` one in `clip`, over the frames where both are present (the frame's diagonal if
  there are none)."""
  found = []
  for v, c in ((video, colour), (clip, clip_colour)):
    label, alpha = shapes_scorer.segment(np.asarray(v), (c,))
    found.append(shapes_scorer.centroids(alpha * (label == 0)))
  (a, area_a), (b, area_b) = found
  both = (area_a >= shapes_scorer.MIN_AREA) & (area_b >= shapes_scorer.MIN_AREA)
  if not both.any():
    return float(np.hypot(*np.shape(video)[1:3]))
  return float(np.linalg.norm(a[both] - b[both], axis=-1).mean())


def score(mode: str, video, clip, caption: str, vocab, patch) -> dict[str, float]:
  """The scores (module doc) of one output `video` of `mode` for the real `clip` and its
  `caption` (the edit prompt is `recoloured(caption)`); `patch`: a token's pixels (pt, ph, pw,
  `pixel_patch`)."""
  prompt = recoloured(caption, vocab) if mode == "edit" else caption
  s = shapes_scorer.score(video, prompt, vocab)
  out = {k: s[f"{k}_ok"] for k in SCORES[:4]} | {"temporal": s["temporal"]}
  masks = frames(mode, len(clip), patch[0])
  if masks is not None:
    given, new = masks
    out["given_psnr"] = psnr(video[given], clip[given])
    out["new_psnr"] = psnr(video[new], clip[new])
    out["hold_psnr"] = psnr(held(clip, given)[new], clip[new])
    out["new_direction"] = shapes_scorer.score(video[new], prompt, vocab)["direction_ok"]
  if mode == "loop":
    out = {k: out[k] for k in ("colour", "shape", "temporal")}
    out |= {"given_psnr": psnr(video[:1], clip[:1]), "seam": seam(video)}
  if mode == "edit":
    new, (old,) = shapes_scorer.parse_caption(prompt)[0], shapes_scorer.parse_caption(caption)
    out["track"] = track(video, new.colour, clip, old.colour)
  if mode in ("inpaint", "outpaint"):
    keep = kept(region(mode, clip.shape[:3], patch), patch)
    out["given_psnr"] = psnr(video[keep], clip[keep])
    out["new_psnr"] = psnr(video[~keep], clip[~keep])
    out["fill_psnr"] = psnr(filled(clip, keep)[~keep], clip[~keep])
  return out


def longest_clip(config, variant: str) -> int:
  """The longest clip (the model's frames) the run trained on: the pipeline's `max_frames`, or
  the `shapes` variant's longest video if shorter (a per-frame latent run: the same count)."""
  lengths = [c.max_frames for c in shapes.Shapes.BUILDER_CONFIGS if c.name == variant]
  return min([int(config.input.max_frames), *lengths])


def long_scores(video: np.ndarray, caption: str, vocab, window: int) -> dict[str, float]:
  """The `long` scores (module doc) of a long uint8 video [T, H, W, 3] for its caption: the
  scorer on each non-overlapping `window`-frame slice (a shorter last one is left out), and on
  the whole video."""
  slices = [video[i : i + window] for i in range(0, len(video) - window + 1, window)]
  per = [shapes_scorer.score(v, caption, vocab) for v in slices]
  whole = shapes_scorer.score(video, caption, vocab)
  mean = lambda values: float(np.mean(values))
  first = (per[0]["pred_colour"], per[0]["pred_shape"])
  out = {k: mean([p[f"{k}_ok"] for p in per]) for k in SCORES[:4]}
  # Per window: does the motion go on as asked after the first clip's length?
  out |= {f"direction_w{i}": p["direction_ok"] for i, p in enumerate(per)}
  out["identity"] = mean([(p["pred_colour"], p["pred_shape"]) == first for p in per])
  out |= {k: whole[k] for k in ("persistence", "smoothness", "temporal")}
  return out | {"video_all": whole["all_ok"]}


def generate(sampler, mode: str, clip: np.ndarray, caption: str, vocab, **options) -> np.ndarray:
  """One output [T, H, W, 3] of `mode` for a real clip [T, H, W, 3] (pixels) and its caption;
  `options`: height and width (the model's units), strength (edit) and the sampling options."""
  t, patch = len(clip), pixel_patch(sampler)
  strength = options.pop("strength")
  masks = frames(mode, t, patch[0])
  if mode == "i2v":
    out = sampler.image_to_video([caption], clip[0], num_frames=t, **options)
  elif mode in ("extend_fwd", "extend_bwd"):
    direction = "forward" if mode == "extend_fwd" else "backward"
    out = sampler.extend([caption], clip[masks[0]], direction=direction, num_frames=t, **options)
  elif mode == "interpolate":
    q = int(np.argmin(masks[0]))  # the first generated frame = the length of each given end
    out = sampler.interpolate([caption], clip[:q], clip[t - q :], num_frames=t, **options)
  elif mode == "keyframes":
    key = keyframe(t, patch[0])
    out = sampler.keyframes([caption], [(clip[0], 0), (clip[key], key)], num_frames=t, **options)
  elif mode == "loop":
    out = sampler.loop([caption], image=clip[0], num_frames=t, **options)
  elif mode == "edit":
    out = sampler.edit([recoloured(caption, vocab)], clip, strength=strength, **options)
  elif mode == "retake":
    new = np.flatnonzero(masks[1])
    out = sampler.retake([caption], clip, frames=(int(new[0]), int(new[-1]) + 1), **options)
  elif mode == "inpaint":
    out = sampler.inpaint([caption], clip, region(mode, clip.shape[:3], patch)[0], **options)
  elif mode == "outpaint":  # the centre strip given, the canvas of the clip's width (options)
    given = np.flatnonzero(~region(mode, clip.shape[:3], patch)[0, 0])
    out = sampler.outpaint([caption], clip[:, :, given[0] : given[-1] + 1], **options)
  else:
    raise ValueError(f"mode={mode!r} is unknown; expected one of {MODES}")
  return out[0]


def evaluate(
  ctx: Context,
  *,
  num_videos: int = 24,
  size: tuple[int, int, int] | None = None,
  modes: tuple[str, ...] = MODES,
  steps: int = 16,
  guidance: float | None = None,
  strength: float = 0.6,
  seed: int = 0,
  dataset_config: str | None = None,
  long_length: int = 4,
  long_window: int | None = None,
  long_context: int | None = None,
  long_context_noise: float = 0.0,
) -> dict:
  """`size` = (num_frames, height, width) in the model's units (default: the config's `sample`
  size); `dataset_config` (default: the run's) picks the `shapes` variant whose validation clips
  and words are used; `guidance` defaults to the config's `sample.guidance`. `long`: videos of
  `long_length` × the longest training clip (`longest_clip`) at `size`'s height and width, in
  windows of `long_window` frames (default: that clip's, whole patch-frames) with
  `long_context` frames of context (default: half) at noise level `long_context_noise`."""
  config, fns, params, workdir, step = ctx
  unknown = set(modes) - {*MODES, LONG}
  if unknown:
    raise ValueError(f"modes={sorted(unknown)} are unknown; expected some of {(*MODES, LONG)}")
  sampler = predict_fn(fns, "sampler")(params)
  s = sampling.settings(config)
  t, h, w = (int(x) for x in (size or (s.num_frames, s.height, s.width)))
  if t < 3 * sampler.pt:
    raise ValueError(
      f"size={(t, h, w)}: interpolation needs ≥ 3 patch-frames of {sampler.pt}, ≥ {3 * sampler.pt} "
      "frames"
    )
  try:
    sampler.check_per_frame("the modes", "given frames cannot be compared frame by frame")
  except given_frames.InputError as e:
    raise NotApplicable(str(e)) from None
  pixels, patch = sampler.pixel_size(t, h, w), pixel_patch(sampler)
  for mode in [m for m in modes if m in REGIONS]:
    region(mode, pixels, patch)  # too small: ValueError before any sampling
  dataset, variant = validation.pixel_dataset(config)
  if dataset != "shapes":
    raise NotApplicable(f"it scores `shapes` clips, and the run's videos are {dataset!r}")
  variant = dataset_config or variant
  data = validation.source(config, dataset, variant)
  vocab = shapes_scorer.Vocabulary.of_dataset(variant)
  real, captions = clips(data, num_videos, pixels, vocab)
  options = dict(height=h, width=w, steps=steps, strength=strength)
  options["guidance"] = s.guidance if guidance is None else guidance
  ceiling = _mean([score("t2v", c, c, p, vocab, patch) for c, p in zip(real, captions)])
  out = {f"real_{k}": v for k, v in ceiling.items()}
  grid_dir = os.path.join(workdir, "samples", str(step))
  write_grid(os.path.join(grid_dir, "modes_real.gif"), list(real))
  longest = longest_clip(config, variant)
  window = long_window or max(sampler.pt, longest // sampler.pt * sampler.pt)
  long_options = dict(num_frames=long_length * longest, window=window, context=long_context)
  long_options["context_noise"] = long_context_noise
  for mode in modes:
    videos, scores = [], []
    for i, (clip, caption) in enumerate(zip(real, captions)):
      if mode == LONG:
        opts = {k: v for k, v in options.items() if k != "strength"} | long_options
        video = sampler.long([caption], seed=seed + i, **opts)[0]
        videos.append(video)
        scores.append(long_scores(video, caption, vocab, sampler.pixel_size(window, h, w)[0]))
        continue
      video = generate(sampler, mode, clip, caption, vocab, seed=seed + i, **options)
      videos.append(video)
      scores.append(score(mode, video, clip, caption, vocab, patch))
    write_grid(os.path.join(grid_dir, f"modes_{mode}.gif"), videos)
    out.update({f"{mode}_{k}": v for k, v in _mean(scores).items()})
  if LONG in modes:
    out |= {"long_num_frames": long_length * longest, "long_window": window}
  return out | {"count": len(real)}


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
