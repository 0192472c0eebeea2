"""Analytic prompt adherence on `shapes` videos: colour, shape and motion read off the pixels.

No learned model: the scorer inverts the way `vdit.datasets.shapes` draws a video.

1. Background: a per-channel plane a + b·x + c·y (the dataset's backgrounds are plain or a linear
   brightness ramp), fitted to the whole clip by least squares with outliers (the objects)
   rejected over a few rounds.
2. Segmentation by colour: every pixel's difference d from the background is unmixed against
   each candidate object colour c, d ≈ α·(c − bg) (an anti-aliased edge pixel is such a blend);
   a pixel far enough from the background belongs to the colour with the smallest residual,
   with opacity α. The object of a prompt's colour is the α map of its pixels; an object whose
   colour is absent falls back to the largest other colour present (colour wrong, shape and
   motion still measured).
3. Shape: in every frame where the object does not touch the border, the α map is compared
   (soft IoU) with each candidate shape rendered by the dataset's own signed distance at the
   object's centroid and at the size that matches its area; the best mean IoU wins.
4. Direction: the least-squares velocity of the α-weighted centroid over the clip; the
   candidate direction with the largest cosine wins.
5. Temporal consistency: persistence (fraction of frames whose object area is within ½–2× the
   clip's median area) × smoothness (fraction of frame steps whose centroid step is within
   tolerance of the clip's median step, i.e. constant velocity).

Candidates default to the vocabulary of the dataset variant, so forced choices on noise land
at chance (1/number of candidates). `parse_caption` reads the canonical
`a {colour} {shape} moving {direction}` phrases (joined by " and ") out of a caption.
"""

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from vdit.datasets import shapes as data

MIN_DISTANCE = 40.0  # RGB distance from the background above which a pixel is foreground
MIN_AREA = 2.0  # px of α mass per frame below which an object counts as absent


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """The candidate words of each attribute (forced choice among them)."""

  colours: tuple[str, ...] = tuple(data.COLOUR_NAMES)
  shapes: tuple[str, ...] = tuple(data.SHAPES)
  directions: tuple[str, ...] = tuple(data.DIRECTION_NAMES)

  @classmethod
  def of_dataset(cls, dataset_config: str = "tiny") -> "Vocabulary":
    """The words a `shapes` variant ("tiny", "default", "test") draws from."""
    for c in data.Shapes.BUILDER_CONFIGS:
      if c.name == dataset_config:
        return cls(tuple(c.colours), tuple(c.shapes), tuple(c.directions))
    names = [c.name for c in data.Shapes.BUILDER_CONFIGS]
    raise ValueError(
      f"shapes dataset_config={dataset_config!r} is unknown; expected one of {names}"
    )


_PHRASE = re.compile(r"\ba (\w+) (\w+) moving ([\w-]+)")


def parse_caption(caption: str) -> list[data.ObjectSpec]:
  """The objects a caption names; ValueError if it has no `a {colour} {shape} moving {dir}`."""
  found = []
  for colour, shape, direction in _PHRASE.findall(caption):
    if colour in data.COLOURS and shape in data.SHAPES and direction in data.DIRECTIONS:
      found.append(data.ObjectSpec(colour, shape, direction))
  if not found:
    raise ValueError(
      f"caption {caption!r} names no object; expected 'a {{colour}} {{shape}} moving "
      f"{{direction}}' with words from {data.COLOUR_NAMES}, {data.SHAPES}, "
      f"{data.DIRECTION_NAMES}"
    )
  return found


# ---------------------------------------------------------------------------------------------
# Background and segmentation.
# ---------------------------------------------------------------------------------------------
def fit_background(video: np.ndarray, rounds: int = 4) -> np.ndarray:
  """The background plane of a clip, float [H, W, 3], robust to the moving objects."""
  t, h, w, _ = video.shape
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
  design = np.stack([np.ones_like(xs), xs / w - 0.5, ys / h - 0.5], -1).reshape(-1, 3)  # [HW, 3]
  y = video.reshape(t, h * w, 3).astype(np.float32)
  inliers = np.linalg.norm(y - np.median(y[:, :: max(1, h * w // 512)], axis=(0, 1)), axis=-1) < 120
  for threshold in [80.0, 50.0, 30.0][: rounds - 1] + [30.0]:
    # Weighted least squares over frames sharing one design: weights = inlier counts per pixel.
    weight = inliers.sum(0).astype(np.float32)  # [HW]
    if weight.sum() < 3:
      inliers, weight = np.ones_like(inliers), np.full(h * w, float(t), np.float32)
    target = (y * inliers[..., None]).sum(0)  # [HW, 3]
    gram = design.T @ (design * weight[:, None]) + 1e-6 * np.eye(3)
    coef = np.linalg.solve(gram, design.T @ target)  # [3, 3]
    inliers = np.linalg.norm(y - design @ coef, axis=-1) < threshold
  return (design @ coef).reshape(h, w, 3)


def segment(
  video: np.ndarray, colours: Sequence[str], background: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(label [T, H, W] int: index into `colours`, −1 background; α [T, H, W] in [0, 1])."""
  video = video.astype(np.float32)
  bg = fit_background(video) if background is None else background
  diff = video - bg  # [T, H, W, 3]
  residuals, alphas = [], []
  for name in colours:
    direction = np.asarray(data.COLOURS[name], np.float32) - bg  # [H, W, 3]
    norm2 = np.maximum(np.sum(direction**2, -1), 1.0)
    alpha = np.clip(np.sum(diff * direction, -1) / norm2, 0.0, 1.0)  # [T, H, W]
    residuals.append(np.linalg.norm(diff - alpha[..., None] * direction, axis=-1))
    alphas.append(alpha)
  residuals, alphas = np.stack(residuals), np.stack(alphas)  # [C, T, H, W]
  best = np.argmin(residuals, axis=0)
  alpha = np.take_along_axis(alphas, best[None], 0)[0]
  foreground = np.linalg.norm(diff, axis=-1) > MIN_DISTANCE
  # An edge pixel with little object in it is below MIN_DISTANCE but belongs to the object's α.
  near = _dilate(foreground) & (alpha > 0.1)
  keep = foreground | near
  return np.where(keep, best, -1), np.where(keep, alpha, 0.0)


def _dilate(mask: np.ndarray) -> np.ndarray:
  """3×3 dilation of [T, H, W] masks within each frame."""
  out = mask.copy()
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  grown = out.copy()
  grown[:, :, 1:] |= out[:, :, :-1]
  grown[:, :, :-1] |= out[:, :, 1:]
  return grown


# ---------------------------------------------------------------------------------------------
# Shape and motion of one object's α map [T, H, W].
# ---------------------------------------------------------------------------------------------
def centroids(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(α-weighted centres [T, 2] as (x, y) in pixel-centre coordinates, areas [T])."""
  t, h, w = alpha.shape
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  area = alpha.sum((1, 2))
  safe = np.maximum(area, 1e-6)
  cx = (alpha * xs).sum((1, 2)) / safe
  cy = (alpha * ys).sum((1, 2)) / safe
  return np.stack([cx, cy], -1), area


# Area of each shape of half-size r, in units of r² (from `data.signed_distance`).
_AREA = {
  "circle": np.pi,
  "square": 1.6**2,
  "diamond": 2 * 1.15**2,
  "triangle": 3 * 3**0.5 * 0.65**2,
}


def shape_scores(alpha: np.ndarray, candidates: Sequence[str]) -> np.ndarray:
  """Mean soft IoU [len(candidates)] of the object with each candidate shape, over frames where
  it is whole (not touching the border; all frames if it always does)."""
  t, h, w = alpha.shape
  centres, area = centroids(alpha)
  present = area >= MIN_AREA
  border = (alpha[:, 0].max(-1) > 0.3) | (alpha[:, -1].max(-1) > 0.3)
  border |= (alpha[:, :, 0].max(-1) > 0.3) | (alpha[:, :, -1].max(-1) > 0.3)
  frames = np.flatnonzero(present & ~border)
  if frames.size == 0:
    frames = np.flatnonzero(present)
  if frames.size == 0:
    return np.zeros(len(candidates))
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  a = alpha[frames]  # [F, H, W]
  dx = xs - centres[frames, 0, None, None]
  dy = ys - centres[frames, 1, None, None]
  scores = np.zeros(len(candidates))
  for i, name in enumerate(candidates):
    r = np.sqrt(area[frames] / _AREA[name])[:, None, None]
    template = np.clip(0.5 - data.signed_distance(name, dx, dy, r), 0.0, 1.0)
    iou = np.minimum(a, template).sum((1, 2)) / np.maximum(a, template).sum((1, 2))
    scores[i] = float(np.mean(iou))
  return scores


def velocity(alpha: np.ndarray) -> np.ndarray:
  """Least-squares centroid velocity (vx, vy) in px/frame over the frames with the object."""
  centres, area = centroids(alpha)
  frames = np.flatnonzero(area >= MIN_AREA)
  if frames.size < 2:
    return np.zeros(2)
  f = frames - frames.mean()
  return (f[:, None] * (centres[frames] - centres[frames].mean(0))).sum(0) / (f**2).sum()


def compactness(alpha: np.ndarray) -> np.ndarray:
  """Per frame [T], the fraction of α mass within 1.7 equivalent radii √(area/π) of the
  centroid: ≥ 0.97 for every dataset shape (a triangle's corners reach 1.56), ≈ 0.4 for
  pixels scattered over the frame."""
  t, h, w = alpha.shape
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  centres, area = centroids(alpha)
  radius = 1.7 * np.sqrt(np.maximum(area, 1e-6) / np.pi)[:, None, None]
  dist = np.hypot(xs - centres[:, 0, None, None], ys - centres[:, 1, None, None])
  inside = (alpha * (dist <= radius)).sum((1, 2))
  return inside / np.maximum(area, 1e-6)


def temporal_consistency(alpha: np.ndarray) -> dict[str, float]:
  """Persistence, smoothness and their product (`temporal`) of one object's α map."""
  centres, area = centroids(alpha)
  median_area = np.median(area)
  if median_area < MIN_AREA:
    return {"persistence": 0.0, "smoothness": 0.0, "temporal": 0.0}
  persist = (area >= 0.5 * median_area) & (area <= 2.0 * median_area) & (compactness(alpha) >= 0.9)
  persistence = float(np.mean(persist))
  steps = np.diff(centres, axis=0)  # [T-1, 2]
  ok = persist[1:] & persist[:-1]
  if steps.shape[0] == 0:
    return {"persistence": persistence, "smoothness": 1.0, "temporal": persistence}
  typical = np.median(steps[ok], axis=0) if ok.any() else np.zeros(2)
  size = np.sqrt(median_area)
  # Constant velocity up to a pixel, or half the typical step / object size (clipping at the
  # border slows the visible centroid of an object that leaves the frame).
  tolerance = max(1.5, 0.5 * float(np.linalg.norm(typical)), 0.5 * size)
  smooth = ok & (np.linalg.norm(steps - typical, axis=-1) <= tolerance)
  smoothness = float(np.mean(smooth))
  return {
    "persistence": persistence,
    "smoothness": smoothness,
    "temporal": persistence * smoothness,
  }


# ---------------------------------------------------------------------------------------------
# Scoring a video against its prompt.
# ---------------------------------------------------------------------------------------------
def score(video: np.ndarray, prompt: str, vocab: Vocabulary | None = None) -> dict[str, float]:
  """Per-attribute correctness (1/0) of uint8 `video` [T, H, W, 3] against `prompt`, averaged
  over the prompt's objects, and `all` (every attribute of every object right), plus the
  temporal-consistency scores and the predicted words of the first object."""
  vocab = vocab or Vocabulary()
  objects = parse_caption(prompt)
  colours = tuple(dict.fromkeys(vocab.colours + tuple(o.colour for o in objects)))
  label, alpha = segment(np.asarray(video), colours)
  mass = np.array([(alpha * (label == i)).sum() for i in range(len(colours))])
  # The detected objects: the len(objects) colours with the most α mass (forced choice).
  detected = [int(i) for i in np.argsort(-mass, kind="stable")[: len(objects)]]
  results, used = [], set()
  for obj in objects:
    want = colours.index(obj.colour)
    pick = want if want in detected and want not in used else None
    if pick is None:
      pick = next((i for i in detected if i not in used and colours[i] != obj.colour), detected[0])
    used.add(pick)
    obj_alpha = alpha * (label == pick)
    shape = vocab.shapes[int(np.argmax(shape_scores(obj_alpha, vocab.shapes)))]
    # Each axis travels a fraction of its own free span (extent − object size), so on a wide
    # canvas "up-right" moves more in x than in y: compare velocities in units of span.
    size = np.sqrt(max(float(np.median(centroids(obj_alpha)[1])), 0.0) / np.pi) * 2
    t, h, w = obj_alpha.shape
    span = np.array([max(w - size, 0.25 * w), max(h - size, 0.25 * h)])
    v = velocity(obj_alpha) / span
    units = np.array([data.DIRECTIONS[d] for d in vocab.directions], np.float32)
    cosines = units @ v / (np.linalg.norm(units, axis=-1) * max(np.linalg.norm(v), 1e-6))
    direction = vocab.directions[int(np.argmax(cosines))]
    results.append(
      dict(
        colour=colours[pick],
        shape=shape,
        direction=direction,
        **temporal_consistency(obj_alpha),
        colour_ok=float(colours[pick] == obj.colour),
        shape_ok=float(shape == obj.shape),
        direction_ok=float(direction == obj.direction),
      )
    )
  out = {
    key: float(np.mean([r[key] for r in results]))
    for key in ("colour_ok", "shape_ok", "direction_ok", "persistence", "smoothness", "temporal")
  }
  out["all_ok"] = float(
    all(r[k] for r in results for k in ("colour_ok", "shape_ok", "direction_ok"))
  )
  out.update({f"pred_{k}": results[0][k] for k in ("colour", "shape", "direction")})
  return out


def score_many(
  videos: Sequence[np.ndarray], prompts: Sequence[str], vocab: Vocabulary | None = None
) -> dict[str, float]:
  """Accuracies (`colour`, `shape`, `direction`, `all`) and mean temporal scores over pairs,
  with the chance levels of the vocabulary's forced choices."""
  vocab = vocab or Vocabulary()
  per = [score(v, p, vocab) for v, p in zip(videos, prompts, strict=True)]
  mean = lambda k: float(np.mean([s[k] for s in per]))
  return {
    "colour": mean("colour_ok"),
    "shape": mean("shape_ok"),
    "direction": mean("direction_ok"),
    "all": mean("all_ok"),
    "persistence": mean("persistence"),
    "smoothness": mean("smoothness"),
    "temporal": mean("temporal"),
    "chance_colour": 1.0 / len(vocab.colours),
    "chance_shape": 1.0 / len(vocab.shapes),
    "chance_direction": 1.0 / len(vocab.directions),
    "count": len(per),
  }
