"""Per-example transforms of the input pipeline (pure numpy, grain `Map` / `RandomMap`).

A raw example is a dict with `video` uint8 [T, H, W, 3], `caption` (bytes/str) and optionally
`label`. The chain (see `example_transforms`) is

  SampleClip -> ToFloat -> ResizeToTokenBudget -> Patchify -> TokenizeCaption -> ToPackable

and ends in the per-example dict that the packer concatenates into rows:

  patches [N, P] float32, positions [N, 3] int32, text_tokens [n] int32,
  shapes [1, 3] int32 (the patch grid), labels [1] int32 (-1 = none).

Per-example things are length-1 features so that packing them into length K gives slot k the
segment id k + 1, the same as the example's video and text tokens.
"""

from collections.abc import Sequence

import grain
import numpy as np

from vdit.data import patchify as patchify_lib
from vdit.data import tokenizer as tokenizer_lib


def clip_window(num_frames: int, max_frames: int, frame_stride: int, pt: int) -> int:
  """Frames in the longest clip of `num_frames` with this stride, ≤ max_frames, multiple of pt."""
  available = (num_frames - 1) // frame_stride + 1
  return max(pt, min(available, max_frames) // pt * pt)


class SampleClip(grain.transforms.RandomMap):
  """Takes a clip (random start in training) and centre-crops H, W to multiples of the patch.

  Clips have `min(T_available, max_frames)` frames rounded down to a multiple of pt; a video
  shorter than pt frames (e.g. an image) repeats its last frame up to pt.
  """

  def __init__(
    self,
    patch_size: Sequence[int],
    max_frames: int,
    frame_stride: int = 1,
    random_start: bool = True,
  ):
    self.patch_size = tuple(int(p) for p in patch_size)
    self.max_frames = max_frames
    self.frame_stride = frame_stride
    self.random_start = random_start

  def num_starts(self, num_frames: int) -> int:
    """How many clip start frames a video of `num_frames` frames offers."""
    length = clip_window(num_frames, self.max_frames, self.frame_stride, self.patch_size[0])
    return max(1, num_frames - (length - 1) * self.frame_stride)

  def clip(self, element: dict, start: int) -> dict:
    video = element["video"]  # [T, H, W, C]
    t, h, w, _ = video.shape
    pt, ph, pw = self.patch_size
    if h < ph or w < pw:
      raise ValueError(f"video of height={h}, width={w} is smaller than the patch {ph}x{pw}")
    length = clip_window(t, self.max_frames, self.frame_stride, pt)
    frames = np.minimum(start + self.frame_stride * np.arange(length), t - 1)
    top, left = (h % ph) // 2, (w % pw) // 2
    video = video[frames, top : top + h - h % ph, left : left + w - w % pw]
    return {**element, "video": video}

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    starts = self.num_starts(element["video"].shape[0])
    start = int(rng.integers(starts)) if self.random_start else 0
    return self.clip(element, start)


class ToFloat(grain.transforms.Map):
  """uint8 video -> float32 in [-1, 1]."""

  def map(self, element: dict) -> dict:
    video = element["video"].astype(np.float32) * (2.0 / 255.0) - 1.0
    return {**element, "video": video}


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights averaging the input cells each output cell covers."""
  scale = size_in / size_out
  lo = np.arange(size_out)[:, None] * scale  # [out, 1]
  cells = np.arange(size_in)[None, :]  # [1, in]
  overlap = np.clip(np.minimum(lo + scale, cells + 1) - np.maximum(lo, cells), 0.0, None)
  return (overlap / scale).astype(np.float32)


def area_resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Area-averaging resize of [T, H, W, C] to [T, height, width, C] (exact for any ratio)."""
  wy = _area_weights(video.shape[1], height)
  wx = _area_weights(video.shape[2], width)
  return np.einsum("oh,thwc,pw->topc", wy, video, wx, optimize=True).astype(video.dtype)


def fit_grid(grid: Sequence[int], max_tokens: int, tolerance: float = 0.15) -> tuple[int, int, int]:
  """The (T', h, w) with h ≤ H', w ≤ W', T'·h·w ≤ max_tokens and most tokens, keeping the aspect.

  The aspect ratio h/w may differ from H'/W' by a factor of at most exp(tolerance) (or by the
  least achievable factor, for grids too small for that); ties go to the closer aspect.
  """
  gt, gh, gw = (int(g) for g in grid)
  if gt * gh * gw <= max_tokens:
    return gt, gh, gw
  if gt > max_tokens:
    raise ValueError(f"{gt} temporal patches exceed max_tokens_per_example={max_tokens}")
  h, w = np.meshgrid(np.arange(1, gh + 1), np.arange(1, gw + 1), indexing="ij")  # [H', W']
  tokens = gt * h * w
  error = np.abs(np.log(h / w * gw / gh))
  valid = tokens <= max_tokens
  allowed = valid & (error <= max(tolerance, error[valid].min()))
  score = np.where(allowed, tokens - error, -np.inf)  # error < 1 only breaks ties
  i, j = np.unravel_index(np.argmax(score), score.shape)
  return gt, int(h[i, j]), int(w[i, j])


class ResizeToTokenBudget(grain.transforms.Map):
  """Shrinks H, W (keeping aspect, NaViT-style) so the example has ≤ max_tokens patches."""

  def __init__(self, patch_size: Sequence[int], max_tokens: int):
    self.patch_size = tuple(int(p) for p in patch_size)
    self.max_tokens = max_tokens

  def map(self, element: dict) -> dict:
    video = element["video"]  # [T, H, W, C], T/H/W multiples of the patch
    pt, ph, pw = self.patch_size
    t, h, w, _ = video.shape
    grid = (t // pt, h // ph, w // pw)
    _, gh, gw = fit_grid(grid, self.max_tokens)
    if (gh, gw) == grid[1:]:
      return element
    return {**element, "video": area_resize(video, gh * ph, gw * pw)}


class Patchify(grain.transforms.Map):
  """video [T, H, W, C] -> patches [N, P], positions [N, 3], grid (T', H', W')."""

  def __init__(self, patch_size: Sequence[int]):
    self.patch_size = tuple(int(p) for p in patch_size)

  def map(self, element: dict) -> dict:
    out = {k: v for k, v in element.items() if k != "video"}
    out["patches"], out["positions"], out["grid"] = patchify_lib.patchify(
      element["video"], self.patch_size
    )
    return out


class TokenizeCaption(grain.transforms.Map):
  """caption -> text_tokens [n] int32 ([BOS, words...] ≤ max_len; [NULL] for no caption)."""

  def __init__(self, vocab_size: int, max_len: int):
    self.tokenizer = tokenizer_lib.Tokenizer(vocab_size)
    self.max_len = max_len

  def map(self, element: dict) -> dict:
    text = element.get("caption", b"")
    return {**element, "text_tokens": self.tokenizer.encode(text, self.max_len)}


class ToPackable(grain.transforms.Map):
  """Keeps exactly the features the packer concatenates (see the module docstring)."""

  def map(self, element: dict) -> dict:
    return {
      "patches": np.asarray(element["patches"], np.float32),
      "positions": np.asarray(element["positions"], np.int32),
      "text_tokens": np.asarray(element["text_tokens"], np.int32),
      "shapes": np.asarray(element["grid"], np.int32).reshape(1, 3),
      "labels": np.asarray([element.get("label", -1)], np.int32),
    }


def example_transforms(input_config, *, train: bool) -> list:
  """The per-example chain for an input config (`vdit.data.pipeline.default_input_config`)."""
  c = input_config
  return [
    SampleClip(c.patch_size, c.max_frames, c.frame_stride, random_start=train),
    ToFloat(),
    ResizeToTokenBudget(c.patch_size, c.max_tokens_per_example),
    Patchify(c.patch_size),
    TokenizeCaption(c.vocab_size, c.max_caption_tokens),
    ToPackable(),
  ]


def apply(transforms: Sequence, element: dict, rng: np.random.Generator | None = None) -> dict:
  """Runs a chain on one example outside grain (tests, notebooks, evaluators)."""
  for transform in transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      element = transform.random_map(element, rng or np.random.default_rng(0))
    else:
      element = transform.map(element)
  return element
