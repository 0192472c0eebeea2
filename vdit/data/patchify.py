"""Spacetime patches: cut a video into `(pt, ph, pw)` tubelets and put them back (ViViT, Sec. 3.2).

Pure array code: only `reshape`/`transpose` methods of the array are used, so the same functions
work on numpy arrays (the input pipeline) and on jax arrays (the sampler). Tokens are ordered
t-major, then h, then w; each patch vector is flattened in `(pt, ph, pw, C)` order.
"""

from collections.abc import Sequence

import numpy as np


def check_divisible(num_frames: int, height: int, width: int, patch_size: Sequence[int]) -> None:
  """Raises ValueError naming every dimension that is not a positive multiple of its patch size."""
  if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
    raise ValueError(f"patch_size={tuple(patch_size)} must be three positive ints (pt, ph, pw)")
  problems = []
  for name, size, patch in zip(
    ("num_frames", "height", "width"), (num_frames, height, width), patch_size
  ):
    if size < 1 or size % patch:
      problems.append(f"{name}={size} is not a multiple of the patch size {patch}")
  if problems:
    raise ValueError("; ".join(problems) + f" (patch_size={tuple(patch_size)})")


def grid_positions(grid: Sequence[int]) -> np.ndarray:
  """`(t, h, w)` index of every token of a patch grid, t-major. Returns [N, 3] int32."""
  t, h, w = (int(g) for g in grid)
  mesh = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack(mesh, axis=-1).reshape(t * h * w, 3).astype(np.int32)


def patchify(video, patch_size: Sequence[int]):
  """Cuts a video into non-overlapping spacetime patches.

  Args:
    video: [..., T, H, W, C] (numpy or jax); T, H, W must be multiples of the patch size.
    patch_size: (pt, ph, pw).

  Returns:
    patches: [..., N, P] with N = T'·H'·W' tokens (t-major) and P = pt·ph·pw·C.
    positions: [N, 3] int32 numpy, the `(t, h, w)` grid index of each token.
    grid: (T', H', W') as Python ints.
  """
  *lead, t, h, w, c = video.shape
  check_divisible(t, h, w, patch_size)
  pt, ph, pw = (int(p) for p in patch_size)
  grid = (t // pt, h // ph, w // pw)
  n = len(lead)
  x = video.reshape(*lead, grid[0], pt, grid[1], ph, grid[2], pw, c)
  # [..., T', pt, H', ph, W', pw, C] -> [..., T', H', W', pt, ph, pw, C]
  x = x.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
  patches = x.reshape(*lead, grid[0] * grid[1] * grid[2], pt * ph * pw * c)
  return patches, grid_positions(grid), grid


def unpatchify(patches, grid: Sequence[int], patch_size: Sequence[int], channels: int):
  """Inverse of `patchify`: [..., N, P] patches of a (T', H', W') grid -> [..., T, H, W, C]."""
  *lead, num, size = patches.shape
  gt, gh, gw = (int(g) for g in grid)
  pt, ph, pw = (int(p) for p in patch_size)
  if num != gt * gh * gw or size != pt * ph * pw * channels:
    raise ValueError(
      f"patches of shape {tuple(patches.shape)} do not fit grid={tuple(grid)} with "
      f"patch_size={tuple(patch_size)} and channels={channels}: expected "
      f"[..., {gt * gh * gw}, {pt * ph * pw * channels}]"
    )
  n = len(lead)
  x = patches.reshape(*lead, gt, gh, gw, pt, ph, pw, channels)
  # [..., T', H', W', pt, ph, pw, C] -> [..., T', pt, H', ph, W', pw, C]
  x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
  return x.reshape(*lead, gt * pt, gh * ph, gw * pw, channels)
