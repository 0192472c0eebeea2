"""`moving_digits`: real handwritten digits moving or bouncing on canvases of varying size.

The digits are the 1,797 8×8 scans shipped with scikit-learn (`sklearn.datasets.load_digits`, the
UCI optical-recognition set: 43 writers), upscaled 2-4× with bilinear interpolation. One or two
digits move in a straight line or bounce off the canvas edges (Moving-MNIST style), in a colour
over a dark or light background. Canvas size, aspect ratio (1:2.5 … 2.5:1) and duration vary per
example (native-size data). Train and validation use disjoint scans (validation: the last 297, so
its handwriting is unseen), and labels are the class of the first digit (0-9).

Captions, e.g. "a handwritten 7 moving up-left", "the digit three bouncing around in red",
"a 2 and a 5 bouncing around". Example `i` of a split is drawn from
`np.random.default_rng((seed, split_id, i))`: deterministic, independent of the others.

  moving_digits.build(data_dir)                # idempotent
  moving_digits.data_source("train", data_dir)[0]["video"]   # uint8 [T, H, W, 3]
"""

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from vdit.datasets import building

NUM_CLASSES = 10
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VALIDATION_SCANS = 297  # the last scans of load_digits are held out for validation
DIRECTIONS = building.DIRECTIONS  # name -> unit (dx, dy), y grows downwards
INKS = {
  "white": (240, 240, 240),
  "red": (230, 50, 50),
  "yellow": (240, 220, 40),
  "green": (60, 210, 80),
  "cyan": (60, 210, 230),
}
PAPERS = {"black": (10, 10, 12), "blue": (25, 30, 90), "gray": (60, 60, 60)}


@dataclasses.dataclass(eq=False)
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """Sizes and content of one `moving_digits` variant."""

  train_size: int = 2000
  validation_size: int = 200
  min_size: int = 24  # px, smallest canvas side
  max_size: int = 72  # px, largest canvas side
  size_multiple: int = 8  # px
  max_aspect: float = 2.5  # canvas aspect ratio within [1/max_aspect, max_aspect]
  min_frames: int = 4
  max_frames: int = 20
  max_scale: int = 4  # digits are 8·s px for s in [2, max_scale] (and fit the canvas)
  two_digit_rate: float = 0.3
  bounce_rate: float = 0.5  # fraction of examples that bounce (else a straight line in frame)
  colour_caption_rate: float = 0.3  # fraction of captions naming the ink colour
  seed: int = 0


@functools.cache
def _scans() -> tuple[np.ndarray, np.ndarray]:
  """The scikit-learn digits: images float32 [1797, 8, 8] in [0, 1] and labels [1797]."""
  from sklearn.datasets import load_digits  # noqa: PLC0415 (heavy; only to build)

  digits = load_digits()
  return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)


def scan_pool(split: str) -> np.ndarray:
  """Indices of the scans a split draws from: disjoint writers' samples for validation."""
  total = len(_scans()[0])
  if split == "validation":
    return np.arange(total - VALIDATION_SCANS, total)
  return np.arange(total - VALIDATION_SCANS)


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
  """Bilinear upscaling of an [8, 8] scan to [8·scale, 8·scale] (pixel centres aligned)."""
  size = image.shape[0]
  coords = (np.arange(size * scale) + 0.5) / scale - 0.5  # output centres in input pixels
  weights = np.clip(1 - np.abs(coords[:, None] - np.arange(size)[None, :]), 0, None)
  weights /= weights.sum(1, keepdims=True)  # [8s, 8] bilinear, renormalised at the borders
  return weights @ image @ weights.T


def _axis(rng, span: int, velocity: float, num_frames: int, bounce: bool) -> np.ndarray:
  """Positions per frame in [0, span] along one axis: a straight line that stays in [0, span]
  (velocity · (T-1) ≤ span), or reflected at the edges if `bounce` (a triangle wave)."""
  steps = velocity * np.arange(num_frames)
  if span <= 0:
    return np.zeros(num_frames)
  if not bounce:
    travel = abs(steps[-1])
    start = rng.uniform(0, span - travel) + (travel if velocity < 0 else 0)
    return np.clip(start + steps, 0, span)
  period = 2 * span
  phase = np.mod(rng.uniform(0, span) + steps, period)
  return np.where(phase <= span, phase, period - phase)


def _canvas(rng, config) -> tuple[int, int, int]:
  height, width = building.canvas_size(rng, config)
  return int(rng.integers(config.min_frames, config.max_frames + 1)), height, width


def make_example(rng: np.random.Generator, config: MovingDigitsConfig, split: str) -> dict:
  """Draws and renders one example: video uint8 [T, H, W, 3], caption, label, digits, scans,
  bounce."""
  images, labels = _scans()
  pool = scan_pool(split)
  t, h, w = _canvas(rng, config)
  count = 2 if rng.random() < config.two_digit_rate else 1
  bounce = bool(rng.random() < config.bounce_rate)
  ink_name = str(rng.choice(list(INKS)))
  paper = np.asarray(PAPERS[str(rng.choice(list(PAPERS)))], np.float32)
  ink = np.asarray(INKS[ink_name], np.float32)
  scale_max = max(2, min(config.max_scale, (min(h, w) - 8) // 8))  # leave room to move
  video = np.broadcast_to(paper, (t, h, w, 3)).copy()  # [T, H, W, 3] float
  ink_cover = np.zeros((t, h, w, 1), np.float32)
  classes, directions, scans = [], [], []
  for _ in range(count):
    scan = int(rng.choice(pool))
    scans.append(scan)
    scale = int(rng.integers(2, scale_max + 1))
    digit = _upscale(images[scan], scale)  # [d, d] in [0, 1]
    d = digit.shape[0]
    name = str(rng.choice(list(DIRECTIONS)))
    speed = rng.uniform(1.0, 3.0)  # px/frame along each moving axis
    spans = (max(w - d, 0), max(h - d, 0))  # top-left positions keeping the digit in frame
    if not bounce:  # a straight line that stays in frame: slow down to fit the free span
      moving = [span for span, m in zip(spans, DIRECTIONS[name]) if m]
      speed = min(speed, min(moving) / max(t - 1, 1))
    xs, ys = (_axis(rng, span, m * speed, t, bounce) for span, m in zip(spans, DIRECTIONS[name]))
    for f in range(t):
      y0, x0 = int(round(ys[f])), int(round(xs[f]))
      y1, x1 = min(h, y0 + d), min(w, x0 + d)  # the digit may exceed a tiny canvas
      patch = digit[: y1 - y0, : x1 - x0, None]
      ink_cover[f, y0:y1, x0:x1] = np.maximum(ink_cover[f, y0:y1, x0:x1], patch)
    classes.append(int(labels[scan]))
    directions.append(name)
  video = video * (1 - ink_cover) + ink * ink_cover
  return {
    "video": np.clip(np.round(video), 0, 255).astype(np.uint8),
    "caption": caption(rng, classes, directions, bounce, ink_name, config.colour_caption_rate),
    "label": classes[0],
    "digits": np.asarray(classes + [-1] * (2 - count), np.int32),
    "scans": np.asarray(scans + [-1] * (2 - count), np.int32),
    "bounce": int(bounce),
  }


def caption(rng, classes, directions, bounce: bool, ink: str, colour_rate: float) -> str:
  """ "a handwritten 7 moving up-left", "the digit three bouncing around in red", ..."""
  names = [str(c) if rng.random() < 0.5 else NUMBER_WORDS[c] for c in classes]
  if len(classes) == 1:
    subject = str(rng.choice([f"a handwritten {names[0]}", f"the digit {names[0]}"]))
  else:
    subject = f"a {names[0]} and a {names[1]}"
  motion = "bouncing around" if bounce else f"moving {directions[0]}"
  if not bounce and len(classes) == 2 and directions[0] != directions[1]:
    motion = f"moving {directions[0]} and {directions[1]}"
  text = f"{subject} {motion}"
  if rng.random() < colour_rate:
    text += f" in {ink}"
  return text


def generate(config: MovingDigitsConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, exactly as stored by the builder."""
  return make_example(building.split_rng(config.seed, split, index), config, split)


class MovingDigits(building.ProceduralBuilder):
  """Handwritten 8×8 scikit-learn digits moving/bouncing on canvases of varying size."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    MovingDigitsConfig(name="tiny", description="24-72 px, 4-20 frames, 2000/200 examples"),
    # tiny's distribution with ten times the train clips (the same scans: tiny's 2,000 clips are
    # among them); its validation split is tiny's, clip for clip.
    MovingDigitsConfig(
      name="tiny_20k", description="tiny with 20000 train clips", train_size=20_000
    ),
    MovingDigitsConfig(
      name="default",
      description="32-192 px, 4-48 frames, 20000/1000 examples",
      train_size=20_000,
      validation_size=1_000,
      min_size=32,
      max_size=192,
      size_multiple=16,
      max_frames=48,
      max_scale=8,
    ),
    MovingDigitsConfig(name="test", description="32/8 examples", train_size=32, validation_size=8),
  ]
  generate = staticmethod(generate)

  def _info(self) -> tfds.core.DatasetInfo:
    return building.info(
      self,
      __doc__,
      label=tfds.features.ClassLabel(num_classes=NUM_CLASSES),
      digits=tfds.features.Tensor(shape=(2,), dtype=np.int32),  # -1: no second digit
      scans=tfds.features.Tensor(shape=(2,), dtype=np.int32),  # index in load_digits
      bounce=building.int_feature(),
    )


CONFIG_NAMES, build, data_source = building.interface(MovingDigits)  # for `vdit.datasets`
