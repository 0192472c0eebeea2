"""`shapes`: captioned videos of coloured shapes moving over a plain or gradient background.

Native-size data: every example has its own canvas size, aspect ratio (1:3 … 3:1) and duration.
Captions always contain the canonical form `a {colour} {shape} moving {direction}` (joined by
" and " for two objects), so generated videos can be checked analytically (object colour,
centroid motion); some add a lead-in ("a video of"), the speed ("slowly" / "quickly", which the
motion honours) and the background ("on a gray background").

The generator is pure numpy and deterministic: example `i` of a split is drawn from
`np.random.default_rng((seed, split_id, i))`. Examples are written as ArrayRecord and read with
random access through the builder's `as_data_source` (what `tfds.data_source` returns; no
TensorFlow in the reader).

  shapes.build(data_dir)                       # idempotent; ~3 s for "tiny" on 2 cores
  source = shapes.data_source("train", data_dir)
  source[0]["video"]                           # uint8 [T, H, W, 3]
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from vdit.datasets import building

# Ids are indices into these tuples: append only.
COLOURS = {  # object colours (RGB)
  "red": (220, 40, 40),
  "green": (40, 190, 60),
  "blue": (45, 85, 235),
  "yellow": (240, 215, 35),
  "white": (245, 245, 245),
  "purple": (150, 60, 200),
}
BACKGROUNDS = {  # background colours (RGB); muted so objects stand out
  "black": (15, 15, 20),
  "gray": (120, 120, 120),
  "white": (230, 230, 225),
  "blue": (30, 45, 120),
  "green": (35, 95, 45),
  "brown": (110, 75, 45),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = building.DIRECTIONS  # name -> (dx, dy) in image coordinates (y grows downwards)
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
DIRECTION_NAMES = tuple(DIRECTIONS)
MIN_CONTRAST = 140.0  # minimum RGB distance between an object and its background
MIN_SPEED = 1.0  # px/frame along each moving axis (less on small canvases with long clips)
# Speed word -> fraction of the free span an object travels over the clip.
SPEEDS = {"slowly": (0.3, 0.45), "": (0.6, 0.85), "quickly": (0.9, 1.0)}
PREFIXES = ("a video of ", "footage of ", "an animation of ")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Sizes and content of one `shapes` variant."""

  train_size: int = 2000
  validation_size: int = 200
  min_size: int = 16  # px, smallest canvas side
  max_size: int = 80  # px, largest canvas side
  size_multiple: int = 8  # px, every side is a multiple of this
  max_aspect: float = 3.0  # canvas aspect ratio within [1/max_aspect, max_aspect]
  min_frames: int = 4
  max_frames: int = 24
  colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
  shapes: tuple[str, ...] = ("circle", "square", "triangle")
  directions: tuple[str, ...] = ("left", "right", "up", "down")
  object_size: tuple[float, float] = (0.2, 0.3)  # half-size range, fraction of the short side
  two_object_rate: float = 0.0  # fraction of examples with a second object
  background_caption_rate: float = 0.25  # fraction of captions that name the background
  speed_rate: float = 0.3  # fraction of examples moving "slowly" or "quickly" (and saying so)
  prefix_rate: float = 0.15  # fraction of captions with a lead-in ("a video of ...")
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  colour: str  # key of COLOURS
  shape: str  # one of SHAPES
  direction: str  # key of DIRECTIONS


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What an example shows; `make_example` draws the rest (size, position, speed, shading)."""

  objects: tuple[ObjectSpec, ...]
  background: str  # key of BACKGROUNDS
  num_frames: int
  height: int  # px
  width: int  # px
  caption_background: bool = False  # append "on a {background} background" to the caption
  speed: str = ""  # key of SPEEDS; "" = normal speed, not captioned
  prefix: str = ""  # "" or one of PREFIXES
  object_size: tuple[float, float] = ShapesConfig.object_size  # half-size range (see there)


def caption(spec: ExampleSpec) -> str:
  """The caption of an example: `a {colour} {shape} moving {direction}` per object."""
  text = " and ".join(f"a {o.colour} {o.shape} moving {o.direction}" for o in spec.objects)
  text = spec.prefix + text + (f" {spec.speed}" if spec.speed else "")
  if spec.caption_background:
    text += f" on a {spec.background} background"
  return text


def contrasting_backgrounds(colours: list[str]) -> list[str]:
  """Background names far enough (MIN_CONTRAST) in RGB from every object colour."""
  out = []
  for name, rgb in BACKGROUNDS.items():
    dist = [np.linalg.norm(np.subtract(rgb, COLOURS[c])) for c in colours]
    if name not in colours and min(dist) >= MIN_CONTRAST:
      out.append(name)
  return out


def sample_spec(rng: np.random.Generator, config: ShapesConfig) -> ExampleSpec:
  """Draws the content (objects, background) and the canvas of one example."""
  height, width = building.canvas_size(rng, config)
  num_frames = int(rng.integers(config.min_frames, config.max_frames + 1))
  num_objects = 2 if rng.random() < config.two_object_rate else 1
  colours = [str(c) for c in rng.choice(config.colours, size=num_objects, replace=False)]
  objects = tuple(
    ObjectSpec(c, str(rng.choice(config.shapes)), str(rng.choice(config.directions)))
    for c in colours
  )
  background = str(rng.choice(contrasting_backgrounds(colours)))
  speed = str(rng.choice(["slowly", "quickly"])) if rng.random() < config.speed_rate else ""
  prefix = str(rng.choice(PREFIXES)) if rng.random() < config.prefix_rate else ""
  return ExampleSpec(
    objects=objects,
    background=background,
    num_frames=num_frames,
    height=height,
    width=width,
    caption_background=bool(rng.random() < config.background_caption_rate),
    speed=speed,
    prefix=prefix,
    object_size=config.object_size,
  )


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Signed distance (px, approx.) to a shape of half-size `r` centred at the origin."""
  if shape == "circle":
    return np.sqrt(dx**2 + dy**2) - r
  if shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r  # same area as the circle, roughly
  if shape == "diamond":
    return (np.abs(dx) + np.abs(dy) - 1.15 * r) / np.sqrt(2.0)
  if shape == "triangle":  # pointing up; circumradius 1.3 r, inradius 0.65 r
    side = 0.866 * np.abs(dx) - 0.5 * dy
    return np.maximum(dy, side) - 0.65 * r
  raise ValueError(f"shape={shape!r} is not one of {SHAPES}")


def speed_word(fraction: float) -> str:
  """The speed word (a key of SPEEDS) of a motion covering `fraction` of its free span over the
  clip: the range it falls in, else the nearest (the MIN_SPEED floor makes a long clip on a small
  canvas move faster than its drawn speed: the caption says what the video shows)."""
  return min(SPEEDS, key=lambda w: max(SPEEDS[w][0] - fraction, fraction - SPEEDS[w][1], 0.0))


def _trajectory(rng, extent: int, r: float, step: int, num_frames: int, speed: str) -> np.ndarray:
  """Centre coordinate per frame along one axis: static (step 0) or moving by `step` sign."""
  span = extent - 2 * r  # centre positions that keep the object fully in frame
  if step == 0:
    return np.full(num_frames, r + rng.uniform(0, span))
  # At least MIN_SPEED px/frame, but never so fast that the object leaves more than half out.
  travel = max(rng.uniform(*SPEEDS[speed]) * span, min(MIN_SPEED * (num_frames - 1), span + r))
  start = r + rng.uniform(0, span - travel) if travel <= span else (extent - travel) / 2
  path = start + travel * np.linspace(0.0, 1.0, num_frames)
  return path if step > 0 else extent - path


def make_example(rng: np.random.Generator, spec: ExampleSpec) -> dict:
  """Renders `spec` to a video; `rng` draws sizes, positions, speeds, shading.

  Returns the TFDS features: video uint8 [T, H, W, 3], caption, label (= shape id of the first
  object), colour / shape / direction ids of the first object, background id, num_objects.
  """
  t, h, w = spec.num_frames, spec.height, spec.width
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
  # Background: plain or a gentle linear brightness gradient in a random direction.
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (xs / w - 0.5) * np.cos(angle) + (ys / h - 0.5) * np.sin(angle)
  gain = 0.0 if rng.random() < 0.3 else rng.uniform(0.05, 0.25)
  bg = np.asarray(BACKGROUNDS[spec.background], np.float32) * (1 + gain * ramp)[..., None]
  video = np.broadcast_to(bg, (t, h, w, 3)).copy()  # [T, H, W, 3] float
  travelled = []  # the first object's fraction of its free span covered, per moving axis
  for k, obj in enumerate(spec.objects):
    r = max(3.0, rng.uniform(*spec.object_size) * min(h, w))  # px, half-size
    step_x, step_y = DIRECTIONS[obj.direction]
    cx = _trajectory(rng, w, r, step_x, t, spec.speed)[:, None, None]  # [T, 1, 1]
    cy = _trajectory(rng, h, r, step_y, t, spec.speed)[:, None, None]
    for step, path, extent in ((step_x, cx, w), (step_y, cy, h)):
      if k == 0 and step:
        travelled.append(abs(float(path[-1, 0, 0] - path[0, 0, 0])) / (extent - 2 * r))
    sd = signed_distance(obj.shape, xs - cx, ys - cy, r)  # [T, H, W]
    alpha = np.clip(0.5 - sd, 0.0, 1.0)[..., None]  # 1-px anti-aliased edge
    colour = np.asarray(COLOURS[obj.colour], np.float32) + rng.uniform(-12, 12, size=3)
    video = video * (1 - alpha) + colour * alpha
  first = spec.objects[0]
  if travelled:  # the caption names the speed the video shows
    spec = dataclasses.replace(spec, speed=speed_word(max(travelled)))
  return {
    "video": np.clip(np.round(video), 0, 255).astype(np.uint8),
    "caption": caption(spec),
    "label": SHAPES.index(first.shape),
    "colour": COLOUR_NAMES.index(first.colour),
    "shape": SHAPES.index(first.shape),
    "direction": DIRECTION_NAMES.index(first.direction),
    "background": BACKGROUND_NAMES.index(spec.background),
    "num_objects": len(spec.objects),
  }


def generate(config: ShapesConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, exactly as stored by the builder."""
  rng = building.split_rng(config.seed, split, index)
  return make_example(rng, sample_spec(rng, config))


class Shapes(building.ProceduralBuilder):
  """Captioned videos of coloured shapes moving over backgrounds (procedural, no downloads)."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Wider sizes (to 3:1, 4-24 frames in tiny), speeds and lead-ins in captions.",
    "1.2.0": "Larger objects: half-size 0.2-0.3 of the short side (was 0.12-0.2).",
    "1.3.0": "Speed words describe the motion shown (the 1 px/frame floor made a fifth of "
    "tiny's clips move faster than their word said); videos unchanged.",
  }
  BUILDER_CONFIGS = [
    ShapesConfig(name="tiny", description="16-80 px, aspect 1:3-3:1, 4-24 frames, 2000/200"),
    # tiny's distribution with ten times the train clips: tiny's 2,000 are among them, and its
    # validation split *is* tiny's (the same seed draws the same examples), so models trained on
    # either are scored on the same clips.
    ShapesConfig(name="tiny_20k", description="tiny with 20000 train clips", train_size=20_000),
    ShapesConfig(
      name="default",
      description="16-256 px, aspect 1:3-3:1, 4-64 frames, 8 directions, two-object clips",
      train_size=20_000,
      validation_size=1_000,
      min_size=16,
      max_size=256,
      size_multiple=16,
      max_frames=64,
      colours=COLOUR_NAMES,
      shapes=SHAPES,
      directions=DIRECTION_NAMES,
      two_object_rate=0.15,
      background_caption_rate=0.3,
    ),
    ShapesConfig(
      name="test", description="tiny content, 32/8 examples", train_size=32, validation_size=8
    ),
  ]
  generate = staticmethod(generate)

  def _info(self) -> tfds.core.DatasetInfo:
    scalar = building.int_feature
    return building.info(
      self,
      __doc__,
      label=tfds.features.ClassLabel(names=SHAPES),
      **{k: scalar() for k in ("colour", "shape", "direction", "background", "num_objects")},
    )


NUM_CLASSES = len(SHAPES)  # `label` is the shape of the first object


CONFIG_NAMES, build, data_source = building.interface(Shapes)  # for `vdit.datasets`
