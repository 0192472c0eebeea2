"""Sample videos with the task's `sampler` (video_diffusion).

samples  videos for fixed prompts and sizes: workdir/eval_samples/<step>/<name>_<i>_<prompt>
         .{gif,mp4} per prompt and size; returns `images` (one grid per size: the prompts'
         frames side by side, frames stacked down; TensorBoard image summary) and `videos`
         ([N, T, H, W, 3] per size) for the writer.
prompts  the config's `sample.prompts` at its `sample` size and settings (the run's
         end-of-run samples): workdir/samples/<step>/<prompt>.{gif,mp4}, in latent space
         also the latents (.npz).
"""

import os
from collections.abc import Sequence

import jax
import numpy as np

from vdit import media, sampling
from vdit.evaluators import Context, NotApplicable, predict_fn

DEFAULT_PROMPTS = ("a red circle moving right", "a blue square moving left")


def evaluate(
  ctx: Context,
  *,
  prompts: Sequence[str] = DEFAULT_PROMPTS,
  sizes: Sequence[Sequence[int]] = ((8, 32, 32),),
  steps: int = 16,
  guidance: float | None = None,
  seed: int = 0,
  display_scale: int = 2,
  fps: float = 8.0,
  name: str = "samples",
) -> dict:
  """`sizes`: (num_frames, height, width) triples (any size, `Sampler.canvas`); `guidance`
  defaults to the config's `sample.guidance` (as the CLI's)."""
  fns, params, workdir, step = ctx.fns, ctx.params, ctx.workdir, ctx.step
  sampler = predict_fn(fns, "sampler")(params)
  if guidance is None:
    guidance = sampling.settings(ctx.config).guidance
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


def prompts(ctx: Context) -> dict:
  """Writes the config's sample prompts as GIF and MP4 into workdir/samples/<step>/ (and, in
  latent space, their latents as NPZ); prints the paths."""
  config, fns, params, workdir, step = ctx
  sampler = predict_fn(fns, "sampler")(params)
  s = sampling.settings(config)
  if not s.prompts:
    raise NotApplicable("config.sample.prompts is empty")
  options = {
    k: getattr(s, k) for k in ("num_frames", "height", "width", "steps", "guidance", "seed")
  }
  videos = sampler.generate(list(s.prompts), **options)
  if jax.process_index() != 0:
    return {"num_videos": len(videos)}
  out_dir = os.path.join(workdir, "samples", str(step))
  paths = []
  for i, (prompt, video) in enumerate(zip(s.prompts, videos)):
    name = "_".join(prompt.split())[:60]
    for ext in (".gif", ".mp4"):
      path = os.path.join(out_dir, name + ext)
      media.write_video(path, video, scale=s.display_scale)
      paths.append(path)
    if sampler.last_latents is not None:  # latent space: the latents too, as NPZ
      path = os.path.join(out_dir, name + ".npz")
      latents = {"latents": sampler.last_latents[i]}
      media.write_video(path, video, metadata=dict(prompt=prompt), extra_arrays=latents)
      paths.append(path)
  print("samples written:\n  " + "\n  ".join(paths), flush=True)
  return {"files": paths, "num_videos": len(videos)}


def grid(clips: np.ndarray, pad: int = 1) -> np.ndarray:
  """uint8 [N, T, H, W, 3] → one image [T·(H+pad), N·(W+pad), 3]: prompts across, time down."""
  n, t, h, w, c = clips.shape
  padded = np.pad(clips, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=255)
  return padded.transpose(1, 2, 0, 3, 4).reshape(t * (h + pad), n * (w + pad), c)
