"""Per-example transforms of the input pipeline (pure numpy, grain `Map` / `RandomMap`).

A raw example is a dict with `video` uint8 [T, H, W, 3] (or float32 latents [T, H, W, C] of the
`latents` dataset, which ToFloat leaves unscaled), `caption` (bytes/str) and optionally `label`.
The chain (see `example_transforms`) is

  SampleClip -> ToFloat -> ResizeToTokenBudget -> TokenizeCaption -> SampleTokenDrop -> Packable

(EmbedCaption instead of TokenizeCaption with `input.text_embeddings`: it adds
`text_embeddings` [n, E] float32 aligned with the n text tokens, carried through to the rows.)

and ends in a *packable* example: `video` float32 [T, H, W, 3] in [-1, 1] with T, H, W multiples
of the patch, `text_tokens` [n] int32, `label` int32, `drop_rate` float32 and `seed` int64. The
packer may still shrink it (keeping aspect) to fill a gap in a row; `materialize` then cuts it
into the per-example dict rows are made of:

  patches [N, P] float32, positions [N, 3] int32, text_tokens [n] int32,
  shapes [1, 3] int32 (the full patch grid T'·H'·W' ≥ N), labels [1] int32 (-1 = none).

Token dropping (NaViT, Sec. 3.2) keeps N = T'·H'·W' − round(drop_rate · T'·H'·W') tokens chosen
at random (seeded by the example's `seed`), in their original order, with their original
positions. Per-example things are length-1 features so that slot k is segment id k + 1.

Randomness comes from grain's per-index rng (`RandomMap`), so example i of the stream is the
same whatever the number of hosts or workers.
"""

from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from vdit.data import caption_table
from vdit.data import patchify as patchify_lib
from vdit.data import tokenizer as tokenizer_lib


def clip_window(num_frames: int, max_frames: int, frame_stride: int, pt: int) -> int:
  """Frames in the longest clip of `num_frames` with this stride, ≤ max_frames, multiple of pt."""
  available = (num_frames - 1) // frame_stride + 1
  return max(pt, min(available, max_frames) // pt * pt)


class SampleClip(grain.transforms.RandomMap):
  """Samples a clip: frame stride, duration and start; centre-crops H, W to patch multiples.

  In training the stride is uniform in [frame_stride, max_frame_stride] and the duration uniform
  in [min_frames, max_frames] (multiples of pt, capped by what the video offers at that stride),
  the start uniform; in evaluation it is the first clip at `frame_stride` of `max_frames`.
  `whole_clip`: instead, in training and evaluation alike, up to `max_frames` frames (a multiple
  of pt) spread evenly from the video's first frame to its last, as video captioners sample
  frames: what happens over the whole clip (how far the object travels: its speed, which
  `shapes` defines over the clip's duration) is in the clip. A video
  shorter than pt frames (e.g. an image) repeats its last frame up to pt. A video smaller than
  one patch in height or width is skipped (None, counted by the packer like an unreadable file)
  with a warning naming its size.
  """

  def __init__(
    self,
    patch_size: Sequence[int],
    max_frames: int,
    frame_stride: int = 1,
    random_start: bool = True,
    min_frames: int | None = None,
    max_frame_stride: int | None = None,
    whole_clip: bool = False,
  ):
    self.whole_clip = whole_clip
    self.patch_size = tuple(int(p) for p in patch_size)
    self.max_frames = max_frames
    self.min_frames = max_frames if min_frames is None else min_frames
    self.frame_stride = frame_stride
    self.max_frame_stride = frame_stride if max_frame_stride is None else max_frame_stride
    self.random_start = random_start

  def num_starts(self, num_frames: int, stride: int | None = None, length: int | None = None):
    """How many clip start frames a video of `num_frames` frames offers."""
    stride = stride or self.frame_stride
    length = length or clip_window(num_frames, self.max_frames, stride, self.patch_size[0])
    return max(1, num_frames - (length - 1) * stride)

  def clip(self, element: dict, start: int, stride: int | None = None, length: int | None = None):
    video = element["video"]  # [T, H, W, C]
    t, h, w, _ = video.shape
    pt, ph, pw = self.patch_size
    if h < ph or w < pw:
      logging.warning("skipping a %dx%d video: smaller than one %dx%d patch", h, w, ph, pw)
      return None
    stride = stride or self.frame_stride
    length = length or clip_window(t, self.max_frames, stride, pt)
    frames = np.minimum(start + stride * np.arange(length), t - 1)
    if self.whole_clip:  # evenly from the first frame to the last
      length = max(pt, min(t, self.max_frames) // pt * pt)
      frames = np.round(np.linspace(0, t - 1, length)).astype(int)
    top, left = (h % ph) // 2, (w % pw) // 2
    video = video[frames, top : top + h - h % ph, left : left + w - w % pw]
    return {**element, "video": video}

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if not self.random_start or self.whole_clip:
      return self.clip(element, 0)
    t, pt = element["video"].shape[0], self.patch_size[0]
    stride = int(rng.integers(self.frame_stride, self.max_frame_stride + 1))
    while stride > 1 and (t - 1) // stride + 1 < self.min_frames:
      stride -= 1  # a short video: the largest stride that still gives min_frames
    longest = clip_window(t, self.max_frames, stride, pt)
    shortest = min(longest, max(pt, self.min_frames // pt * pt))
    length = int(rng.integers(shortest // pt, longest // pt + 1)) * pt
    start = int(rng.integers(self.num_starts(t, stride, length)))
    return self.clip(element, start, stride, length)


class ToFloat(grain.transforms.Map):
  """uint8 video -> float32 in [-1, 1]; float video (autoencoder latents) is kept as it is."""

  def map(self, element: dict) -> dict:
    video = element["video"]
    if np.issubdtype(video.dtype, np.floating):
      return {**element, "video": video.astype(np.float32, copy=False)}
    video = video.astype(np.float32) * (2.0 / 255.0) - 1.0
    return {**element, "video": video}


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights averaging the input cells each output cell covers."""
  scale = size_in / size_out
  lo = np.arange(size_out)[:, None] * scale  # [out, 1]
  cells = np.arange(size_in)[None, :]  # [1, in]
  overlap = np.clip(np.minimum(lo + scale, cells + 1) - np.maximum(lo, cells), 0.0, None)
  return (overlap / scale).astype(np.float32)


def area_resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Area-averaging resize of [T, H, W, C] to [T, height, width, C] (exact for any ratio).

  Two batched matmuls (H, then W) rather than one einsum: ~25× faster in numpy. In float64, so
  the float32 result does not depend on how BLAS splits the work (threads): exact resume.
  """
  t, h, w, c = video.shape
  wy = _area_weights(h, height).astype(np.float64)  # [height, H]
  wx = _area_weights(w, width).astype(np.float64)  # [width, W]
  x = np.matmul(wy, video.reshape(t, h, w * c).astype(np.float64)).reshape(t, height, w, c)
  x = np.matmul(wx, x.transpose(0, 2, 1, 3).reshape(t, w, height * c))  # [T, width, height·C]
  return x.reshape(t, width, height, c).transpose(0, 2, 1, 3).astype(video.dtype)


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


class ResizeToTokenBudget(grain.transforms.RandomMap):
  """Shrinks H, W (keeping aspect, NaViT-style) so the example has ≤ a token budget of patches.

  The budget is drawn per example, uniform in [min_tokens, max_tokens] (NaViT's resolution
  sampling: the same video is seen at many resolutions, and the spread of lengths is what lets
  packing fill rows); min_tokens = max_tokens gives a fixed budget. Never upsamples.
  """

  def __init__(self, patch_size: Sequence[int], max_tokens: int, min_tokens: int | None = None):
    self.patch_size = tuple(int(p) for p in patch_size)
    self.max_tokens = max_tokens
    self.min_tokens = max_tokens if min_tokens is None else min_tokens

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    budget = int(rng.integers(self.min_tokens, self.max_tokens + 1))
    return resize_to_grid(element, self.patch_size, budget)


def resize_to_grid(element: dict, patch_size: Sequence[int], budget: int, grid=None) -> dict:
  """`element` with its video shrunk to `grid` (or the largest aspect-keeping grid ≤ budget)."""
  video = element["video"]  # [T, H, W, C], T/H/W multiples of the patch
  pt, ph, pw = patch_size
  t, h, w, _ = video.shape
  native = (t // pt, h // ph, w // pw)
  _, gh, gw = fit_grid(native, budget) if grid is None else grid
  if (gh, gw) == native[1:]:
    return element
  return {**element, "video": area_resize(video, gh * ph, gw * pw)}


class TokenizeCaption(grain.transforms.Map):
  """caption -> text_tokens [n] int32 ([BOS, words...] ≤ max_len; [NULL] for no caption)."""

  def __init__(self, vocab_size: int, max_len: int):
    self.tokenizer = tokenizer_lib.Tokenizer(vocab_size)
    self.max_len = max_len

  def map(self, element: dict) -> dict:
    text = element.get("caption", b"")
    return {**element, "text_tokens": self.tokenizer.encode(text, self.max_len)}


class EmbedCaption(grain.transforms.Map):
  """caption -> text_tokens [n] and text_embeddings [n, E] from a caption-embedding table
  (`vdit.data.caption_table`); an element's own `caption_embedding` [n, E] wins over the table."""

  def __init__(self, table: str, max_len: int):
    self.table, self.max_len = table, max_len
    self._lookup = None  # opened lazily, in the process that maps

  def map(self, element: dict) -> dict:
    if self._lookup is None:
      self._lookup = caption_table.CaptionEmbeddings(self.table, self.max_len)
    own = element.get("caption_embedding")
    tokens, emb = self._lookup(element.get("caption", b""), own)
    return {**element, "text_tokens": tokens, "text_embeddings": emb}

  def __getstate__(self):  # grain may pickle transforms into worker processes
    return {**self.__dict__, "_lookup": None}


class SampleTokenDrop(grain.transforms.RandomMap):
  """Draws the example's token-drop rate, uniform in [min_rate, max_rate], and its drop seed."""

  def __init__(self, min_rate: float = 0.0, max_rate: float = 0.0):
    self.min_rate, self.max_rate = min_rate, max_rate

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    rate = rng.uniform(self.min_rate, self.max_rate) if self.max_rate > 0 else 0.0
    return {**element, "drop_rate": np.float32(rate), "seed": np.int64(rng.integers(2**62))}


class Packable(grain.transforms.Map):
  """Keeps exactly the fields of a packable example (see the module docstring)."""

  def map(self, element: dict) -> dict:
    out = {
      "video": np.asarray(element["video"], np.float32),
      "text_tokens": np.asarray(element["text_tokens"], np.int32),
      "label": np.int32(element.get("label", -1)),
      "drop_rate": np.float32(element.get("drop_rate", 0.0)),
      "seed": np.int64(element.get("seed", 0)),
    }
    if "text_embeddings" in element:
      out["text_embeddings"] = np.asarray(element["text_embeddings"], np.float32)
    return out


def kept_tokens(num_tokens: int, drop_rate: float) -> int:
  """How many of `num_tokens` tokens survive token dropping at `drop_rate` (at least 1)."""
  return max(1, num_tokens - int(round(float(drop_rate) * num_tokens)))


def grid_of(element: dict, patch_size: Sequence[int]) -> tuple[int, int, int]:
  """The patch grid (T', H', W') of a packable example."""
  t, h, w, _ = element["video"].shape
  return t // patch_size[0], h // patch_size[1], w // patch_size[2]


def materialize(element: dict, patch_size: Sequence[int], grid=None) -> dict:
  """A packable example -> patches/positions/text/shapes/labels (resized to `grid` if given)."""
  if grid is not None:
    element = resize_to_grid(element, patch_size, 0, tuple(grid))
  patches, positions, grid = patchify_lib.patchify(element["video"], patch_size)
  n = patches.shape[0]
  keep = kept_tokens(n, float(element["drop_rate"]))
  if keep < n:
    rng = np.random.default_rng(int(element["seed"]))
    index = np.sort(rng.choice(n, size=keep, replace=False))
    patches, positions = patches[index], positions[index]
  out = {
    "patches": patches,
    "positions": positions,
    "text_tokens": element["text_tokens"],
    "shapes": np.asarray(grid, np.int32).reshape(1, 3),
    "labels": np.asarray([element["label"]], np.int32),
  }
  if "text_embeddings" in element:
    out["text_embeddings"] = element["text_embeddings"]
  return out


def example_transforms(input_config, *, train: bool) -> list:
  """The per-example chain for an input config (`vdit.data.pipeline.default_input_config`).

  Evaluation is deterministic: first clip at `frame_stride`, fixed budget, no token dropping.
  """
  c = input_config
  drop = tuple(c.token_drop) if train else (0.0, 0.0)
  return [
    SampleClip(
      c.patch_size,
      c.max_frames,
      c.frame_stride,
      random_start=train,
      min_frames=c.min_frames if train else c.max_frames,
      max_frame_stride=c.max_frame_stride if train else c.frame_stride,
      whole_clip=c.whole_clip,
    ),
    ToFloat(),
    ResizeToTokenBudget(
      c.patch_size, c.max_tokens_per_example, c.min_tokens_per_example if train else None
    ),
    EmbedCaption(c.text_embeddings, c.max_caption_tokens)
    if c.get("text_embeddings")
    else TokenizeCaption(c.vocab_size, c.max_caption_tokens),
    SampleTokenDrop(*drop),
    Packable(),
  ]


def apply(transforms: Sequence, element: dict, rng: np.random.Generator | None = None) -> dict:
  """Runs a chain on one example outside grain (tests, notebooks, evaluators)."""
  for transform in transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      element = transform.random_map(element, rng or np.random.default_rng(0))
    else:
      element = transform.map(element)
  return element
