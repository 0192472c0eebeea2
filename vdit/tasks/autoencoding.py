"""The video autoencoder (`vdit/models/autoencoder.py`) on fixed-size clips.

Batches are the fixed-size clips of `vdit.data.dense` (`input.size = (T, H, W)` with
T = 1 + ft·n and H, W multiples of fs; a mixture of video and image datasets is cropped and
resized to that one size, a short clip repeating its last frame). The loss is the
reconstruction error (`loss.recon`: "l1" or "mse", the mean over pixels and channels of a
posterior sample's decoding) + `loss.kl_weight` · KL(q(z|x) ‖ N(0, I)) averaged over latent
elements, both averaged over the valid rows.

The `reconstruction` evaluator (`vdit/evaluators/reconstruction.py`, with `predict_fns`'
`reconstruct`) codes the whole validation split with the posterior mean and reports PSNR (dB, on
[0, 1] pixels, per clip, then averaged) and SSIM (`ssim` below, per frame, then averaged), and
the per-channel mean/std of the latents, written to workdir/eval/<step>.json and, as the
`LatentStats` that latent consumers normalise with, to workdir/latent_stats.json (`STATS_FILE`).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vdit import config_checks
from vdit.data import patchify
from vdit.models import autoencoder as ae
from vdit.tasks import base, representation

SHOWN = 4  # validation clips the `reconstruction` evaluator draws above their reconstructions

RECON_LOSSES = ("l1", "mse")
STATS_FILE = "latent_stats.json"


# ---------------------------------------------------------------------------------------------
# Metrics (pure functions).
# ---------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter(x: jax.Array, g: np.ndarray) -> jax.Array:
  """Separable 'valid' filtering of [N, H, W, C] by the 1-D window g along H and W."""
  k = len(g)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(float(g[i]) * x[:, i : i + h] for i in range(k))
  return sum(float(g[i]) * x[:, :, i : i + w] for i in range(k))


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 1.0, sigma: float = 1.5) -> jax.Array:
  """Structural similarity of images [N, H, W, C] → [N] (Wang et al. 2004, Eq. 13).

  Local statistics under an 11-tap Gaussian window (σ = 1.5; shrunk to the largest odd size
  ≤ min(H, W) for small frames), population (not sample) covariances, K1 = 0.01, K2 = 0.03,
  'valid' positions only, averaged over positions and channels. This is skimage's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
  """
  size = min(11, a.shape[1], a.shape[2])
  size -= 1 - size % 2
  g = gaussian_window(size, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  mu_a, mu_b = _filter(a, g), _filter(b, g)
  var_a = _filter(a * a, g) - mu_a**2
  var_b = _filter(b * b, g) - mu_b**2
  cov = _filter(a * b, g) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB of [N, ...] arrays → [N]."""
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10))


# ---------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------
class AutoencoderTask(base.DenseTask):
  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    m = config.model
    config_checks.choice("model.name (task autoencoder)", m.name, ("vae",))
    config_checks.check_input(config, dense=True)
    channels = tuple(m.channels)
    if not channels:
      raise config_checks.ConfigError("model.channels=() needs at least one level")
    for name, value in (
      ("latent_channels", m.latent_channels),
      ("num_res_blocks", m.num_res_blocks),
    ):
      config_checks.positive(f"model.{name}", value)
    try:
      ae.check_compression(channels, m.time_compression, m.get("temporal_kernel", 3))
    except ValueError as e:
      raise config_checks.ConfigError(f"model.{e}") from None
    ft, fs = int(m.time_compression), 2 ** (len(channels) - 1)
    t, h, w = (int(s) for s in config.input.size)
    if (t - 1) % ft:
      raise config_checks.ConfigError(
        f"input.size T={t} frames: expected 1 + {ft}·n (the first frame is encoded alone, then "
        f"groups of model.time_compression={ft}), e.g. {1 + ft * max(1, (t - 1) // ft)}"
      )
    for name, size in (("H", h), ("W", w)):
      if size % fs:
        raise config_checks.ConfigError(
          f"input.size {name}={size} is not a multiple of the spatial compression {fs} "
          f"(2^(len(model.channels) − 1), channels={channels})"
        )
    for axis in ("fsdp", "tensor"):
      bad = [c for c in channels if c % mesh_shape[axis]]
      if bad:
        raise config_checks.ConfigError(
          f"model.channels={channels}: {bad} not divisible by the mesh's {axis}="
          f"{mesh_shape[axis]} (conv kernels shard their channels over it)"
        )
    loss = config.loss
    config_checks.choice("loss.recon", loss.recon, RECON_LOSSES)
    if not loss.kl_weight >= 0:
      raise config_checks.ConfigError(f"loss.kl_weight={loss.kl_weight} must be >= 0")
    encoder = loss.get("align_encoder", "")
    if bool(encoder) != bool(m.get("align_dim", 0)):
      raise config_checks.ConfigError(
        f"loss.align_encoder={encoder!r} and model.align_dim={m.get('align_dim', 0)}: give both "
        "(the encoder's width) or neither"
      )
    if encoder:
      _, width, enc = representation.checked_encoder(encoder, "loss.align_encoder")
      want = (m.get("align_frames", 2) * int(m.time_compression), 2 ** (len(channels) - 1))
      if tuple(enc.input.patch_size) != (want[0], want[1], want[1]) or width != m.align_dim:
        raise config_checks.ConfigError(
          f"loss.align_encoder={encoder!r} reads {tuple(enc.input.patch_size)} patches of "
          f"width {width}; expected ({want[0]}, {want[1]}, {want[1]}) (one latent block) and "
          f"model.align_dim={m.align_dim}"
        )

  def dummy_inputs(self, config):
    t, h, w = (int(s) for s in config.input.size)
    return (jnp.zeros((1, t, h, w, 3), jnp.float32),)

  def loss(self, model, params, batch, rng, config):
    video, valid = batch["video"], batch["valid"].astype(jnp.float32)  # [B, T, H, W, 3], [B]
    encoder = config.loss.get("align_encoder", "")
    if encoder:
      (recon, mean, logvar), sown = model.apply(
        {"params": params}, video, rng, mutable=["intermediates"]
      )
    else:
      recon, mean, logvar = model.apply({"params": params}, video, rng)
    err = recon - video
    err = jnp.abs(err) if config.loss.recon == "l1" else jnp.square(err)
    axes = tuple(range(1, video.ndim))
    rec = jnp.mean(err, axis=axes)  # [B]
    kl = jnp.mean(ae.kl_divergence(mean, logvar), axis=axes)  # [B]
    count = jnp.maximum(jnp.sum(valid), 1.0)
    rec, kl = jnp.sum(rec * valid) / count, jnp.sum(kl * valid) / count
    loss, metrics = rec + config.loss.kl_weight * kl, {"recon": rec, "kl": kl}
    if encoder:  # VA-VAE: the latent blocks' projection towards the encoder's features
      projected = sown["intermediates"]["align"][0]  # [B, T'', H', W', E]
      target = encoder_features(encoder, video, projected.shape[1:4])
      align = representation.structure_loss(
        projected.reshape(projected.shape[0], -1, projected.shape[-1]),
        target,
        tuple(config.loss.get("align_margins", (0.5, 0.25))),
      )
      loss, metrics["align"] = loss + config.loss.align_weight * align, align
    return loss, metrics

  def predict_fns(self, config, model, mesh, rules) -> base.PredictFns:
    """`reconstruct(params, batch)` → per clip of the global batch (the `reconstruction`
    evaluator): PSNR and SSIM of the posterior mean's decoding on [0, 1] pixels, the sums of
    the latents and their squares per channel, the MSE of the frames after the first and of
    repeating frame 0 there, `valid`, the decoding of the first `SHOWN` clips (`recon`; not
    the whole batch, which every host would receive at every batch); `positions`: latent
    positions per clip."""

    def reconstruct(params, batch):
      video = batch["video"]
      mean, _ = model.apply({"params": params}, video, method=model.encode)
      recon = jnp.clip(model.apply({"params": params}, mean, method=model.decode), -1.0, 1.0)
      a, b = (video + 1) / 2, (recon + 1) / 2
      bsz, t = video.shape[:2]
      frames = ssim(a.reshape(bsz * t, *a.shape[2:]), b.reshape(bsz * t, *b.shape[2:]))
      # Frames after the first: the reconstruction's error vs the error of repeating frame 0
      # (a VAE that ignores its later latents is no better than that copy).
      if t > 1:
        later = jnp.mean(jnp.square(a[:, 1:] - b[:, 1:]), axis=(1, 2, 3, 4))
        copy = jnp.mean(jnp.square(a[:, 1:] - a[:, :1]), axis=(1, 2, 3, 4))
      else:  # images: no later frames
        later = copy = jnp.zeros((bsz,))
      return {
        "psnr": psnr(a, b),
        "ssim": frames.reshape(bsz, t).mean(1),
        "sum_z": jnp.sum(mean, axis=(1, 2, 3)),
        "sum_z2": jnp.sum(jnp.square(mean), axis=(1, 2, 3)),
        "mse_later": later,
        "mse_copy": copy,
        "valid": batch["valid"],
        "recon": recon[:SHOWN],
        "positions": jnp.asarray(np.prod(mean.shape[1:-1]), jnp.int32),
      }

    keys = self.batch_keys(config)
    return super().predict_fns(config, model, mesh, rules) | {
      "reconstruct": base.on_global_batch(reconstruct, keys, mesh, rules)
    }


def encoder_features(workdir: str, video: jax.Array, grid) -> jax.Array:
  """[B, N, E] features of the frozen encoder of the captioning run in `workdir` for clips
  [B, T, H, W, 3], each one packed row of its (pt, ph, pw) patches; their grid must be `grid`."""
  features, _, config = representation.encoder(workdir, "loss.align_encoder")
  pt = int(config.input.patch_size[0])  # whole patches in time (the latent blocks' frames)
  patches, positions, got = patchify.patchify(
    video[:, : video.shape[1] // pt * pt], config.input.patch_size
  )
  if tuple(got) != tuple(grid):
    raise ValueError(f"the encoder's token grid {got} is not the latent blocks' {tuple(grid)}")
  b, n = patches.shape[:2]
  positions = jnp.broadcast_to(jnp.asarray(positions), (b, n, 3))
  return features(patches, positions, jnp.ones((b, n), jnp.int32))


def load_stats(workdir: str) -> ae.LatentStats:
  """The latent statistics an autoencoder run wrote (the `reconstruction` evaluator)."""
  path = epath.Path(workdir) / STATS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: run the autoencoder's evaluation first")
  return ae.LatentStats.from_json(path.read_text())
