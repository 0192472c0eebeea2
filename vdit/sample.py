r"""Generating videos from a trained checkpoint: CLI and library API.

  python -m vdit.sample --workdir=runs/shapes --prompt="a red circle moving right" \
      --num_frames=8 --height=32 --width=48 --out=x.gif

Any size works as long as frames/height/width are multiples of the patch size: the model sees
a packed row of spacetime patches with their (t, h, w) positions, not a fixed grid.
Library: `load(workdir)` → `Sampler`; `Sampler.generate(prompts, ...)` → uint8 videos.
"""

import dataclasses
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from vdit import checkpointing, media, models, sharding, train_state
from vdit.data import patchify, tokenizer
from vdit.diffusion import flow

CHANNELS = 3


# ---------------------------------------------------------------------------------------------
# Building the packed rows for generation (numpy).
# ---------------------------------------------------------------------------------------------
def prompt_rows(
  prompts: Sequence[str], grid: tuple[int, int, int], tok: tokenizer.Tokenizer, max_tokens: int
) -> dict[str, np.ndarray]:
  """One row per prompt holding one video of `grid` patches; captions tokenized and padded."""
  n, length = len(prompts), int(np.prod(grid))
  text = np.zeros((n, max_tokens), np.int32)
  text_seg = np.zeros((n, max_tokens), np.int32)
  for i, prompt in enumerate(prompts):
    ids = tok.encode(prompt, max_tokens)
    text[i, : len(ids)] = ids
    text_seg[i, : len(ids)] = 1
  return {
    "positions": np.broadcast_to(patchify.grid_positions(grid), (n, length, 3)).copy(),
    "segment_ids": np.ones((n, length), np.int32),
    "shapes": np.broadcast_to(np.asarray(grid, np.int32), (n, 1, 3)).copy(),
    "text_tokens": text,
    "text_segment_ids": text_seg,
    "labels": np.full((n, 1), -1, np.int32),
  }


# ---------------------------------------------------------------------------------------------
# The sampler.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sampler:
  """A model, its (EMA) params and its config; generates videos of any valid size."""

  config: ml_collections.ConfigDict
  params: Any
  model: Any = None

  def __post_init__(self):
    self.model = self.model or models.build(self.config)
    self.patch_size = tuple(self.config.input.patch_size)
    self.tokenizer = tokenizer.Tokenizer(self.config.input.vocab_size)

  def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    patchify.check_divisible(num_frames, height, width, self.patch_size)
    return tuple(n // p for n, p in zip((num_frames, height, width), self.patch_size))

  def generate(
    self,
    prompts: Sequence[str],
    *,
    num_frames: int,
    height: int,
    width: int,
    steps: int = 32,
    guidance: float = 3.0,
    seed: int = 0,
  ) -> np.ndarray:
    """Text-to-video: uint8 videos [N, T, H, W, 3] for N prompts."""
    if steps < 1:
      raise ValueError(f"steps={steps} must be ≥ 1")
    grid = self.grid(num_frames, height, width)
    max_tokens = self.config.input.max_caption_tokens
    cond = prompt_rows(prompts, grid, self.tokenizer, max_tokens)
    null = prompt_rows([""] * len(prompts), grid, self.tokenizer, max_tokens)
    rows = {k: np.concatenate([cond[k], null[k]]) for k in cond}
    patch_dim = int(np.prod(self.patch_size)) * CHANNELS
    noise = jax.random.normal(
      jax.random.PRNGKey(seed), (len(prompts), rows["positions"].shape[1], patch_dim)
    )
    x0 = _euler_cfg(self.model, self.params, rows, noise, steps, float(guidance))
    x0 = np.asarray(jax.device_get(x0))
    videos = [patchify.unpatchify(x, grid, self.patch_size, CHANNELS) for x in x0]
    return media.to_uint8(np.stack(videos))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _euler_cfg(model, params, rows, noise, steps, guidance):
  """Euler integration of the guided velocity from t=1 (noise) to t=0 (data)."""
  n = noise.shape[0]

  def velocity(x, t):
    # x: [N, L, P]; the conditional and null rows see the same noisy video.
    xx = jnp.concatenate([x, x])
    t_tok = jnp.concatenate([t, t])  # [2N, L]
    v = model.apply(
      {"params": params},
      xx,
      t_tok,
      rows["positions"],
      rows["segment_ids"],
      rows["text_tokens"],
      rows["text_segment_ids"],
      rows["labels"],
    )
    return flow.cfg_velocity(v[:n], v[n:], guidance)

  return flow.euler_sample(velocity, noise, steps)


# ---------------------------------------------------------------------------------------------
# Loading from a workdir.
# ---------------------------------------------------------------------------------------------
def load(workdir: str, step: int | None = None) -> Sampler:
  """The EMA params of the latest (or given) checkpoint in `workdir`, replicated locally."""
  config = checkpointing.read_config(workdir)
  mngr = checkpointing.manager(workdir, max_to_keep=config.max_checkpoints)
  if mngr.latest_step() is None:
    raise checkpointing.NoCheckpointError(
      f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with "
      f"`python -m vdit.main --config=... --workdir={workdir}`"
    )
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.rules_from_config(config.sharding_rules)
  model = models.build(config)
  tx = train_state.make_optimizer(config.optimizer, config.total_steps)
  init = train_state.init_fn(model, models.dummy_inputs(config), tx, config.seed)
  abstract, _ = train_state.abstract_state(init, mesh, rules)
  step, state = checkpointing.restore(mngr, abstract, None, step)
  mngr.close()
  logging.info("loaded step %d from %s", step, workdir)
  return Sampler(config=config, params=state.ema_params, model=model)


def write_config_samples(
  config: ml_collections.ConfigDict, params: Any, workdir: str, step: int
) -> list[str]:
  """Writes the config's sample prompts as GIF and MP4 into workdir/samples/<step>/."""
  s = config.sample
  sampler = Sampler(config=config, params=params)
  videos = sampler.generate(
    list(s.prompts),
    num_frames=s.num_frames,
    height=s.height,
    width=s.width,
    steps=s.steps,
    guidance=s.guidance,
    seed=s.seed,
  )
  out_dir = os.path.join(workdir, "samples", str(step))
  paths = []
  for prompt, video in zip(s.prompts, videos):
    name = "_".join(prompt.split())[:60]
    for ext in (".gif", ".mp4"):
      path = os.path.join(out_dir, name + ext)
      media.write_video(path, video, scale=s.display_scale)
      paths.append(path)
  return paths


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------
def _define_flags() -> None:
  """CLI flags; defined only when run as a program (train.py imports this module)."""
  flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.")
  flags.DEFINE_string("prompt", None, "Text prompt.")
  flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
  flags.DEFINE_integer("num_frames", None, "Frames (default: the config's).")
  flags.DEFINE_integer("height", None, "Height in pixels (default: the config's).")
  flags.DEFINE_integer("width", None, "Width in pixels (default: the config's).")
  flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("display_scale", 1, "Nearest-neighbour upscaling of GIF/MP4 output.")
  flags.DEFINE_float("fps", 8.0, "Frames per second of GIF/MP4 output.")
  flags.DEFINE_string("out", None, "Output file: .gif, .mp4 or .npz.")


def _out_paths(out: str, n: int) -> list[str]:
  if n == 1:
    return [out]
  root, ext = os.path.splitext(out)
  return [f"{root}_{i:03d}{ext}" for i in range(n)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  for name in ("workdir", "out"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  media.check_path(f.out)
  if f.prompts_file:
    with open(f.prompts_file) as fp:
      prompts = [line.strip() for line in fp if line.strip()]
  elif f.prompt is not None:
    prompts = [f.prompt]
  else:
    raise app.UsageError("give --prompt or --prompts_file")
  try:
    sampler = load(f.workdir, f.step)
    s = sampler.config.sample
    size = dict(
      num_frames=f.num_frames or s.num_frames,
      height=f.height or s.height,
      width=f.width or s.width,
    )
    sampler.grid(**size)  # fail on a bad size before any compute
  except (checkpointing.NoCheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")
  videos = sampler.generate(
    prompts,
    **size,
    steps=f.steps or s.steps,
    guidance=s.guidance if f.guidance is None else f.guidance,
    seed=f.seed,
  )
  for prompt, video, path in zip(prompts, videos, _out_paths(f.out, len(prompts))):
    meta = dict(prompt=prompt, seed=f.seed, workdir=f.workdir, **size)
    media.write_video(path, video, fps=f.fps, scale=f.display_scale, metadata=meta)
    print(path, flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
