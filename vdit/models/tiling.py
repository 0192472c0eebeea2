"""Chunked (time) and tiled (space) encoding and decoding: long or large videos in bounded memory.

Time: the autoencoder is causal, so a chunk of latent frames [j0, j1) is computed from the
frames it summarises plus `context` earlier latent frames' worth of frames (the look-back of
`VideoAutoencoder.temporal_lookback`); padding at the chunk's start then only reaches the context,
and the chunk's outputs equal the unchunked ones up to float rounding. Every chunk has the same
shape (one compilation): the last one is padded at the end with its last frame, which causality
makes harmless. Chunks start on latent-group boundaries (global frame s·ft), so the local
"first frame alone" lines up with the global grouping.

Space: overlapping tiles (starting every tile − overlap, the last one flush with the edge),
each coded on its own, blended with weights that ramp linearly across the middle half of the
overlap (1 inside, 0 on the outer quarter next to an inner tile edge; normalised by the summed
weights). Zero padding at a tile's edge differs from the real neighbourhood, so tiling is
approximate; the error falls as the overlap grows towards the receptive field (exact once a
quarter of the overlap covers it), see `tests/test_autoencoder.py` and BENCHMARKS.md.

Per-tile results are assembled on the host (numpy), so device memory is bounded by one tile of
one chunk. Sizes: `chunk` in latent frames; `tile` (h, w) and `overlap` in pixels, multiples of
the spatial compression fs.
"""

import functools
import math
from collections.abc import Callable

import jax
import numpy as np

from vdit.models.autoencoder import VideoAutoencoder, check_video_shape


def _starts(size: int, tile: int, overlap: int) -> list[int]:
  if tile >= size:
    return [0]
  step = tile - overlap
  if step <= 0:
    raise ValueError(f"overlap={overlap} must be smaller than the tile {tile}")
  return sorted(set(range(0, size - tile, step)) | {size - tile})


def _ramp(start: int, length: int, size: int, overlap: int) -> np.ndarray:
  """1-D blending weights of a tile [start, start+length) inside [0, size)."""
  w = np.ones(length, np.float32)
  if overlap <= 0:
    return w
  # 0 over the outer quarter (the outputs nearest the tile's zero padding, the least like the
  # untiled ones), a linear ramp across the middle half, 1 beyond.
  margin = overlap // 4
  ramp = np.clip((np.arange(overlap, dtype=np.float32) + 0.5 - margin) / (overlap - 2 * margin),
                 0.0, 1.0)  # fmt: skip
  if start > 0:
    w[:overlap] = np.minimum(w[:overlap], ramp)
  if start + length < size:
    w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
  return w


def _tiled(fn: Callable, x: np.ndarray, tile, overlap: int, factor: float):
  """Applies `fn` ([B, t, h, w, C] → tuple of [B, t', h·factor, w·factor, C']) on overlapping
  spatial tiles of x and blends the outputs. `tile` and `overlap` are in x's units."""
  _, _, h, w, _ = x.shape
  th, tw = min(tile[0], h), min(tile[1], w)
  out = weight = None
  o_ov = int(round(overlap * factor))
  for y0 in _starts(h, th, overlap):
    for x0 in _starts(w, tw, overlap):
      parts = [np.asarray(p) for p in fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])]
      oy, ox = int(round(y0 * factor)), int(round(x0 * factor))
      oh, ow = parts[0].shape[2:4]
      wy = _ramp(oy, oh, int(round(h * factor)), o_ov)
      wx = _ramp(ox, ow, int(round(w * factor)), o_ov)
      wt = (wy[:, None] * wx[None, :])[None, None, :, :, None]
      if out is None:
        shape = lambda p: (*p.shape[:2], int(round(h * factor)), int(round(w * factor)), p.shape[4])
        out = [np.zeros(shape(p), np.float32) for p in parts]
        weight = np.zeros((1, 1, *out[0].shape[2:4], 1), np.float32)
      for o, p in zip(out, parts):
        o[:, :, oy : oy + oh, ox : ox + ow] += wt * p
      weight[:, :, oy : oy + oh, ox : ox + ow] += wt
  return tuple(o / weight for o in out)


@functools.lru_cache(maxsize=16)
def _jitted(model: VideoAutoencoder, method: str) -> Callable:
  """One jitted `encode`/`decode` per model (modules hash by their fields): repeated calls of
  `encode`/`decode` reuse the compilations instead of re-tracing a fresh lambda."""
  return jax.jit(lambda v, x: model.apply(v, x, method=method))


def _check_tile(tile, overlap: int, fs: int) -> None:
  if tile and any(t % fs or t <= 0 for t in tile) or overlap % fs or overlap < 0:
    raise ValueError(
      f"tile={tile} and overlap={overlap} must be (non-negative) multiples of the spatial "
      f"compression {fs}"
    )
  if tile and overlap >= min(tile):
    raise ValueError(f"overlap={overlap} must be smaller than the tile {tile}")


def pad_frames(x: np.ndarray, frames: int) -> np.ndarray:
  if x.shape[1] >= frames:
    return x[:, :frames]
  return np.concatenate([x, np.repeat(x[:, -1:], frames - x.shape[1], axis=1)], axis=1)


def encode(
  model: VideoAutoencoder,
  variables,
  video,
  *,
  chunk: int | None = None,
  tile: tuple[int, int] | None = None,
  overlap: int = 0,
  context: int | None = None,
):
  """Posterior (mean, logvar) [B, T', H', W', Z] of video [B, T, H, W, 3], `chunk` latent
  frames and `tile` pixels at a time (None: whole). `context` latent frames of look-back per
  chunk (default: the exact one, from `temporal_lookback`)."""
  video = np.asarray(video, np.float32)
  check_video_shape(video.shape, model.compression)
  ft, fs, _ = model.compression
  _check_tile(tile, overlap, fs)
  run = _jitted(model, "encode")
  space = lambda x: (
    _tiled(lambda t: run(variables, t), x, tile, overlap, 1 / fs) if tile else run(variables, x)
  )
  n = 1 + (video.shape[1] - 1) // ft
  if not chunk or chunk >= n:
    return tuple(np.asarray(p) for p in space(video))
  if context is None:
    context = math.ceil(model.temporal_lookback()[0] / ft)
  window = context + chunk  # latent frames coded per call
  out = None
  for j0 in range(0, n, chunk):
    j1, s = min(j0 + chunk, n), max(0, j0 - context)
    frames = pad_frames(video[:, s * ft :], 1 + (window - 1) * ft)
    parts = space(frames)
    if out is None:
      out = [np.zeros((p.shape[0], n, *p.shape[2:]), np.float32) for p in parts]
    for o, p in zip(out, parts):
      o[:, j0:j1] = np.asarray(p)[:, j0 - s : j1 - s]
  return tuple(out)


def decode(
  model: VideoAutoencoder,
  variables,
  z,
  *,
  chunk: int | None = None,
  tile: tuple[int, int] | None = None,
  overlap: int = 0,
  context: int | None = None,
) -> np.ndarray:
  """Video [B, 1 + ft·(T'−1), fs·H', fs·W', 3] of latents [B, T', H', W', Z], `chunk` latent
  frames and `tile` output pixels (overlap in pixels) at a time."""
  z = np.asarray(z, np.float32)
  ft, fs, _ = model.compression
  _check_tile(tile, overlap, fs)
  jitted = _jitted(model, "decode")
  run = lambda v, x: (jitted(v, x),)
  if tile:
    latent_tile, latent_overlap = (tile[0] // fs, tile[1] // fs), overlap // fs
    space = lambda x: _tiled(lambda t: run(variables, t), x, latent_tile, latent_overlap, fs)[0]
  else:
    space = lambda x: np.asarray(run(variables, x)[0])
  n = z.shape[1]
  if not chunk or chunk >= n:
    return space(z)
  if context is None:
    context = math.ceil((model.temporal_lookback()[1] - 1) / ft) + 1
  context = max(context, 1)  # a chunk's first latent gives one frame: its group needs one more
  window = context + chunk
  out = np.zeros((z.shape[0], 1 + (n - 1) * ft, z.shape[2] * fs, z.shape[3] * fs, 3), np.float32)
  for j0 in range(0, n, chunk):
    j1, s = min(j0 + chunk, n), max(0, j0 - context)
    frames = space(pad_frames(z[:, s:], window))
    start, end = (0 if j0 == 0 else (j0 - 1) * ft + 1), (j1 - 1) * ft + 1
    out[:, start:end] = frames[:, start - s * ft : end - s * ft]
  return out
