"""Inception-v3 for FID: the TF 2015-12-05 graph as ported by pytorch-fid (`fid_inception_v3`).

Architecture: Szegedy et al. 2016, "Rethinking the Inception Architecture" (Inception-v3), in
torchvision's module layout (`Inception3`: `Conv2d_1a_3x3` … `Mixed_7c`, each conv a
`BasicConv2d` = conv without bias → BatchNorm(ε=1e-3) → ReLU), with the FID graph's
differences that pytorch-fid reproduces in `FIDInceptionA/C/E_1/E_2`:

* the 3×3 average pools of Mixed_5b–d, 6b–e and 7b exclude the padding from their count;
* Mixed_7c pools its fourth branch with a 3×3 **max** pool (stride 1, padding 1).

Features: global average of Mixed_7c ("pool3"), [B, 2048]. The auxiliary classifier and the
1008-way `fc` head are not part of the FID network (`fc.*` keys in the file are ignored).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict, converted to
`.npz`/`.safetensors` (docs/evaluation.md). Input: uint8 frames, resized to 299×299 bilinearly
(`extractors.resize_to_unit`) and scaled to [-1, 1], as pytorch-fid's `resize_input=True,
normalize_input=True`.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.evaluators import extractors
from vdit.evaluators.extractors import torch_layout

SIZE = 299  # input side
FEATURES = 2048
EPS = 1e-3  # torchvision BasicConv2d BatchNorm2d(eps=0.001), the TF graph's ε
SOURCE = "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (Inception-v3 FID weights)"
FILE = "pt_inception-2015-12-05-6726825d.pth"
CONVERTED = "pt_inception-2015-12-05.npz"
IGNORE = ("fc.",)  # the 1008-way classifier head: in the file, not used for FID


class BasicConv(nn.Module):
  """torchvision `BasicConv2d`: conv (no bias) → BatchNorm (inference statistics) → ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: str = "SAME"  # "SAME" = torch's symmetric k//2 padding for the odd, stride-1 kernels

  @nn.compact
  def __call__(self, x):
    # x: [B, H, W, C]
    s = (self.strides, self.strides)
    x = nn.Conv(self.features, self.kernel, s, self.padding, use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) in FIDInception*.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):  # Mixed_5b–d (FIDInceptionA)
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a: grid 35 → 17
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), 2, "VALID", name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), 2, "VALID", name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b–e (FIDInceptionC): factorised 7×7 convolutions
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c, name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), name="branch7x7_3")(b7)
    bd = BasicConv(c, name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a: grid 17 → 8
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), 2, "VALID", name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), 2, "VALID", name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (FIDInceptionE_1, avg pool), 7c (FIDInceptionE_2, max)
  pool: str  # "avg" | "max"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3a = BasicConv(384, (1, 3), name="branch3x3_2a")(b3)
    b3b = BasicConv(384, (3, 1), name="branch3x3_2b")(b3)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), name="branch3x3dbl_2")(bd)
    bda = BasicConv(384, (1, 3), name="branch3x3dbl_3a")(bd)
    bdb = BasicConv(384, (3, 1), name="branch3x3dbl_3b")(bd)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)  # 320 + 768 + 768 + 192


class InceptionV3(nn.Module):
  """The FID Inception-v3 up to pool3: images [B, H, W, 3] in [-1, 1] -> features [B, 2048].

  Any H, W ≥ 75 runs (the pool is global); FID uses 299×299 (`extractor` resizes to it).
  """

  @nn.compact
  def __call__(self, x):
    if min(x.shape[-3:-1]) < 75:
      raise ValueError(f"Inception-v3 input {x.shape}: height and width must be ≥ 75 (FID: 299)")
    x = BasicConv(32, (3, 3), 2, "VALID", name="Conv2d_1a_3x3")(x)  # 299 → 149
    x = BasicConv(32, (3, 3), padding="VALID", name="Conv2d_2a_3x3")(x)  # → 147
    x = BasicConv(64, (3, 3), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # → 73
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), padding="VALID", name="Conv2d_4a_3x3")(x)  # → 71
    x = _max_pool_3x3_s2(x)  # → 35
    x = InceptionA(32, name="Mixed_5b")(x)  # 256 channels
    x = InceptionA(64, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, name="Mixed_5d")(x)  # 288
    x = InceptionB(name="Mixed_6a")(x)  # 768 @ 17×17
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)  # 1280 @ 8×8
    x = InceptionE("avg", name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(-3, -2))  # pool3: [B, 2048]


def template() -> dict:
  """The variables {"params", "batch_stats"} as shapes and dtypes (nothing is computed)."""
  init = lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  return jax.eval_shape(init)


def load(path: str) -> dict:
  """Variables from a converted pytorch-fid state dict (`.npz`/`.safetensors`), checked."""
  arrays = torch_layout.read(path)
  return torch_layout.import_variables(
    arrays, template(), source=path, net="Inception-v3 (FID)", ignore=IGNORE
  )


def export(variables: dict) -> dict[str, np.ndarray]:
  """Inverse of `load`: variables -> the pytorch-fid state dict (without `fc`)."""
  return torch_layout.export_arrays(variables)


@jax.jit
def forward(variables: dict, frames: jax.Array) -> jax.Array:
  """uint8 frames [B, H, W, 3] -> pool3 features [B, 2048] (resized to 299, in [-1, 1])."""
  return InceptionV3().apply(variables, extractors.resize_to_unit(frames, SIZE))


def extractor(weights: str | None = None, frames: str = "mean", batch_size: int = 16):
  """`frechet` extractor: uint8 videos [N, T, H, W, 3] -> [N, 2048].

  frames="mean": every frame's features, averaged per video; "middle": frame T // 2 only.
  """
  if frames not in ("mean", "middle"):
    raise ValueError(f"frames={frames!r} is unknown; expected 'mean' or 'middle'")
  if weights is None or not os.path.exists(weights):
    raise extractors.missing_weights("inception", weights, FILE, SOURCE, CONVERTED)
  variables = load(weights)

  def apply(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
      raise ValueError(f"videos {videos.shape}: expected uint8 [N, T, H, W, 3]")
    n, t = videos.shape[:2]
    if frames == "middle":
      return extractors.run_batched(forward, variables, videos[:, t // 2], batch_size)
    flat = videos.reshape(n * t, *videos.shape[2:])
    return extractors.run_batched(forward, variables, flat, batch_size).reshape(n, t, -1).mean(1)

  return apply
