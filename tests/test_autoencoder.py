"""The causal video autoencoder: causality, images = 1-frame videos, chunked/tiled coding,
a short training run's reconstructions, latent statistics, the task through `vdit.main`."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import configs
from vdit import config_checks, datasets, latent_codec, media, train
from vdit.datasets import records
from vdit.models import autoencoder as ae
from vdit.models import tiling
from vdit.tasks import autoencoding as ae_task
from vdit.tools import encode_latents

TINY = dict(channels=(4, 8), time_compression=2, latent_channels=4, num_res_blocks=1)


def _model(**kw):
  return ae.VideoAutoencoder(**{**TINY, **kw})


def _init(model, shape=(1, 5, 16, 16, 3), seed=0):
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros(shape)))


def _video(shape, seed=0):
  return np.asarray(jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0))


def smooth_video(batch: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
  """Moving colour gradients: [B, T, size, size, 3] in [-1, 1], smooth in space and time."""
  r = np.random.default_rng(seed)
  t = np.arange(frames)[:, None, None, None]
  y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  out = []
  for _ in range(batch):
    fy, fx, v = r.uniform(0.2, 0.6, 3), r.uniform(0.2, 0.6, 3), r.uniform(-0.05, 0.05, 3)
    phase = r.uniform(0, 2 * np.pi, 3)
    out.append(np.sin(2 * np.pi * (fy * y[..., None] + fx * x[..., None] + v * t) + phase))
  return (0.8 * np.stack(out)).astype(np.float32)


def test_shapes_and_compression():
  model = _model(channels=(4, 8, 8), time_compression=4, latent_channels=3)
  assert model.compression == (4, 4, 4)
  # Shapes by tracing only (jax.eval_shape): nothing is compiled.
  params = jax.eval_shape(lambda: _init(model, (1, 9, 16, 16, 3)))
  recon, mean, logvar = jax.eval_shape(model.apply, params, jnp.zeros((2, 9, 16, 24, 3)))
  assert mean.shape == logvar.shape == (2, 3, 4, 6, 3)  # 1 + (9 − 1)/4 frames, 16/4, 24/4
  assert recon.shape == (2, 9, 16, 24, 3)
  encode = lambda x: jax.eval_shape(lambda p: model.apply(p, x, method=model.encode), params)
  assert encode(jnp.zeros((2, 16, 16, 3)))[0].shape == (2, 4, 4, 3)  # an image
  with pytest.raises(ValueError, match=r"T=8: expected 1 \+ 4·n"):
    encode(jnp.zeros((1, 8, 16, 16, 3)))
  with pytest.raises(ValueError, match="height=10 is not a multiple of the spatial compression 4"):
    encode(jnp.zeros((1, 9, 10, 16, 3)))


def test_causal_encoder_and_decoder():
  """Perturbing frames ≥ f changes no latent frame before the one that contains f; perturbing
  latent frames ≥ j changes no decoded frame before latent j's group."""
  model = _model(time_compression=2)
  params = _init(model)
  video = _video((1, 9, 16, 16, 3))
  mean, _ = model.apply(params, video, method=model.encode)
  for f in range(1, 9):  # frame f lies in latent group ceil(f / 2)
    bumped = video.copy()
    bumped[:, f:] += 0.5
    m2, _ = model.apply(params, bumped, method=model.encode)
    j = -(-f // 2)
    np.testing.assert_array_equal(m2[:, :j], mean[:, :j])
    assert np.abs(m2[:, j:] - mean[:, j:]).max() > 1e-4  # and later ones do change
  out = model.apply(params, mean, method=model.decode)
  for j in range(1, 5):
    out2 = model.apply(params, mean.at[:, j:].add(0.5), method=model.decode)
    first = (j - 1) * 2 + 1  # first frame of latent j's group
    np.testing.assert_array_equal(out2[:, :first], out[:, :first])
    assert np.abs(out2[:, first:] - out[:, first:]).max() > 1e-4


def test_image_is_a_one_frame_video():
  model = _model()
  params = _init(model)
  video = _video((2, 5, 16, 16, 3))
  mean, logvar = model.apply(params, video, method=model.encode)
  image_mean, image_logvar = model.apply(params, video[:, 0], method=model.encode)
  # The first frame is encoded alone: latent 0 of a video = the latent of its first frame.
  np.testing.assert_allclose(image_mean, mean[:, 0], atol=1e-6)
  np.testing.assert_allclose(image_logvar, logvar[:, 0], atol=1e-6)
  one, _ = model.apply(params, video[:, :1], method=model.encode)
  np.testing.assert_array_equal(one[:, 0], image_mean)
  image = model.apply(params, image_mean, method=model.decode)
  frames = model.apply(params, mean, method=model.decode)
  assert image.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(image, frames[:, 0], atol=1e-5)


def test_chunked_coding_equals_whole():
  """With the default (exact) context, temporal chunks reproduce the unchunked result."""
  model = _model()
  params = _init(model)
  enc_lookback, dec_lookback = model.temporal_lookback()
  frames = 1 + 2 * (enc_lookback // 2 + 6)  # longer than the context, so chunks use it
  video = _video((1, frames, 8, 8, 3))
  mean, logvar = tiling.encode(model, params, video)
  for chunk in (1, 4):
    m, lv = tiling.encode(model, params, video, chunk=chunk)
    np.testing.assert_allclose(m, mean, atol=2e-5)
    np.testing.assert_allclose(lv, logvar, atol=2e-5)
  whole = tiling.decode(model, params, mean)
  assert whole.shape == video.shape
  for chunk in (1, 3):
    np.testing.assert_allclose(tiling.decode(model, params, mean, chunk=chunk), whole, atol=2e-5)
  # Too little context is visibly different: the test can fail.
  short = tiling.decode(model, params, mean, chunk=2, context=1)
  assert np.abs(short - whole).max() > 1e-3


def test_per_frame_autoencoder_codes_each_frame_alone():
  """temporal_kernel=1, time_compression=1, no norms: latent frame j is a function of frame j
  only (and decoded frame j of latent j only), so a video's latents are its frames' latents as
  images, and chunked coding needs no context."""
  model = _model(time_compression=1, temporal_kernel=1, norm=False)
  assert model.compression == (1, 2, 2)
  assert model.temporal_lookback() == (0, 1)  # the decoder's 1: latent-group rounding only
  params = _init(model, (1, 4, 16, 16, 3))
  assert not any(
    "LayerNorm" in "/".join(map(str, k)) for k in jax.tree_util.tree_flatten_with_path(params)[0]
  )
  video = _video((2, 6, 16, 16, 3))
  mean, _ = model.apply(params, video, method=model.encode)
  assert mean.shape == (2, 6, 8, 8, 4)
  bumped = video.copy()
  bumped[:, 3] += 0.5  # one frame changed: only its latent moves
  m2, _ = model.apply(params, bumped, method=model.encode)
  changed = np.abs(m2 - mean).max(axis=(0, 2, 3, 4))
  assert changed[3] > 1e-4 and np.all(np.delete(changed, 3) == 0)
  frames = model.apply(params, video.reshape(12, 1, 16, 16, 3), method=model.encode)[0]
  np.testing.assert_allclose(frames.reshape(mean.shape), mean, atol=1e-5)
  out = model.apply(params, mean, method=model.decode)
  out2 = model.apply(params, mean.at[:, 2].add(0.5), method=model.decode)
  moved = np.abs(out2 - out).max(axis=(0, 2, 3, 4))
  assert moved[2] > 1e-4 and np.all(np.delete(moved, 2) == 0)
  np.testing.assert_allclose(tiling.encode(model, params, video, chunk=2)[0], mean, atol=1e-5)
  np.testing.assert_allclose(tiling.decode(model, params, mean, chunk=2), out, atol=1e-5)
  with pytest.raises(ValueError, match="temporal_kernel=1 .* only with time_compression=1"):
    _init(_model(time_compression=2, temporal_kernel=1), (1, 5, 16, 16, 3))


@pytest.fixture(scope="module")
def trained():
  """A tiny VAE fitted for 60 steps to 8 smooth synthetic clips through the task's loss."""
  model = _model(channels=(8, 16), latent_channels=4)
  config = configs.load("tiny", "configs/vae/video.py")
  params = _init(model, (1, 5, 16, 16, 3))["params"]
  task = ae_task.AutoencoderTask()
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, video, rng):
    batch = {"video": video, "valid": jnp.ones(video.shape[0], bool)}
    grads = jax.grad(lambda p: task.loss(model, p, batch, rng, config)[0])(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  video = smooth_video(8, 5, 16, seed=0)
  for i in range(60):
    params, opt = step(params, opt, video, jax.random.key(i))
  return model, {"params": params}


def test_training_reconstructs_smooth_video(trained):
  model, params = trained
  video = smooth_video(8, 5, 16, seed=0)
  recon, _, _ = model.apply(params, video)
  before, _, _ = model.apply(_init(model, (1, 5, 16, 16, 3)), video)
  to01 = lambda x: (np.clip(x, -1, 1) + 1) / 2
  trained_psnr = float(np.mean(ae_task.psnr(to01(video), to01(recon))))
  untrained_psnr = float(np.mean(ae_task.psnr(to01(video), to01(before))))
  print(f"PSNR after 60 steps {trained_psnr:.2f} dB (untrained {untrained_psnr:.2f} dB)")
  assert trained_psnr > 18.0 and trained_psnr > untrained_psnr + 8.0, (trained_psnr, untrained_psnr)


def test_tiled_coding_is_close_to_whole(trained):
  """Overlapping tiles, blended: close to the untiled result; closer with more overlap."""
  model, params = trained
  video = smooth_video(1, 5, 48, seed=7)
  mean, _ = tiling.encode(model, params, video)
  whole = tiling.decode(model, params, mean)
  to01 = lambda x: (np.clip(x, -1, 1) + 1) / 2
  agreement = {}
  for overlap in (8, 16):
    tiled = tiling.decode(model, params, mean, tile=(32, 32), overlap=overlap, chunk=1)
    agreement[overlap] = float(ae_task.psnr(to01(whole), to01(tiled))[0])
  tiled_mean, _ = tiling.encode(model, params, video, tile=(32, 32), overlap=16)
  enc_err = np.abs(tiled_mean - mean).max() / np.abs(mean).max()
  assert agreement[16] > 35.0 and agreement[16] >= agreement[8] - 0.5, agreement
  assert enc_err < 0.1, enc_err
  with pytest.raises(ValueError, match="multiples of the spatial compression 2"):
    tiling.decode(model, params, mean, tile=(31, 32))


def test_ssim_matches_skimage_and_its_properties():
  metrics = pytest.importorskip("skimage.metrics")
  r = np.random.default_rng(0)
  a = r.uniform(0, 1, (2, 24, 20, 3)).astype(np.float32)
  b = np.clip(a + r.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
  got = np.asarray(ae_task.ssim(jnp.asarray(a), jnp.asarray(b)))
  want = [
    metrics.structural_similarity(
      x, y, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False,
    )
    for x, y in zip(a, b)
  ]  # fmt: skip
  np.testing.assert_allclose(got, want, atol=2e-4)
  np.testing.assert_allclose(ae_task.ssim(jnp.asarray(a), jnp.asarray(a)), 1.0, atol=1e-5)
  assert float(ae_task.psnr(jnp.zeros((1, 4)), jnp.full((1, 4), 0.1))[0]) == pytest.approx(20.0)


def test_latent_stats_normalise_and_invert():
  r = np.random.default_rng(0)
  z = (r.normal(size=(1000, 4)) * [0.5, 2.0, 3.0, 0.1] + [1.0, -2.0, 0.0, 5.0]).astype(np.float32)
  stats = ae.LatentStats.from_moments(
    len(z), z.astype(np.float64).sum(0), (z.astype(np.float64) ** 2).sum(0)
  )
  normal = stats.normalize(z)
  np.testing.assert_allclose(normal.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(normal.std(0), 1.0, atol=1e-5)
  np.testing.assert_allclose(stats.denormalize(normal), z, rtol=1e-6, atol=1e-6)
  again = ae.LatentStats.from_json(stats.to_json())  # stored exactly (float32 round-trips)
  np.testing.assert_array_equal(again.shift, stats.shift)
  np.testing.assert_array_equal(again.scale, stats.scale)
  ident = ae.IdentityAutoencoder()
  video = _video((1, 3, 4, 4, 3))
  np.testing.assert_array_equal(ident.decode(ident.encode(video)[0]), video)


def _config(**overrides):
  return configs.override(configs.load("tiny", "configs/vae/video.py"), **overrides)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"input.size": (6, 32, 32)}, r"input.size T=6 frames: expected 1 \+ 2·n"),
    ({"input.size": (5, 30, 32)}, "input.size H=30 is not a multiple of the spatial compression 4"),
    ({"model.time_compression": 8}, "time_compression=8 must be a power of two ≤"),
    ({"model.time_compression": 3}, "time_compression=3 must be a power of two"),
    ({"model.temporal_kernel": 1}, "temporal_kernel=1 must be ≥ 1, and 1 .per-frame. only with"),
    ({"loss.recon": "l3"}, "loss.recon"),
    ({"loss.kl_weight": -1.0}, "loss.kl_weight=-1.0 must be >= 0"),
    ({"model.name": "vit"}, "model.name"),
    (
      {"mesh.tensor": 8, "mesh.data": 1, "model.channels": (12, 24, 36)},
      r"model.channels=\(12, 24, 36\): \[12, 36\] not divisible by the mesh's tensor=8",
    ),
  ],
)
def test_config_errors(overrides, message):
  c = _config(**overrides)
  with pytest.raises(config_checks.ConfigError, match=message):
    train.validate(c, num_devices=8, num_processes=1)


@pytest.mark.slow
def test_tiny_config_trains_through_main(data_dir, tmp_path):
  """`python -m vdit.main` on the tiny config (shrunk): trains, evaluates PSNR/SSIM over the
  validation split and stores the latent statistics next to the checkpoint."""
  workdir = str(tmp_path / "vae")
  env = {**os.environ, "VDIT_DATA_DIR": data_dir}
  out = subprocess.run(
    [
      sys.executable, "-m", "vdit.main", "--config=configs/vae/video.py:tiny",
      f"--workdir={workdir}", "--config.total_steps=4", "--config.log_every_steps=2",
      "--config.input.size=(1, 16, 16)", "--config.model.channels=(8, 8, 8)",
    ],
    capture_output=True, text=True, cwd=configs.REPO, timeout=600, env=env,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  assert "validation PSNR" in out.stdout
  with open(os.path.join(workdir, "eval", "4.json")) as f:
    results = json.load(f)["autoencoder"]
  assert results["examples"] > 100 and 5.0 < results["psnr"] < 60.0 and 0.0 < results["ssim"] <= 1.0
  assert "psnr_later_frames" not in results  # 1-frame clips (images) have no later frames
  stats = ae_task.load_stats(workdir)
  np.testing.assert_allclose(stats.shift, results["latent_mean"], rtol=1e-6)
  assert stats.scale.shape == (8,) and np.all(stats.scale > 0)
  assert os.path.exists(os.path.join(workdir, "checkpoints", "4"))
  # The latent path: the trained codec from the workdir, normalised latents, a dataset encoded.
  codec = latent_codec.load(workdir)
  assert codec.compression == (2, 4, 4) and codec.channels == 8
  video = _video((1, 5, 16, 16, 3))
  z = codec.encode(video)
  model, variables = codec.model, codec.variables
  mean, _ = model.apply(variables, video, method=model.encode)
  np.testing.assert_allclose(z, stats.normalize(np.asarray(mean)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    codec.decode(z), model.apply(variables, mean, method=model.decode), atol=1e-4
  )
  # A dataset encoded in groups (one size and time bucket per call, batches filled by repeats)
  # gives each example's own latents: the end padding in time is exact by causality.
  out = str(tmp_path / "latents")
  meta = encode_latents.encode_dataset(
    codec, "shapes", "validation", out, data_dir=data_dir, max_examples=5, batch_size=2
  )
  assert meta["examples"] == 5 and meta["skipped"] == 0 and meta["channels"] == 8
  assert meta["autoencoder"] == workdir and meta["compression"] == [2, 4, 4]
  assert len(datasets.data_source("latents", "validation", config=out)) == 5
  source = datasets.data_source("shapes", "validation", data_dir=data_dir, config="tiny")
  groups = set()
  for r in (records.Source(out, "latents")[i] for i in range(5)):
    video = media.from_uint8(
      encode_latents.fit_to_compression(source[r["index"]]["video"], (2, 4, 4))
    )
    n = 1 + (len(video) - 1) // 2
    groups.add((*video.shape[1:3], encode_latents.time_bucket(n)))
    assert r["latents"].shape == (n, *(s // 4 for s in video.shape[1:3]), 8)
    np.testing.assert_allclose(r["latents"], codec.encode(video[None])[0], atol=2e-4)
  assert meta["compilations"] == len(groups)


def test_per_frame_codec_encodes_a_dataset_frames_at_a_time(data_dir, tmp_path):
  """A per-frame codec encodes frames of many videos in one call (one compilation per frame
  size); each example still gets exactly its own video's latents."""
  model = _model(time_compression=1, temporal_kernel=1, norm=False)
  codec = latent_codec.Codec(model, _init(model, (1, 1, 16, 16, 3)), ae.LatentStats.identity(4))
  assert encode_latents.is_per_frame(codec) and not encode_latents.is_per_frame(
    latent_codec.Codec.identity()
  )
  out = str(tmp_path / "latents")
  meta = encode_latents.encode_dataset(
    codec, "shapes", "validation", out, data_dir=data_dir, max_examples=6, batch_size=1
  )
  assert meta["examples"] == 6 and meta["compression"] == [1, 2, 2]
  source = datasets.data_source("shapes", "validation", data_dir=data_dir, config="tiny")
  sizes = set()
  for r in (records.Source(out, "latents")[i] for i in range(6)):
    video = media.from_uint8(
      encode_latents.fit_to_compression(source[r["index"]]["video"], (1, 2, 2))
    )
    sizes.add(video.shape[1:3])
    np.testing.assert_allclose(r["latents"], codec.encode(video[None])[0], atol=1e-5)
  assert meta["compilations"] == len(sizes)


def test_frames_config_is_the_per_frame_autoencoder():
  """`:tiny,frames` (the latent demo's autoencoder) validates and builds a per-frame model."""
  c = configs.load("tiny,frames", "configs/vae/video.py")
  train.validate(c, num_devices=8, num_processes=1)
  model = ae_task.AutoencoderTask().build_model(c)
  assert model.compression == (1, 4, 4) and model.temporal_lookback()[0] == 0
  assert c.input.mixture == (("shapes", "tiny", 1.0),)
  assert c.input.size == (4, 32, 32) and c.loss.kl_weight == 0 and c.total_steps == 800
