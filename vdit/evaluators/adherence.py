"""`adherence`: does a text-to-video model on `shapes` draw what the prompt says?

Generates one video per prompt `a {colour} {shape} moving {direction}` (a fixed, seeded draw of
`num_prompts` combinations of the dataset variant's words) and scores it analytically
(`shapes_scorer`): the accuracy of the colour, shape and direction recovered from the pixels,
`all` (all three right), the temporal-consistency scores, and the chance levels of each forced
choice. The scorer gets 100% on the real `shapes` validation videos and chance on noise
(tests/test_evaluators.py).
"""

import itertools
import os

import numpy as np

from vdit import media, sampling
from vdit.evaluators import Context, NotApplicable, predict_fn, shapes_scorer


def prompts_for(vocab: shapes_scorer.Vocabulary, num_prompts: int, seed: int = 0) -> list[str]:
  """`num_prompts` distinct prompts (cycling if more than the combinations), seeded order."""
  combos = list(itertools.product(vocab.colours, vocab.shapes, vocab.directions))
  order = np.random.default_rng(seed).permutation(len(combos))
  return ["a {} {} moving {}".format(*combos[order[i % len(combos)]]) for i in range(num_prompts)]


def evaluate(
  ctx: Context,
  *,
  num_prompts: int = 12,
  size: tuple[int, int, int] = (8, 32, 32),
  sizes: tuple[tuple[int, int, int], ...] = (),
  steps: int = 16,
  guidance: float | None = None,
  seed: int = 0,
  dataset_config: str | None = None,
  batch_size: int = 8,
) -> dict:
  """`size` = (num_frames, height, width), or several `sizes` (then `size` is ignored): the
  same prompts at each; the top-level scores are over all videos, and each size's own scores
  are reported as `{T}x{H}x{W}_{score}`. `dataset_config` (default: the run's
  `input.dataset_config`) picks the candidate words; `guidance` defaults to the config's
  `sample.guidance` (as the CLI's), the guidance interval is `diffusion.guidance_interval`.
  The videos of each size are written as one grid GIF,
  `workdir/samples/<step>/adherence_{T}x{H}x{W}.gif` (prompt order, row-major)."""
  config, fns, params, workdir, step = ctx
  if dataset_config is None and config.input.dataset != "shapes":
    raise NotApplicable(
      f"it scores `shapes` prompts, and input.dataset={config.input.dataset!r}; set "
      "evals.adherence.dataset_config to a shapes variant to score them anyway"
    )
  vocab = shapes_scorer.Vocabulary.of_dataset(dataset_config or config.input.dataset_config)
  prompts = prompts_for(vocab, num_prompts, seed)
  sampler = predict_fn(fns, "sampler")(params)
  if guidance is None:
    guidance = sampling.settings(config).guidance
  all_videos, out = [], {}
  for t, h, w in [tuple(int(x) for x in s) for s in (sizes or (size,))]:
    videos = []
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start : start + batch_size]
      opts = dict(
        num_frames=t, height=h, width=w, steps=steps, guidance=guidance, seed=seed + start
      )
      videos.extend(sampler.generate(chunk, **opts))
    write_grid(os.path.join(workdir, "samples", str(step), f"adherence_{t}x{h}x{w}.gif"), videos)
    if sizes:
      scores = shapes_scorer.score_many(videos, prompts, vocab)
      out.update({f"{t}x{h}x{w}_{k}": scores[k] for k in PER_SIZE})
    all_videos.extend(videos)
  return {**shapes_scorer.score_many(all_videos, prompts * len(sizes or (size,)), vocab), **out}


PER_SIZE = ("colour", "shape", "direction", "all", "temporal")


def write_grid(path: str, videos: list[np.ndarray], columns: int = 8, scale: int = 2) -> str:
  """Videos of one size [T, H, W, 3] as one GIF of a grid, `columns` per row (black fill)."""
  videos = np.stack(videos)
  rows = -(-len(videos) // columns)
  fill = np.zeros((rows * columns - len(videos), *videos.shape[1:]), np.uint8)
  cells = np.concatenate([videos, fill]).reshape(rows, columns, *videos.shape[1:])
  frames = np.stack([media.grid(cells[:, :, f]) for f in range(videos.shape[1])])
  return media.write_video(path, frames, fps=4.0, scale=scale)
