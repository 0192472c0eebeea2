"""Reference feature networks for Fréchet distances, loaded from user-supplied weight files.

  inception  Inception-v3 as used for FID (pytorch-fid's `FIDInceptionA/C/E` variant of the
             TF 2015-12-05 graph): 2048-d pool3 features per frame (`inception.py`)
  i3d        I3D (Inflated Inception-v1, Carreira & Zisserman 2017), 400-class Kinetics model
             as used for FVD (Unterthiner et al. 2018): 400 logits or 1024-d pool (`i3d.py`)

Weights are `.npz` / `.safetensors` files holding the PyTorch state dict of the reference port
under its own names and layouts (converted once with torch elsewhere; `torch_layout.py` maps
them to flax and back; docs/evaluation.md has the conversion snippet). Nothing is downloaded.

Shared here: the preprocessing both networks use (bilinear resize as torch
`F.interpolate(mode="bilinear", align_corners=False)`, no antialiasing, then [0, 255] → [-1, 1])
and fixed-shape batching (one compilation per network and input size).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def resize_to_unit(frames: jax.Array, size: int) -> jax.Array:
  """uint8 frames [..., H, W, 3] -> float32 [..., size, size, 3] in [-1, 1].

  Half-pixel bilinear interpolation without antialiasing (torch `align_corners=False`; pytorch-fid
  and the common PyTorch FVD code resize this way; TF1's legacy `resize_bilinear` of the original
  FID/FVD code samples without the half-pixel offset, a small known difference).
  """
  x = jnp.asarray(frames, jnp.float32) / 255.0
  shape = (*x.shape[:-3], size, size, x.shape[-1])
  x = jax.image.resize(x, shape, "bilinear", antialias=False)
  return 2.0 * x - 1.0


def run_batched(fn: Callable, variables, x: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn(variables, x[i:i + batch_size])` over x's leading axis, the last batch padded with
  copies of its final element so every call has the same shape; -> the concatenated outputs."""
  if len(x) == 0:
    raise ValueError("no inputs: need at least one video")
  outs = []
  for i in range(0, len(x), batch_size):
    chunk = x[i : i + batch_size]
    n = len(chunk)
    if n < batch_size and len(x) > batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
    outs.append(np.asarray(fn(variables, chunk))[:n])
  return np.concatenate(outs)


def missing_weights(net: str, weights: str | None, file: str, source: str, converted: str):
  """The error for a missing weights file: which file is needed and how to produce it."""
  given = f"weights={weights!r} does not exist; " if weights else ""
  return FileNotFoundError(
    f"{given}extractor={net!r} needs weights=PATH, a .npz or .safetensors copy of {source} "
    f"(vdit downloads nothing). Convert it once where torch is installed:\n"
    f"  python -c \"import numpy as np, torch; s = torch.load('{file}', map_location='cpu'); "
    f"np.savez('{converted}', **{{k: v.numpy() for k, v in s.items()}})\"\n"
    f"then pass weights='{converted}' (docs/evaluation.md, 'Inception and I3D weights')."
  )
