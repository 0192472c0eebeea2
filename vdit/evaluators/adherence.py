"""`adherence`: does a text-to-video model on `shapes` draw what the prompt says?

Generates one video per prompt `a {colour} {shape} moving {direction}` (a fixed, seeded draw of
`num_prompts` combinations of the dataset variant's words) and scores it analytically
(`shapes_scorer`): the accuracy of the colour, shape and direction recovered from the pixels,
`all` (all three right), the temporal-consistency scores, and the chance levels of each forced
choice. The scorer gets 100% on the real `shapes` validation videos and chance on noise
(tests/test_evaluators.py).
"""

import itertools

import numpy as np

from vdit.evaluators import register, shapes_scorer


def prompts_for(vocab: shapes_scorer.Vocabulary, num_prompts: int, seed: int = 0) -> list[str]:
  """`num_prompts` distinct prompts (cycling if more than the combinations), seeded order."""
  combos = list(itertools.product(vocab.colours, vocab.shapes, vocab.directions))
  order = np.random.default_rng(seed).permutation(len(combos))
  return ["a {} {} moving {}".format(*combos[order[i % len(combos)]]) for i in range(num_prompts)]


@register("adherence")
def evaluate(
  config,
  params,
  workdir: str,
  step: int,
  *,
  num_prompts: int = 12,
  size: tuple[int, int, int] = (8, 32, 32),
  steps: int = 16,
  guidance: float = 3.0,
  seed: int = 0,
  dataset_config: str | None = None,
  batch_size: int = 8,
) -> dict:
  """`size` = (num_frames, height, width); `dataset_config` (default: the run's
  `input.dataset_config`) picks the candidate words."""
  del workdir, step
  from vdit import sample  # noqa: PLC0415

  vocab = shapes_scorer.Vocabulary.of_dataset(dataset_config or config.input.dataset_config)
  prompts = prompts_for(vocab, num_prompts, seed)
  sampler = sample.Sampler(config=config, params=params)
  t, h, w = (int(s) for s in size)
  videos = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    opts = dict(num_frames=t, height=h, width=w, steps=steps, guidance=guidance, seed=seed + start)
    videos.extend(sampler.generate(chunk, **opts))
  return shapes_scorer.score_many(videos, prompts, vocab)
