"""Does the model learn to generate? Small fits that fail when a part of the generation path is
broken (loss, masks, positions, attention, text, sampler, guidance), and the time grid the
sampler queries against the times training draws (docs/recipe.md, "Diagnosis as tests").

Each fit trains the real VideoDiT with the real train step on a fixed batch of `shapes` videos
built by the dataset's own renderer, then samples with the real `Sampler`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from tests.test_models import perturb
from vdit import media, models, sampling
from vdit.data import patchify, tokenizer
from vdit.datasets import shapes
from vdit.diffusion import flow, objectives
from vdit.diffusion.guidance import cfg
from vdit.tasks import video_diffusion

FRAMES, SIZE = 8, 16  # videos of 8 × 16 × 16 px: a (4, 4, 4) grid of (2, 4, 4) patches


def _video(colour: str, x0: float, seed: int = 0, step: float = 6.0) -> np.ndarray:
  """A `colour` square moving from x = `x0` px by `step` px over the clip (right if > 0) on
  black, uint8 [T, H, W, 3], rendered with the dataset's own signed distance and anti-aliasing."""
  ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
  cx = (x0 + np.linspace(0.0, step, FRAMES))[:, None, None]
  sd = shapes.signed_distance("square", xs - cx, ys - 8.0, 4.0)
  alpha = np.clip(0.5 - sd, 0.0, 1.0)[..., None]
  bg = np.asarray(shapes.BACKGROUNDS["black"], np.float32)
  video = bg * (1 - alpha) + np.asarray(shapes.COLOURS[colour], np.float32) * alpha
  del seed
  return np.round(video).astype(np.uint8)


def _config(**overrides):
  """The tiny demo config at test size: one 8×16×16 video per row, no frame conditioning, no
  caption dropout (the fits below test t2v), the demo's model recipe at width 64."""
  c = configs.load()
  length = (FRAMES // 2) * (SIZE // 4) ** 2
  configs.override(
    c,
    **{
      "input.tokens_per_row": length,
      "input.max_examples_per_row": 1,
      "input.text_tokens_per_row": c.input.max_caption_tokens,
      "model.width": 64,
      "model.depth": 2,
      "model.num_heads": 4,
      "model.text_width": 64,
      "model.text_depth": 1,
      "model.text_heads": 4,
      "optimizer.warmup_steps": 20,
      "optimizer.lr": 2e-3,
      "optimizer.ema_decay": 0.0,
      "diffusion.cond_probs": dict(none=1.0),
      "diffusion.text_dropout": 0.0,
      "evals": {},
      "sample.prompts": (),
    },
  )
  return configs.override(c, **overrides)


def _batch(config, videos: list[np.ndarray], prompts: list[str], rows: int) -> dict:
  """A packed batch of one video per row (cycled to `rows`)."""
  picks = [i % len(videos) for i in range(rows)]
  grid = (FRAMES // 2, SIZE // 4, SIZE // 4)
  tok = tokenizer.Tokenizer(config.input.vocab_size)
  batch = sampling.prompt_rows(
    [prompts[i] for i in picks], grid, tok, config.input.max_caption_tokens
  )
  clips = np.stack([media.from_uint8(videos[i]) for i in picks])
  batch["patches"] = patchify.patchify(clips, config.input.patch_size)[0].astype(np.float32)
  batch["cond_mask"] = np.zeros(batch["segment_ids"].shape, bool)
  batch["loss_mask"] = batch["segment_ids"] > 0
  return batch


_VIDEOS = {  # name -> uint8 video
  "red": _video("red", 2.0),
  "blue": _video("blue", 2.0),
  "red_left": _video("red", 1.0),
  "red_right": _video("red", 7.0),
  "red_moving_right": _video("red", 5.0),  # 5 → 11 px: the two meet in the middle of the clip
  "red_moving_left": _video("red", 11.0, step=-6.0),
}
RED, BLUE = "a red square moving right", "a blue square moving right"


@functools.cache
def _fit(pairs: tuple[tuple[str, str], ...], steps: int, model=(), **diffusion):
  """Trains on the fixed batch of `pairs` (video name, prompt) → (config, params);
  `model` ((key, value) pairs) and `diffusion` override `config.model` / `config.diffusion`."""
  overrides = {f"diffusion.{k}": v for k, v in diffusion.items()}
  overrides.update({f"model.{k}": v for k, v in model})
  config = _config(total_steps=steps, **overrides)
  videos, prompts = [_VIDEOS[v] for v, _ in pairs], [p for _, p in pairs]
  # One device: hundreds of steps of 8 simulated devices on 2 cores would take minutes.
  batch = _batch(config, videos, prompts, rows=8)
  _, _, state = configs.fit_one_batch(config, steps, batch=batch, devices=jax.devices()[:1])
  return config, jax.device_get(state.params)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


@pytest.fixture(scope="module")
def two_colours():
  return _fit((("red", RED), ("blue", BLUE)), 600)


def test_overfit_regenerates_the_video_from_noise(two_colours):
  """Trained on two videos (one per caption), sampling each caption from pure noise gives its
  video back (≥ 25 dB): a broken loss, mask, position code, sampler or guidance fails here."""
  _assert_regenerates(*two_colours, seeds=(0, 1))


def _assert_regenerates(config, params, seeds):
  """Each caption of the two-colour fit, sampled from noise, gives its video back (≥ 25 dB)."""
  sampler = sampling.Sampler(config=config, params=params)
  for seed in seeds:
    out = sampler.generate(
      [RED, BLUE], num_frames=FRAMES, height=SIZE, width=SIZE, steps=16, guidance=1.0, seed=seed
    )
    for video, name in zip(out, ("red", "blue"), strict=True):
      assert _psnr(video, _VIDEOS[name]) >= 25.0, (name, seed, _psnr(video, _VIDEOS[name]))


@pytest.mark.slow
def test_self_conditioned_model_regenerates_the_video():
  """The same fit with self-conditioning (half the steps read the model's own x̂0; the sampler
  feeds it at every step): each caption still gives its video back from noise."""
  _assert_regenerates(*_fit((("red", RED), ("blue", BLUE)), 600, self_condition=0.5), seeds=(0,))


def test_gated_x0_model_regenerates_the_video():
  """The same fit with a gated x0 (`flow_prediction="x0_gated"`: the model also outputs a
  per-token gate between its input and its estimate): each caption gives its video back."""
  fit = _fit((("red", RED), ("blue", BLUE)), 600, flow_prediction="x0_gated")
  _assert_regenerates(*fit, seeds=(0,))


def test_the_colour_word_sets_the_colour(two_colours):
  """The two videos differ only in colour, so only the caption can tell them apart: the same
  noise with "red" and with "blue" gives a red and a blue square (text is used), with and
  without guidance."""
  config, params = two_colours
  sampler = sampling.Sampler(config=config, params=params)
  fg = _VIDEOS["red"].max(axis=-1) > 100  # the square's pixels
  for guidance in (1.0, 3.0):
    red, blue = sampler.generate(
      [RED, BLUE], num_frames=FRAMES, height=SIZE, width=SIZE, steps=16, guidance=guidance, seed=3
    ).astype(np.float32)
    assert red[fg][:, 0].mean() > red[fg][:, 2].mean() + 100  # R ≫ B
    assert blue[fg][:, 2].mean() > blue[fg][:, 0].mean() + 100  # B ≫ R


def test_the_direction_word_sets_the_motion():
  """Two red squares from the same middle of the frame, one moving right and one moving left:
  only the direction word tells them apart. From the same noise, each caption gives its own
  video back, so the word reaches the motion. It takes longer than colour. With the demo's text
  front end (no encoder blocks) and the adaLN reading each token's position
  (`position_conditioning`), 1,000 steps give both videos back at ~47 dB (seeds 5–7); without
  the position term it takes ~1,500: at 1,000 two of those three seeds give the wrong video
  (docs/recipe.md, row X1)."""
  left = "a red square moving left"
  model = (("text_depth", 0), ("position_conditioning", True))
  config, params = _fit((("red_moving_right", RED), ("red_moving_left", left)), 1000, model)
  sampler = sampling.Sampler(config=config, params=params)
  right_out, left_out = sampler.generate(
    [RED, left], num_frames=FRAMES, height=SIZE, width=SIZE, steps=16, guidance=1.0, seed=5
  )
  for video, name in ((right_out, "red_moving_right"), (left_out, "red_moving_left")):
    assert _psnr(video, _VIDEOS[name]) >= 25.0, (name, _psnr(video, _VIDEOS[name]))


def test_tokens_read_each_other():
  """Trained on one caption with two videos (the square at two places), the model must decide
  *where* the square is from all tokens together. At t = 0.7, redrawing the noise of every
  other token moves a square token's x̂0 at least half as much as redrawing its own noise. A
  model that denoises each token on its own has 0 here; the diagnosed demo model had 1/6 to
  1/16 (docs/recipe.md); this fit has about 1."""
  config, params = _fit((("red_left", RED), ("red_right", RED)), 600)
  batch = _batch(config, [_VIDEOS["red_left"]], [RED], rows=1)
  spec = objectives.Spec.from_config(config.diffusion)
  velocity = objectives.flow_model(spec, video_diffusion.packed_apply(models.build(config), params))
  x0 = jnp.asarray(batch["patches"])
  t = jnp.full(x0.shape[:-1], 0.7)

  @jax.jit
  def x0_hat(noise):
    x_t = flow.interpolate(x0, noise, t)
    return x_t - t[..., None] * velocity(x_t, t, batch)

  square = np.flatnonzero(np.abs(batch["patches"][0] + 1).max(-1) > 0.5)  # not all black
  own, other = [], []
  for k in range(4):
    a, b = jax.random.normal(jax.random.key(k), (2, *x0.shape))
    for token in square:
      base = x0_hat(a)[0, token]
      own_b, other_b = a.at[0, token].set(b[0, token]), b.at[0, token].set(a[0, token])
      own.append(float(jnp.linalg.norm(x0_hat(own_b)[0, token] - base)))
      other.append(float(jnp.linalg.norm(x0_hat(other_b)[0, token] - base)))
  assert np.mean(other) > 0.5 * np.mean(own), (np.mean(other), np.mean(own))


def test_sampler_encodes_the_prompts_once():
  """`objectives.sample_rows` encodes the prompts once (`encode_rows`) and calls only the
  denoiser at each step: the same samples, to float rounding, as the whole model (text encoder
  included) at every step, for the demo's recipe with one encoder block and self-conditioning,
  with guidance. The two prompts share their noise, so only the text tells their samples apart."""
  config = _config(**{"diffusion.self_condition": 0.5})
  model = models.build(config)
  init = jax.jit(lambda r: model.init(r, *models.dummy_inputs(config)))
  params = perturb(nn.unbox(init(jax.random.key(0)))["params"], 1)
  grid, n = (FRAMES // 2, SIZE // 4, SIZE // 4), config.input.max_caption_tokens
  tok = tokenizer.Tokenizer(config.input.vocab_size)
  cond, null = (sampling.prompt_rows(p, grid, tok, n) for p in ([RED, BLUE], ["", ""]))
  rows = {k: jnp.concatenate([cond[k], null[k]]) for k in cond}
  spec = objectives.Spec.from_config(config.diffusion)
  shape = (1, int(np.prod(grid)), models.patch_dim(config))
  noise = jnp.repeat(jax.random.normal(jax.random.key(1), shape), 2, axis=0)
  zeros, given = jnp.zeros_like(noise), jnp.zeros(noise.shape[:2], bool)
  options = dict(spec=spec, steps=4, sampler="euler", strength=1.0)
  args = (rows, noise, zeros, given, zeros, jax.random.key(2), 3.0, (0.0, 1.0))
  once = objectives.sample_rows(model, params, *args, **options)

  @jax.jit
  def every_step(params):
    def model_fn(x, t, x0_prev):
      xx, tt, prev = (jnp.concatenate([a, a]) for a in (x, t, x0_prev))
      inputs = [rows[k] for k in ("positions", "segment_ids", "text_tokens", "text_segment_ids")]
      out = model.apply({"params": params}, xx, tt, *inputs, rows["labels"], x0_prev=prev)
      return cfg(out[:2], out[2:], 3.0, t, channels=x.shape[-1])

    seg = rows["segment_ids"][:2]
    return objectives.sample(
      spec, model_fn, noise, 4, shapes=rows["shapes"][:2], segment_ids=seg, rng=args[5]
    )

  np.testing.assert_allclose(once, every_step(params), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(once[0] - once[1]).max()) > 0.1  # the prompts matter


def test_sampler_queries_only_trained_times():
  """Every time the demo's sampler queries (16 and 32 Euler steps, the demo's sizes) falls in
  a part of the time axis where training draws a useful share of its times: at least half the
  uniform share (1/steps) of the training times lies in the step that ends there."""
  config = configs.load()
  spec = objectives.Spec.from_config(config.diffusion)
  for t, h, w in ((8, 32, 32), (8, 32, 48), (8, 48, 24)):
    grid = np.array([[[t // 2, h // 4, w // 4]]], np.int32)
    shift = float(flow.resolution_shift(jnp.asarray(grid), spec.shift_base_tokens)[0, 0])
    u = flow.sample_time(
      jax.random.key(0), (200_000,), spec.time_sampling, spec.logit_mean, spec.logit_std
    )
    train_t = np.asarray(flow.shift_time(u, shift))
    for steps in (16, 32):
      grid_t = np.asarray(flow.shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift))
      for hi, lo in zip(grid_t[:-1], grid_t[1:], strict=True):
        share = np.mean((train_t <= hi) & (train_t > lo))
        assert share >= 0.5 / steps, (t, h, w, steps, hi, lo, share)
