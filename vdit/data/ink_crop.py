"""The ink of a frame, cropped: a box around the one drawn object, as an ink map of fixed size.

A `moving_digits` digit is ink of one colour blended over a flat paper colour
(`vdit.datasets.moving_digits`: pixel = paper·(1 − α) + ink·α), and it covers a small part of a
canvas of any size. A classifier that sees the whole canvas squashed to a small grid sees a
few blurred pixels of digit; this transform undoes the drawing instead, per frame:

1. Paper: the per-channel median of the frame (the digit covers well under half of it).
2. Ink colour: the mean of the pixels at ≥ `INK_FRACTION` of the largest distance from the
   paper (robust to one stray pixel); a frame whose largest distance is below `MIN_CONTRAST`
   has no ink (blank): its crop is all paper.
3. Opacity: every pixel's difference from the paper projected on (ink − paper), clipped to
   [0, 1] — the α the frame was drawn with, whatever the colours.
4. Box: the bounding box of the pixels with α ≥ `BOX_ALPHA`, grown by `MARGIN` of its size on
   each side and widened to the target aspect ratio around its centre (a square for a square
   target, so a tall "1" stays thin); outside the frame is paper.
5. The α map inside the box, area-resized to (height, width), as a video in [-1, 1] (paper −1,
   ink +1) repeated over the 3 channels: colour-free, position-free and scale-free.

On noise, "ink" is wherever a pixel happens to lie along the chosen colour direction: the box
is about the whole frame and the crop is noise. Two objects in one frame share one box (the
dense pipeline skips such examples in training, `vdit.data.dense`, fit="ink").

The classifier's training batches (`input.fit="ink"`) and the `digits` evaluator's generated
frames (`vdit.evaluators.classifier`) go through this same function.
"""

import numpy as np

from vdit.data import transforms

MIN_CONTRAST = 0.3  # in [-1, 1] units (≈ 38/255): below this the frame is blank paper
INK_FRACTION = 0.8  # ink colour = mean of the pixels this close to the farthest one
BOX_ALPHA = 0.5  # opacity a pixel needs to count towards the box
MARGIN = 0.1  # fraction of the box size added on each side


def ink_alpha(frame: np.ndarray) -> np.ndarray:
  """The drawn opacity α [H, W] in [0, 1] of a float frame [H, W, C] (see module docstring)."""
  frame = np.asarray(frame, np.float32)
  paper = np.median(frame.reshape(-1, frame.shape[-1]), axis=0)  # [C]
  diff = frame - paper  # [H, W, C]
  dist = np.linalg.norm(diff, axis=-1)  # [H, W]
  far = float(dist.max())
  if far < MIN_CONTRAST:
    return np.zeros(frame.shape[:2], np.float32)
  ink = diff[dist >= INK_FRACTION * far].mean(0)  # [C]: ink − paper
  alpha = diff @ ink / max(float(ink @ ink), 1e-6)
  return np.clip(alpha, 0.0, 1.0).astype(np.float32)


def ink_box(alpha: np.ndarray, aspect: float = 1.0) -> tuple[int, int, int, int] | None:
  """(top, left, height, width) of the box around α ≥ BOX_ALPHA with margins, width/height =
  `aspect`; may extend beyond the frame. None if no pixel reaches BOX_ALPHA."""
  ys, xs = np.nonzero(alpha >= BOX_ALPHA)
  if len(ys) == 0:
    return None
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  h = (y1 - y0) * (1 + 2 * MARGIN)
  w = (x1 - x0) * (1 + 2 * MARGIN)
  h, w = max(h, w / aspect), max(w, h * aspect)  # grow the short side to the aspect
  h, w = max(1, int(round(h))), max(1, int(round(w)))
  top = int(round((y0 + y1 - h) / 2))
  left = int(round((x0 + x1 - w) / 2))
  return top, left, h, w


def crop_alpha(alpha: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
  """α [H, W] inside `box`, zero (paper) outside the frame; the whole α if `box` is None."""
  if box is None:
    return alpha
  top, left, h, w = box
  out = np.zeros((h, w), np.float32)
  fh, fw = alpha.shape
  ys, ye = max(top, 0), min(top + h, fh)
  xs, xe = max(left, 0), min(left + w, fw)
  if ys < ye and xs < xe:
    out[ys - top : ye - top, xs - left : xe - left] = alpha[ys:ye, xs:xe]
  return out


def ink_crops(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Float video [T, H, W, C] in [-1, 1] → the ink crops [T, height, width, 3] in [-1, 1]."""
  crops = []
  for frame in video:
    alpha = ink_alpha(frame)
    crop = crop_alpha(alpha, ink_box(alpha, width / height))
    crops.append(transforms.area_resize(crop[None, :, :, None], height, width)[0])
  out = np.stack(crops)  # [T, height, width, 1] α
  return np.repeat(out * 2.0 - 1.0, 3, axis=-1).astype(np.float32)
