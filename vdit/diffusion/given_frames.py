"""Frames given to the sampler (image-to-video, extension, interpolation, looping), in numpy.

The inference side of `conditioning`: user inputs become clean conditioning tokens exactly
as the model saw them in training — whole patch-frames at the start and/or end of a video,
marked by `conditioning.frames_mask`, the rest generated.

Policy for inputs that do not fit (decided here, documented in docs/sampling.md):
  * another height/width → centre-cropped to the requested aspect ratio, then area-resized
    (the training pipeline's `area_resize`), with a warning;
  * fewer frames than a patch-frame (an image) → the last frame repeated to pt frames (a
    still, as the pipeline pads short videos and as image-to-video is trained);
  * a frame count that is not a multiple of pt → cut to whole patch-frames, keeping the
    frames next to the generated ones, with a warning;
  * unreadable / non-RGB inputs, or given frames that leave nothing to generate → InputError.
"""

import dataclasses

import numpy as np
from absl import logging

from vdit import media
from vdit.data import patchify, transforms
from vdit.diffusion import conditioning


class InputError(ValueError):
  """A request the sampler cannot serve; the message names the value and what was expected."""


def fit_size(frames: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
  """uint8 [F, h, w, 3] (or an image [h, w, 3]) → float [F, height, width, 3] in [−1, 1]."""
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise InputError(f"{name}: expected RGB frames [F, H, W, 3], got shape {frames.shape}")
  video = media.from_uint8(frames)
  _, h, w, _ = video.shape
  if (h, w) == (height, width):
    return video
  if h * width > w * height:  # taller than the target aspect: crop rows
    crop = round(w * height / width)
    video = video[:, (h - crop) // 2 : (h - crop) // 2 + crop]
  else:
    crop = round(h * width / height)
    video = video[:, :, (w - crop) // 2 : (w - crop) // 2 + crop]
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


@dataclasses.dataclass
class Given:
  """`video` [1 or N, T, H, W, 3] float (zeros where not given); the first `first` and the
  last `last` patch-frames are given."""

  video: np.ndarray
  first: int
  last: int

  def tokens(self, grid, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """(x_cond [1 or N, L, P], cond_mask [L]) for a video of patch grid `grid`."""
    x_cond, positions, _ = patchify.patchify(self.video, patch_size)
    mask = conditioning.frames_mask(positions[:, 0], grid[0], self.first, self.last)
    return x_cond, mask


def place(head: list, tail: list, num_frames: int, pt: int) -> Given:
  """Clips (each [F, H, W, 3] or [N, F, H, W, 3], whole patch-frames) at the start (`head`,
  in order) and the end (`tail`, in order) of a `num_frames`-frame video."""
  clips = [c if c.ndim == 5 else c[None] for c in head + tail]
  given = sum(c.shape[1] for c in clips)
  if given >= num_frames:
    raise InputError(
      f"num_frames={num_frames} leaves nothing to generate after the {given} given frames; "
      f"expected more than {given}"
    )
  n = max(c.shape[0] for c in clips)
  video = np.zeros((n, num_frames, *clips[0].shape[2:]), np.float32)
  start, end = 0, num_frames
  for c in clips[: len(head)]:
    video[:, start : start + c.shape[1]] = c
    start += c.shape[1]
  for c in clips[len(head) :][::-1]:
    video[:, end - c.shape[1] : end] = c
    end -= c.shape[1]
  return Given(video, start // pt, (num_frames - end) // pt)
