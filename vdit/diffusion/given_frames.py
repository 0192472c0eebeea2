"""Frames and regions given to the sampler (image-to-video, extension, interpolation, looping,
keyframes, retake, inpaint, outpaint), in numpy.

The inference side of `conditioning`: user inputs become clean conditioning tokens exactly
as the model saw them in training — whole patch-frames at the start and/or end of a video
(`place`, marked by `conditioning.frames_mask`) or anywhere (keyframes, `place_at`), or any
set of tokens (retake, inpaint, outpaint: `Given.cells`), the rest generated.

Policy for inputs that do not fit (decided here, documented in docs/sampling.md):
  * another height/width → centre-cropped to the requested aspect ratio, then area-resized
    (the training pipeline's `area_resize`), with a warning;
  * fewer frames than a patch-frame (an image) → the last frame repeated to pt frames (a
    still, as the pipeline pads short videos and as image-to-video is trained);
  * a frame count that is not a multiple of pt → cut to whole patch-frames, keeping the
    frames next to the generated ones, with a warning;
  * keyframes: an image fills the patch-frame holding its index (any index); a clip must start
    at a multiple of pt (`keyframe_start`);
  * a pixel mask (retake's frame range, inpaint's mask, outpaint's border) → tokens: a token
    is kept only if every pixel it covers is (`pool_all`; in latent space first every latent
    cell, `latent_cells`), so the regenerated part widens to whole patches; a mask is fitted
    to a resized video as the video is, any pixel to regenerate winning (`fit_mask`);
  * unreadable / non-RGB inputs, keyframes that overlap or lie out of range, a frame range that
    is empty or outside the video, a mask of another size than the video, or given frames that
    leave nothing to generate → InputError.
"""

import dataclasses

import numpy as np
from absl import logging

from vdit import media
from vdit.data import patchify, transforms
from vdit.diffusion import conditioning


class InputError(ValueError):
  """A request the sampler cannot serve; the message names the value and what was expected."""


def rgb_frames(frames, name: str) -> np.ndarray:
  """uint8 frames [F, H, W, 3] (an image [H, W, 3] is one frame); other shapes → InputError."""
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise InputError(f"{name}: expected RGB frames [F, H, W, 3], got shape {frames.shape}")
  return frames


def _centre_crop(h: int, w: int, height: int, width: int) -> tuple[slice, slice]:
  """The rows and columns of an h × w frame kept when cropping it to height : width."""
  if h * width > w * height:  # taller than the target aspect: crop rows
    crop = round(w * height / width)
    return slice((h - crop) // 2, (h - crop) // 2 + crop), slice(None)
  crop = round(h * width / height)
  return slice(None), slice((w - crop) // 2, (w - crop) // 2 + crop)


def fit_size(frames: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
  """uint8 [F, h, w, 3] (or an image [h, w, 3]) → float [F, height, width, 3] in [−1, 1]."""
  video = media.from_uint8(rgb_frames(frames, name))
  _, h, w, _ = video.shape
  if (h, w) == (height, width):
    return video
  rows, cols = _centre_crop(h, w, height, width)
  video = video[:, rows, cols]
  logging.warning(
    "%s: %dx%d resized to %dx%d (centre crop to the aspect ratio, then area resize)",
    *(name, h, w, height, width),
  )
  return transforms.area_resize(video, height, width)


def patch_frames(video: np.ndarray, pt: int, keep: str, name: str) -> np.ndarray:
  """Frames [F, ...] as whole patch-frames; keep="last" for a clip before the generated
  frames, "first" for a clip after them (which frames survive a cut)."""
  f = video.shape[0]
  if f < pt:
    return np.concatenate([video, np.repeat(video[-1:], pt - f, axis=0)])
  extra = f % pt
  if extra:
    logging.warning("%s: %d frames cut to %d (whole patch-frames of %d)", name, f, f - extra, pt)
    video = video[extra:] if keep == "last" else video[: f - extra]
  return video


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """A bool mask [F, h, w] of pixels to regenerate fitted to [F, height, width] as `fit_size`
  fits its video (centre crop, area resize): True wherever a True pixel contributes, so a pixel
  to regenerate is never kept."""
  _, h, w = mask.shape
  if (h, w) == (height, width):
    return mask
  rows, cols = _centre_crop(h, w, height, width)
  area = transforms.area_resize(mask[:, rows, cols, None].astype(np.float32), height, width)
  return area[..., 0] > 0


def region_mask(mask, shape: tuple[int, int, int], name: str = "mask") -> np.ndarray:
  """The pixels to regenerate of a video of `shape` (F, H, W), as bool [F, H, W], from `mask`
  [H, W] (every frame) or [F, H, W]: booleans or numbers in [0, 1], nonzero = regenerate.
  Another size, or other values → InputError."""
  mask, (f, h, w) = np.asarray(mask), shape
  if mask.shape not in ((h, w), (f, h, w)):
    raise InputError(
      f"{name}: shape {mask.shape} does not fit the video's {f} frames of {h}×{w}; expected "
      f"({h}, {w}) for every frame or ({f}, {h}, {w})"
    )
  if mask.dtype != bool:
    numeric = np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)
    if not numeric or not (np.isfinite(mask).all() and 0 <= mask.min() and mask.max() <= 1):
      values = f"{mask.min()} … {mask.max()}" if numeric else f"dtype {mask.dtype}"
      raise InputError(
        f"{name}: values {values}; expected booleans or numbers in [0, 1] (nonzero = regenerate)"
      )
  return np.broadcast_to(mask > 0, shape).copy()


def frame_range(frames, num_frames: int, name: str = "frames") -> tuple[int, int]:
  """(a, b) from `frames` = (a, b): regenerate frames a … b − 1 of a `num_frames`-frame video.
  Not a pair of frame numbers, empty, or outside 0 … num_frames → InputError."""
  try:
    a, b = frames
  except (TypeError, ValueError):
    raise InputError(f"{name}={frames!r} is not a pair (a, b) of frame numbers") from None
  if not all(isinstance(x, (int, np.integer)) for x in (a, b)):
    raise InputError(f"{name}={frames!r} is not a pair (a, b) of frame numbers")
  if a >= b:
    raise InputError(f"{name}={a}:{b} is empty; expected a < b (frames a … b − 1 are regenerated)")
  if a < 0 or b > num_frames:
    raise InputError(
      f"{name}={a}:{b} lies outside the video's {num_frames} frames; expected 0 ≤ a < b ≤ "
      f"{num_frames}"
    )
  return int(a), int(b)


def pool_all(mask: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
  """bool [T, H, W] (multiples of `block`) → [T/bt, H/bh, W/bw]: True where the whole block is
  (a token, or a latent cell, is kept only if everything it covers is)."""
  t, h, w = mask.shape
  bt, bh, bw = block
  return mask.reshape(t // bt, bt, h // bh, bh, w // bw, bw).all(axis=(1, 3, 5))


def latent_cells(kept: np.ndarray, compression: tuple[int, int, int]) -> np.ndarray:
  """Kept pixels [1 + ft·k, fs·H', fs·W'] → kept latent cells [1 + k, H', W'] of a causal VAE
  compressing (ft, fs, fs): frame 0 is latent frame 0 alone, then ft frames per latent frame;
  a cell is kept only if every pixel of its footprint is (the encoder also sees its
  neighbours, so kept cells next to regenerated pixels are approximate; docs/sampling.md)."""
  ft, fs, _ = compression
  return pool_all(np.concatenate([np.repeat(kept[:1], ft - 1, axis=0), kept]), (ft, fs, fs))


@dataclasses.dataclass
class Given:
  """`video` [1 or N, T, H, W, 3] float (only given tokens are read) and `frames` [T/pt] bool: which
  patch-frames are given (any set: a head and a tail, or keyframes anywhere); with `cells`,
  only those tokens of them (a region: retake, inpaint, outpaint)."""

  video: np.ndarray
  frames: np.ndarray
  cells: np.ndarray | None = None  # [T/pt, H/ph, W/pw] bool given tokens; None: whole frames

  @classmethod
  def region(cls, video: np.ndarray, cells: np.ndarray) -> "Given":
    """`video` with the tokens where `cells` [T/pt, H/ph, W/pw] is True given."""
    return cls(video, cells.any(axis=(1, 2)), cells)

  @property
  def first(self) -> int:
    """The number of leading given patch-frames."""
    return len(self.frames) if self.frames.all() else int(np.argmin(self.frames))

  @property
  def last(self) -> int:
    """The number of trailing given patch-frames."""
    return Given(self.video, self.frames[::-1]).first

  def tokens(self, grid, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """(x_cond [1 or N, L, P], cond_mask [L]) for a video of patch grid `grid`."""
    x_cond, positions, _ = patchify.patchify(self.video, patch_size)
    if self.cells is not None:
      return x_cond, self.cells[tuple(positions.T)]
    return x_cond, self.frames[positions[:, 0]]


def _nothing_to_generate(num_frames: int, given: int) -> InputError:
  return InputError(
    f"num_frames={num_frames} leaves nothing to generate after the {given} given frames; "
    f"expected more than {given}"
  )


def place(head: list, tail: list, num_frames: int, pt: int) -> Given:
  """Clips (each [F, H, W, 3] or [N, F, H, W, 3], whole patch-frames) at the start (`head`,
  in order) and the end (`tail`, in order) of a `num_frames`-frame video."""
  clips = [c if c.ndim == 5 else c[None] for c in head + tail]
  given = sum(c.shape[1] for c in clips)
  if given >= num_frames:
    raise _nothing_to_generate(num_frames, given)
  n = max(c.shape[0] for c in clips)
  video = np.zeros((n, num_frames, *clips[0].shape[2:]), np.float32)
  start, end = 0, num_frames
  for c in clips[: len(head)]:
    video[:, start : start + c.shape[1]] = c
    start += c.shape[1]
  for c in clips[len(head) :][::-1]:
    video[:, end - c.shape[1] : end] = c
    end -= c.shape[1]
  t = num_frames // pt
  frames = conditioning.frames_mask(np.arange(t), t, start // pt, (num_frames - end) // pt)
  return Given(video, frames)


def keyframe_start(index: int, frames: int, still: bool, num_frames: int, pt: int, name: str):
  """The first frame of a keyframe given at frame `index` of a `num_frames`-frame video.

  An image (`still`: one patch-frame of `pt` equal frames) fills the patch-frame that holds
  frame `index`, so that frame is the image whatever the index; a clip of `frames` frames
  (whole patch-frames) must start on a patch-frame boundary (a multiple of `pt`) and end by
  the last frame. Anything else → InputError naming the index and the valid ones.
  """
  if not 0 <= index < num_frames:
    raise InputError(f"{name}: index {index} is out of range; expected 0 … {num_frames - 1}")
  if still:
    return index - index % pt
  if index % pt:
    lo = index - index % pt
    raise InputError(
      f"{name}: a clip must start at a patch-frame boundary (a multiple of {pt}); index {index} "
      f"is not, the nearest valid are {lo} and {lo + pt} (an image may be at any index)"
    )
  if index + frames > num_frames:
    raise InputError(
      f"{name}: {frames} frames at index {index} run past the last frame {num_frames - 1} "
      f"(num_frames={num_frames}); expected index ≤ {num_frames - frames}"
    )
  return index


def place_at(clips: list, num_frames: int, pt: int) -> Given:
  """Clips (each (frames [F, H, W, 3] of whole patch-frames, start frame, name), starts multiples
  of `pt`, in any order) in a `num_frames`-frame video (whole patch-frames); the patch-frames
  between them are generated. Overlapping clips, or no frame left to generate → InputError."""
  video = np.zeros((1, num_frames, *clips[0][0].shape[1:]), np.float32)
  frames = np.zeros(num_frames // pt, bool)
  owner = {}
  for clip, start, name in sorted(clips, key=lambda c: c[1]):
    end = start + len(clip)
    for t in range(start // pt, end // pt):
      if t in owner:
        raise InputError(
          f"{name} (frames {start}–{end - 1}) overlaps {owner[t]} in frames {t * pt}–"
          f"{t * pt + pt - 1}; keyframes need patch-frames of their own ({pt} frames each)"
        )
      owner[t] = name
    video[0, start:end] = clip
    frames[start // pt : end // pt] = True
  if frames.all():
    raise InputError(
      f"the keyframes fill all {len(frames)} patch-frames of num_frames={num_frames}, leaving "
      "nothing to generate; expected more frames or fewer keyframes"
    )
  return Given(video, frames)
