"""`class_samples`: a class-conditional image model's samples, one row per class (image_diffusion).

`per_class` images of each class (the task's `generate`, guided by `guidance`) as one PNG grid,
workdir/samples/<step>/classes.png; row c holds class c. The options default to `config.sample`.
"""

import jax
import numpy as np

from vdit import media
from vdit.evaluators import Context, predict_fn


def evaluate(
  ctx: Context,
  *,
  per_class: int | None = None,
  steps: int | None = None,
  guidance: float | None = None,
  seed: int | None = None,
  display_scale: int | None = None,
) -> dict:
  config, fns, params, workdir, step = ctx
  s = config.sample
  per_class = s.per_class if per_class is None else per_class
  classes = config.model.num_classes
  labels = np.repeat(np.arange(classes), per_class)
  images = predict_fn(fns, "generate")(
    params,
    labels,
    steps=s.steps if steps is None else steps,
    guidance_scale=s.guidance if guidance is None else guidance,
    seed=s.seed if seed is None else seed,
  )  # every process: a collective over the sharded params
  if jax.process_index() != 0:
    return {"num_images": len(labels)}
  _, h, w = config.input.size
  tiles = media.to_uint8(images).reshape(classes, per_class, h, w, 3)
  path = f"{workdir}/samples/{step}/classes.png"
  scale = s.display_scale if display_scale is None else display_scale
  media.write_image(path, media.grid(tiles), scale=scale)
  print(f"samples written:\n  {path}", flush=True)
  return {"files": [path], "num_images": len(labels)}
