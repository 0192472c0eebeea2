"""`samples`: videos for fixed prompts and sizes → GIF/MP4 files and a TensorBoard summary.

Writes workdir/eval_samples/<step>/<name>_<i>_<prompt>.{gif,mp4} per prompt and size, and
returns `images` (one grid per size: the prompts' frames side by side, frames stacked down;
TensorBoard image summary) and `videos` ([N, T, H, W, 3] per size) for the writer.
"""

import os
from collections.abc import Sequence

import jax
import numpy as np

from vdit import media, sampling

DEFAULT_PROMPTS = ("a red circle moving right", "a blue square moving left")


def evaluate(
  config,
  params,
  workdir: str,
  step: int,
  *,
  prompts: Sequence[str] = DEFAULT_PROMPTS,
  sizes: Sequence[Sequence[int]] = ((8, 32, 32),),
  steps: int = 16,
  guidance: float = 3.0,
  seed: int = 0,
  display_scale: int = 2,
  fps: float = 8.0,
  name: str = "samples",
) -> dict:
  """`sizes`: (num_frames, height, width) triples, multiples of the patch size."""
  sampler = sampling.Sampler(config=config, params=params)
  out_dir = os.path.join(workdir, "eval_samples", str(step))
  files, images, videos = [], {}, {}
  for num_frames, height, width in sizes:
    clips = sampler.generate(
      list(prompts),
      num_frames=int(num_frames),
      height=int(height),
      width=int(width),
      steps=steps,
      guidance=guidance,
      seed=seed,
    )  # uint8 [N, T, H, W, 3]
    tag = f"{num_frames}x{height}x{width}"
    images[tag] = grid(clips)[None]
    videos[tag] = clips
    if jax.process_index() != 0:
      continue
    for i, (prompt, clip) in enumerate(zip(prompts, clips)):
      stem = f"{name}_{tag}_{i}_" + "_".join(prompt.split())[:48]
      for ext in (".gif", ".mp4"):
        path = os.path.join(out_dir, stem + ext)
        media.write_video(path, clip, fps=fps, scale=display_scale)
        files.append(path)
  return {
    "files": files,
    "num_videos": len(prompts) * len(sizes),
    "images": images,
    "videos": videos,
  }


def grid(clips: np.ndarray, pad: int = 1) -> np.ndarray:
  """uint8 [N, T, H, W, 3] → one image [T·(H+pad), N·(W+pad), 3]: prompts across, time down."""
  n, t, h, w, c = clips.shape
  padded = np.pad(clips, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=255)
  return padded.transpose(1, 2, 0, 3, 4).reshape(t * (h + pad), n * (w + pad), c)
