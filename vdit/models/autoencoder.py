"""VideoAutoencoder: a causal 3-D convolutional VAE (the latent space of the video models).

The design of the causal video VAEs (MAGVIT-v2, Yu et al. 2023, Sec. 3.1; CogVideoX, Yang et al.
2024, Sec. 2.1; Cosmos tokenizer, NVIDIA 2025), at small scale:

- Causal in time: every temporal convolution pads on the left only (with copies of the first
  frame), so latent frame j never depends on a later frame. Time is downsampled by strided
  causal convolutions, which makes the first frame a group of its own: T = 1 + ft·n frames →
  1 + n latent frames, latent j summarising frames (j−1)·ft+1 … j·ft. An image is a 1-frame
  video (→ 1 latent frame), so images and videos share one model and one latent space.
- Compression (ft, fs, fs): fs = 2^(len(channels) − 1) (one stride-2 stage between levels),
  ft a power of two ≤ fs (time is strided in the last log2(ft) stages, at low resolution).
- Norms are per position (LayerNorm over channels), not GroupNorm: a statistic over time would
  break causality and one over space would make a tile's latents depend on the whole frame, so
  chunked/tiled encoding (`vdit/models/tiling.py`) is exact (time) or local (space). A final
  norm before each output conv (as LDM's) mattered: without it the tiny run did not learn (L1
  stuck at 0.56 over 50 steps, against 0.29 with it).
- A diagonal Gaussian posterior (Kingma & Welling 2014): `encode` gives (mean, logvar);
  training samples it and adds β·KL (`vdit/tasks/autoencoding.py`); latent consumers use the
  mean, normalised by per-channel `LatentStats` computed from data.

Shapes: video [B, T, H, W, 3] in [-1, 1]; latents [B, T', H', W', Z] with T' = 1 + (T−1)/ft,
H' = H/fs, W' = W/fs. Images [B, H, W, 3] ↔ [B, H', W', Z].
"""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.axes import BATCH, EMBED, MLP
from vdit.models import layers

# Logical axes of a conv kernel [kt, kh, kw, C_in, C_out] (RGB / latent ends: unsharded).
CONV_AXES = (None, None, None, EMBED, MLP)
LOGVAR_RANGE = (-30.0, 20.0)  # clip of the posterior's log-variance (as LDM)
# Added to the encoder's log-variance output: the posterior starts narrow (σ ≈ 0.14, not 1), so
# early reconstructions are not drowned in sampling noise (2× faster to a given PSNR, tiny run).
LOGVAR_OFFSET = -4.0


def causal_pad(x: jax.Array, frames: int) -> jax.Array:
  """Prepends `frames` copies of the first frame. x: [B, T, H, W, C]."""
  if frames == 0:
    return x
  return jnp.concatenate([jnp.repeat(x[:, :1], frames, axis=1), x], axis=1)


class CausalConv3d(nn.Module):
  """A 3-D convolution, causal in time (left padding with the first frame), 'same' in space.

  With kernel kt and stride st in time, T = 1 + st·n frames give 1 + n outputs; output j sees
  frames j·st − (kt−1) … j·st, so output 0 sees frame 0 alone.
  """

  features: int
  kernel: tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  axes: tuple = CONV_AXES
  zero_init: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [B, T, H, W, C]
    kt, kh, kw = self.kernel
    init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.lecun_normal()
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, self.axes),
      (kt, kh, kw, x.shape[-1], self.features),
      self.param_dtype,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[-1:]),
      (self.features,),
      self.param_dtype,
    )
    x, kernel, bias = nn.dtypes.promote_dtype(causal_pad(x, kt - 1), kernel, bias, dtype=self.dtype)
    # As one 2-D convolution over frames whose channels stack the kt time taps: the same
    # function as a 3-D convolution, ~6× less CPU time with XLA:CPU (oneDNN's 2-D path).
    st, sh, sw = self.strides
    b, t = x.shape[:2]
    n = (t - kt) // st + 1  # output frames
    taps = [x[:, i : i + st * (n - 1) + 1 : st] for i in range(kt)]  # kt × [B, n, H, W, C]
    x = jnp.concatenate(taps, axis=-1).reshape(b * n, *x.shape[2:4], kt * x.shape[-1])
    kernel = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, -1, self.features)
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(sh, sw),
      padding=(((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y.reshape(b, n, *y.shape[1:])
    return y + bias


def channel_norm(name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the channels of each position (causal and local; see the module doc)."""
  return nn.LayerNorm(
    epsilon=1e-6,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (EMBED,)),
    name=name,
  )


def identity(x: jax.Array) -> jax.Array:
  return x


class ResBlock(nn.Module):
  """norm → SiLU → conv → norm → SiLU → conv (zero-init: the block starts as identity) + skip."""

  features: int
  temporal_kernel: int = 3
  norm: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = (self.temporal_kernel, 3, 3)
    norm = channel_norm if self.norm else lambda: identity
    h = CausalConv3d(self.features, kernel)(nn.silu(norm()(x)))
    h = CausalConv3d(self.features, kernel, zero_init=True)(nn.silu(norm()(h)))
    if x.shape[-1] != self.features:
      x = CausalConv3d(self.features, kernel=(1, 1, 1))(x)
    return x + h


def upsample(x: jax.Array, time: bool) -> jax.Array:
  """Nearest ×2 in space and, if `time`, ×2 in time minus the first copy (1 + n → 1 + 2n
  frames: latent 0 stays one frame, so the decoder inverts the encoder's grouping)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
  return jnp.repeat(x, 2, axis=1)[:, 1:] if time else x


class VideoAutoencoder(nn.Module):
  """Causal 3-D conv VAE: video [B, T, H, W, 3] ↔ latents [B, 1 + (T−1)/ft, H/fs, W/fs, Z]."""

  channels: tuple[int, ...] = (128, 256, 512, 512)  # per level; fs = 2^(levels − 1)
  time_compression: int = 4  # ft: a power of two, at most fs
  latent_channels: int = 16  # Z
  num_res_blocks: int = 2  # per level, in the encoder and the decoder
  # kt of every conv. 1 with time_compression 1: a per-frame 2-D autoencoder (each latent frame
  # codes its own frame; the demo's, which learns ~10 dB faster: docs/recipe.md, rows L).
  temporal_kernel: int = 3
  norm: bool = True  # per-position LayerNorms before the convolutions (off: the per-frame demo's)
  # > 0: a linear map of the posterior mean, each (align_frames, 1, 1) block of latent cells
  # to `align_dim` features, sown as ("intermediates", "align") by `__call__`: the training
  # loss aligns them to a frozen encoder's features of the clip (VA-VAE, Yao et al. 2025;
  # `vdit.tasks.autoencoding`). Coding never reads them.
  align_dim: int = 0
  align_frames: int = 2

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.channels) - 1)

  @property
  def compression(self) -> tuple[int, int, int]:
    """(ft, fs, fs)."""
    return (self.time_compression, self.spatial_compression, self.spatial_compression)

  def _time_stages(self) -> list[bool]:
    """Whether each of the len(channels) − 1 downsampling stages also strides time."""
    stages = len(self.channels) - 1
    n = int(round(math.log2(self.time_compression)))
    return [i >= stages - n for i in range(stages)]

  def setup(self):
    check_compression(self.channels, self.time_compression, self.temporal_kernel)
    ch, z = self.channels, self.latent_channels
    time = self._time_stages()
    k = (self.temporal_kernel, 3, 3)
    res = lambda c: ResBlock(c, self.temporal_kernel, self.norm)  # noqa: E731
    norm = channel_norm if self.norm else lambda: identity
    # Encoder.
    self.enc_in = CausalConv3d(ch[0], k, axes=(None, None, None, None, MLP))
    self.enc_blocks = [[res(c) for _ in range(self.num_res_blocks)] for c in ch]
    self.enc_down = [CausalConv3d(c, k, strides=(2 if t else 1, 2, 2)) for c, t in zip(ch, time)]
    self.enc_mid = res(ch[-1])
    self.enc_norm = norm()
    self.enc_out = CausalConv3d(2 * z, k, axes=(None, None, None, EMBED, None))
    # Decoder (mirror).
    self.dec_in = CausalConv3d(ch[-1], k, axes=(None, None, None, None, MLP))
    self.dec_mid = res(ch[-1])
    self.dec_blocks = [[res(c) for _ in range(self.num_res_blocks)] for c in ch]
    self.dec_up = [CausalConv3d(c, k) for c in ch[:-1]]
    self.dec_norm = norm()
    self.dec_out = CausalConv3d(3, k, axes=(None, None, None, EMBED, None))
    if self.align_dim:
      self.align_proj = layers.dense(self.align_dim, (None, None))

  def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, logvar) [B, T', H', W', Z] of video [B, T, H, W, 3] (or images
    [B, H, W, 3] → [B, H', W', Z])."""
    image = video.ndim == 4
    x = video[:, None] if image else video
    check_video_shape(x.shape, self.compression)
    x = nn.with_logical_constraint(x, (BATCH, None, None, None, None))
    x = self.enc_in(x)
    for level, blocks in enumerate(self.enc_blocks):
      for block in blocks:
        x = block(x)
      if level < len(self.enc_down):
        x = self.enc_down[level](x)
    x = self.enc_out(nn.silu(self.enc_norm(self.enc_mid(x))))
    mean, logvar = jnp.split(x, 2, axis=-1)
    logvar = jnp.clip(logvar + LOGVAR_OFFSET, *LOGVAR_RANGE)
    return (mean[:, 0], logvar[:, 0]) if image else (mean, logvar)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents [B, T', H', W', Z] → video [B, 1 + ft·(T'−1), fs·H', fs·W', 3] (or images)."""
    image = z.ndim == 4
    x = z[:, None] if image else z
    x = nn.with_logical_constraint(x, (BATCH, None, None, None, None))
    x = self.dec_mid(self.dec_in(x))
    time = self._time_stages()
    for level in reversed(range(len(self.channels))):
      for block in self.dec_blocks[level]:
        x = block(x)
      if level > 0:
        x = self.dec_up[level - 1](upsample(x, time[level - 1]))
    x = self.dec_out(nn.silu(self.dec_norm(x)))
    return x[:, 0] if image else x

  def __call__(self, video: jax.Array, rng: jax.Array | None = None):
    """(reconstruction, mean, logvar); the latent is a posterior sample if `rng` is given, else
    the mean."""
    mean, logvar = self.encode(video)
    if self.align_dim:  # [B, T'/a, H', W', align_dim]
      b, t, h, w, z = mean.shape
      a = self.align_frames
      blocks = mean[:, : t // a * a].reshape(b, t // a, a, h, w, z)
      blocks = blocks.transpose(0, 1, 3, 4, 2, 5).reshape(b, t // a, h, w, a * z)
      self.sow("intermediates", "align", self.align_proj(blocks))
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return self.decode(z), mean, logvar

  def temporal_lookback(self) -> tuple[int, int]:
    """(encoder look-back in input frames, decoder look-back in output frames): how far into
    the past a causal output can see, the context that makes chunked coding exact."""
    # k = kt − 1: the frames of look-back of every conv (0 for a per-frame autoencoder).
    ft, time, k = self.time_compression, self._time_stages(), self.temporal_kernel - 1
    enc, r = k, 1  # enc_in
    for level in range(len(self.channels)):
      enc += 2 * k * r * self.num_res_blocks
      if level < len(time):
        enc += k * r
        r *= 2 if time[level] else 1
    enc += 2 * k * r + k * r  # mid block, enc_out
    dec = k * ft + 2 * k * ft + ft  # dec_in, mid, +ft for latent-group rounding
    r = ft
    for level in reversed(range(len(self.channels))):
      dec += 2 * k * r * self.num_res_blocks
      if level > 0:
        r //= 2 if time[level - 1] else 1
        dec += k * r
    return enc, dec + k  # + dec_out


class IdentityAutoencoder:
  """Pixel space (compression (1, 1, 1), 3 "latent" channels): the same interface, no params."""

  compression = (1, 1, 1)
  latent_channels = 3

  def encode(self, video):
    return video, jnp.full_like(video, LOGVAR_RANGE[0])

  def decode(self, z):
    return z


def sample_posterior(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, e^logvar) ‖ N(0, 1)) per latent element (Kingma & Welling 2014, App. B)."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def check_compression(channels, time_compression: int, temporal_kernel: int = 3) -> None:
  stages = len(channels) - 1
  ft = int(time_compression)
  if ft < 1 or ft & (ft - 1) or ft > 2**stages:
    raise ValueError(
      f"time_compression={ft} must be a power of two ≤ the spatial compression "
      f"2^(len(channels) − 1) = {2**stages} (time is strided in the spatial stages)"
    )
  if temporal_kernel < 1 or (temporal_kernel == 1 and ft != 1):
    raise ValueError(
      f"temporal_kernel={temporal_kernel} must be ≥ 1, and 1 (per-frame) only with "
      f"time_compression=1 (got {ft}): frames are grouped only by temporal convolutions"
    )


def check_video_shape(shape, compression) -> None:
  """T = 1 + ft·n frames and H, W multiples of fs (`ValueError` naming the bad size)."""
  _, t, h, w, _ = shape
  ft, fs, _ = compression
  if (t - 1) % ft:
    raise ValueError(f"frames T={t}: expected 1 + {ft}·n (the first frame is encoded alone)")
  for name, size in (("height", h), ("width", w)):
    if size % fs:
      raise ValueError(f"{name}={size} is not a multiple of the spatial compression {fs}")


# ---------------------------------------------------------------------------------------------
# Latent statistics: per-channel shift/scale so diffusion sees zero-mean, unit-variance latents.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LatentStats:
  """z_normalised = (z − shift) / scale, per latent channel; `denormalize` is the inverse."""

  shift: np.ndarray  # [Z] mean of the posterior means over data
  scale: np.ndarray  # [Z] their standard deviation

  @classmethod
  def identity(cls, channels: int) -> "LatentStats":
    return cls(np.zeros(channels, np.float32), np.ones(channels, np.float32))

  @classmethod
  def from_moments(cls, count, total, total_sq) -> "LatentStats":
    """From the count, sum and sum of squares (float64) of latents per channel."""
    count = max(float(count), 1.0)
    mean = np.asarray(total, np.float64) / count
    var = np.maximum(np.asarray(total_sq, np.float64) / count - mean**2, 0.0)
    return cls(mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32))

  def normalize(self, z):
    return (z - self.shift) / self.scale

  def denormalize(self, z):
    return z * self.scale + self.shift

  def to_json(self) -> str:
    return json.dumps({"shift": self.shift.tolist(), "scale": self.scale.tolist()}, indent=2)

  @classmethod
  def from_json(cls, text: str) -> "LatentStats":
    d = json.loads(text)
    return cls(np.asarray(d["shift"], np.float32), np.asarray(d["scale"], np.float32))
