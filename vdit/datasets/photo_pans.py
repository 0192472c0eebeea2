"""`photo_pans`: camera pans and zooms over the real photographs shipped with scikit-image.

Real textures for the autoencoder and image-to-video: each example is a moving window over one of
the photographs in `skimage.data` (an astronaut, a cat, coffee, a rocket, the Hubble deep field,
coins, the moon, bricks, grass, ...), rendered at its own canvas size and aspect ratio
(1:3 … 3:1) and duration, panning in one of 8 directions or zooming in/out. A fraction of the
examples are still images (1 frame) of the same photos, so images and videos share rows.

Frames are resampled with bilinear weights from a 2× area pyramid of the photo (no aliasing when
the window is much larger than the canvas). Labels are the photo id; validation uses the same
photos with different windows and motions (a check of fitting, not of unseen content).

Captions, e.g. "a photo of a cup of coffee", "the camera pans left across a brick wall",
"zooming in on an astronaut".
"""

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from vdit.datasets import building

# Photo -> what a caption calls it. Ids are indices: append only.
PHOTOS = {
  "astronaut": "an astronaut",
  "chelsea": "a cat",
  "coffee": "a cup of coffee",
  "rocket": "a rocket on a launch pad",
  "hubble_deep_field": "galaxies in deep space",
  "immunohistochemistry": "stained tissue under a microscope",
  "retina": "a retina",
  "camera": "a man with a camera",
  "coins": "old coins",
  "moon": "the surface of the moon",
  "brick": "a brick wall",
  "grass": "grass",
  "gravel": "gravel",
  "clock": "a clock",
  "page": "a page of text",
  "text": "printed text",
  "cell": "a cell under a microscope",
  "motorcycle": "a motorcycle",
}
PHOTO_NAMES = tuple(PHOTOS)
NUM_CLASSES = len(PHOTOS)
DIRECTIONS = building.DIRECTIONS  # camera (window) motion, unit (dx, dy) with y down
MOTIONS = ("still", "pan", "zoom_in", "zoom_out")


@dataclasses.dataclass(eq=False)
class PhotoPansConfig(tfds.core.BuilderConfig):
  """Sizes and content of one `photo_pans` variant."""

  train_size: int = 1500
  validation_size: int = 150
  min_size: int = 16  # px, smallest canvas side
  max_size: int = 96  # px, largest canvas side
  size_multiple: int = 8  # px
  max_aspect: float = 3.0
  min_frames: int = 4
  max_frames: int = 24
  still_rate: float = 0.25  # fraction of 1-frame examples (images)
  seed: int = 0


@functools.cache
def _pyramid(name: str) -> tuple[np.ndarray, ...]:
  """The photo as float64 RGB [H, W, 3] and its 2× area reductions, down to ~32 px."""
  import skimage.data  # noqa: PLC0415 (only to build)

  load = getattr(skimage.data, name, None) or (lambda: skimage.data.stereo_motorcycle()[0])
  image = load()
  image = np.asarray(image, np.float64)  # float64: the same pixels whatever BLAS threading
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  levels = [image[..., :3]]
  while min(levels[-1].shape[:2]) >= 64:
    x = levels[-1]
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    levels.append(x[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)))
  return tuple(levels)


def _bilinear(size_out: int, start: float, extent: float, size_in: int) -> np.ndarray:
  """[size_out, size_in] weights sampling `extent` input pixels from `start`, at pixel centres."""
  coords = start + (np.arange(size_out) + 0.5) * (extent / size_out) - 0.5
  coords = np.clip(coords, 0, size_in - 1)
  return np.clip(1 - np.abs(coords[:, None] - np.arange(size_in)[None, :]), 0, None)


def render(name: str, windows: np.ndarray, height: int, width: int) -> np.ndarray:
  """Frames of `name` seen through windows [T, 4] = (top, left, win_h, win_w) in photo px."""
  levels = _pyramid(name)
  frames = []
  for top, left, win_h, win_w in windows:
    level = int(np.clip(np.floor(np.log2(max(win_h / height, 1.0))), 0, len(levels) - 1))
    image, f = levels[level], 2.0**level
    wy = _bilinear(height, top / f, win_h / f, image.shape[0])  # [height, Hl]
    wx = _bilinear(width, left / f, win_w / f, image.shape[1])  # [width, Wl]
    hl, wl, _ = image.shape
    rows = (wy @ image.reshape(hl, wl * 3)).reshape(height, wl, 3)  # two matmuls, not an einsum
    frames.append((wx @ rows.transpose(1, 0, 2).reshape(wl, height * 3)).reshape(width, height, 3))
    frames[-1] = frames[-1].transpose(1, 0, 2)
  return np.clip(np.round(np.stack(frames)), 0, 255).astype(np.uint8)  # [T, H, W, 3]


def _windows(rng, photo_hw, aspect: float, motion: str, direction: str, t: int) -> np.ndarray:
  """[T, 4] windows (top, left, h, w) with aspect w/h = `aspect`, inside the photo."""
  ph, pw = photo_hw
  fit_h = min(ph, pw / aspect)  # the largest window of this aspect inside the photo
  scale = rng.uniform(0.35, 0.8)
  win_h = np.full(t, fit_h * scale)
  if motion in ("zoom_in", "zoom_out"):
    ratio = rng.uniform(1.3, 2.0)  # how much the view narrows over the clip
    win_h = fit_h * np.geomspace(min(1.0, scale * ratio), scale, t)  # wide -> narrow
    win_h = win_h if motion == "zoom_in" else win_h[::-1]
  win_w = win_h * aspect
  cy, cx = rng.uniform(0.3, 0.7) * ph, rng.uniform(0.3, 0.7) * pw
  if motion == "pan":
    dx, dy = DIRECTIONS[direction]
    free_x, free_y = pw - win_w[0], ph - win_h[0]
    travel = rng.uniform(0.5, 1.0)
    cx = pw / 2 + dx * travel * free_x * (np.linspace(-0.5, 0.5, t))
    cy = ph / 2 + dy * travel * free_y * (np.linspace(-0.5, 0.5, t))
  top = np.clip(cy - win_h / 2, 0, ph - win_h)
  left = np.clip(cx - win_w / 2, 0, pw - win_w)
  return np.stack(np.broadcast_arrays(top, left, win_h, win_w), axis=-1)


def caption(rng, noun: str, motion: str, direction: str) -> str:
  if motion == "still":
    return str(rng.choice([f"a photo of {noun}", f"{noun}", f"a picture of {noun}"]))
  if motion == "pan":
    return str(
      rng.choice([f"the camera pans {direction} across {noun}", f"{noun}, panning {direction}"])
    )
  verb = "in on" if motion == "zoom_in" else "out from"
  return f"zooming {verb} {noun}"


def make_example(rng: np.random.Generator, config: PhotoPansConfig) -> dict:
  height, width = building.canvas_size(rng, config)
  photo = int(rng.integers(len(PHOTO_NAMES)))
  name = PHOTO_NAMES[photo]
  if rng.random() < config.still_rate:
    motion, t = "still", 1
  else:
    motion = str(rng.choice(MOTIONS[1:], p=[0.6, 0.2, 0.2]))
    t = int(rng.integers(config.min_frames, config.max_frames + 1))
  direction = str(rng.choice(list(DIRECTIONS)))
  windows = _windows(rng, _pyramid(name)[0].shape[:2], width / height, motion, direction, t)
  return {
    "video": render(name, windows, height, width),
    "caption": caption(rng, PHOTOS[name], motion, direction),
    "label": photo,
    "motion": MOTIONS.index(motion),
    "direction": list(DIRECTIONS).index(direction) if motion == "pan" else -1,
  }


def generate(config: PhotoPansConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, exactly as stored by the builder."""
  return make_example(building.split_rng(config.seed, split, index), config)


class PhotoPans(building.ProceduralBuilder):
  """Pans, zooms and stills over the photographs shipped with scikit-image."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    PhotoPansConfig(name="tiny", description="16-96 px, 1 or 4-24 frames, 1500/150 examples"),
    PhotoPansConfig(
      name="default",
      description="32-256 px, 1 or 4-64 frames, 20000/1000 examples",
      train_size=20_000,
      validation_size=1_000,
      min_size=32,
      max_size=256,
      size_multiple=16,
      max_frames=64,
    ),
    PhotoPansConfig(name="test", description="32/8 examples", train_size=32, validation_size=8),
  ]
  generate = staticmethod(generate)

  def _info(self) -> tfds.core.DatasetInfo:
    return building.info(
      self,
      __doc__,
      label=tfds.features.ClassLabel(names=PHOTO_NAMES),
      motion=tfds.features.ClassLabel(names=MOTIONS),
      direction=building.int_feature(),  # index in DIRECTIONS for pans, else -1
    )


CONFIG_NAMES, build, data_source = building.interface(PhotoPans)  # for `vdit.datasets`
