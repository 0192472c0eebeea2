"""ViT: the Vision Transformer image classifier (Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"), and the pieces NaViT and ViViT share with it.

Images are cut into p×p patches with the data pipeline's `patchify` (patch vector in (ph, pw, C)
order), embedded by a Dense(P -> D) (the conv "embedding" of the reference, flattened), given a
learned (Sec. 3.1) or 2-D sin-cos position code, and encoded by pre-LN blocks (Eq. 2-3). The
head reads the class token (`pool="token"`, Eq. 4), the mean of the tokens (`"gap"`), or a
multihead attention-pooling probe (`"map"`, Zhai et al. 2022 "Scaling ViTs", Sec. 3.2). The head
is zero-initialized (as in big_vision). With `pool="token"` the position table covers the class
token too (1 + N rows), as in the reference checkpoints (google-research/vision_transformer,
timm), so ViT-B/16 at 224 with 1000 classes has the standard 86,567,656 parameters.

Parameter layout: `embedding`, [`cls`], [`pos_embedding`], `encoder/{blocks, norm}`,
[`map_head`], `head`. With `scan_layers=True` the blocks are one module with a leading [depth]
axis (LAYERS); `layers.unstack_layers(params, "blocks", depth)` gives `blocks_0 …`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdit.axes import BATCH, EMBED, LENGTH, PATCH
from vdit.data.patchify import patchify
from vdit.models import layers, posemb

# ViT sizes (Dosovitskiy et al., Table 1; "Ti" from Touvron et al. 2021 "DeiT"). MLP = 4·D.
VARIANTS = {
  "Ti": dict(width=192, depth=12, num_heads=3),
  "S": dict(width=384, depth=12, num_heads=6),
  "B": dict(width=768, depth=12, num_heads=12),
  "L": dict(width=1024, depth=24, num_heads=16),
  "H": dict(width=1280, depth=32, num_heads=16),
}
POOLS = ("token", "gap", "map")
POSEMBS = ("learn", "sincos2d")
# The fields a model of the ViT family (ViT, NaViT, ViViT, the text encoder) hands its blocks
# (`Block`) and its encoder (`Encoder`, `encoder_stack`; besides `depth`), by the same names.
BLOCK_FIELDS = ("num_heads", "mlp_ratio", "attention_backend", "dtype", "param_dtype")
ENCODER_FIELDS = (*BLOCK_FIELDS, "scan_layers", "remat_policy")


def decode_variant(variant: str) -> dict:
  """ "B/16" -> dict(width=768, depth=12, num_heads=12, patch_size=16); patches 8..32."""
  size, sep, patch = variant.partition("/")
  if size not in VARIANTS or not sep or not patch.isdigit() or not 8 <= int(patch) <= 32:
    raise ValueError(
      f"variant={variant!r} is not SIZE/PATCH with SIZE in {sorted(VARIANTS)} and PATCH in 8..32"
    )
  return dict(VARIANTS[size], patch_size=int(patch))


def classification_loss(
  logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean softmax cross-entropy over the valid examples, and metrics.

  logits: [B, C] or [B, K, C] (NaViT: per example of a packed row); labels: [B] or [B, K]
  int32 with −1 = no label (an empty slot); mask: like labels, bool, further restricts which
  examples count (None: all labelled ones). Returns (loss, {"loss", "accuracy", "count"}); a
  batch without valid examples gives loss 0 and accuracy 0, never NaN.
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(
      f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: expected "
      "logits [..., C] over labels [...]"
    )
  valid = labels >= 0
  if mask is not None:
    valid = jnp.logical_and(valid, mask)
  # Unlabelled slots read class 0 and are masked out below (optax's `where` masks classes).
  nll = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), jnp.maximum(labels, 0)
  )
  count = jnp.sum(valid)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(valid, nll, 0.0)) / denom
  correct = jnp.logical_and(valid, jnp.argmax(logits, axis=-1) == labels)
  accuracy = jnp.sum(correct) / denom
  return loss, {"loss": loss, "accuracy": accuracy, "count": count}


def options(model: nn.Module, fields: tuple[str, ...]) -> dict[str, Any]:
  """{field: value} of `model` for `fields` (BLOCK_FIELDS or ENCODER_FIELDS)."""
  return {f: getattr(model, f) for f in fields}


class Block(nn.Module):
  """The fields of a transformer block or attention head (BLOCK_FIELDS), for subclasses."""

  num_heads: int
  mlp_ratio: float = 4.0
  attention_backend: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class EncoderBlock(nn.Module):
  """Pre-LN transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (ViT, Eq. 2-3).

  `length_axis` is the logical axis of the sequence: LENGTH for patches, TEXT_LENGTH for the
  captions of the text encoder (`models/text.py`)."""

  num_heads: int
  mlp_ratio: float = 4.0
  attention_backend: str = "xla"
  length_axis: str = LENGTH
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids):
    # x: [B, L, D]; segment_ids: [B, L]. Returns (x, None) for nn.scan.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    axes = (BATCH, self.length_axis, EMBED)
    x = nn.with_logical_constraint(x, axes)
    h = layers.layer_norm(name="norm1", **kw)(x)
    x = x + layers.MultiHeadAttention(
      self.num_heads,
      backend=self.attention_backend,
      length_axis=self.length_axis,
      name="attn",
      **kw,
    )(h, segment_ids)
    h = layers.layer_norm(name="norm2", **kw)(x)
    x = x + layers.Mlp(self.mlp_ratio, length_axis=self.length_axis, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, axes), None


def encoder_stack(
  x: jax.Array,
  segment_ids: jax.Array,
  *,
  depth: int,
  num_heads: int,
  mlp_ratio: float,
  attention_backend: str,
  scan_layers: bool,
  remat_policy: str,
  length_axis: str = LENGTH,
  **kw,
) -> jax.Array:
  """`depth` EncoderBlocks (params "blocks", scanned or unrolled) and a final LayerNorm ("norm"),
  built in the scope of the calling compact module: `Encoder` and the text encoder share it."""
  if depth:
    stack = layers.stack_blocks(
      EncoderBlock,
      depth=depth,
      num_broadcast_args=1,
      scan=scan_layers,
      remat_policy=remat_policy,
    )
    x, _ = stack(
      "blocks",
      num_heads=num_heads,
      mlp_ratio=mlp_ratio,
      attention_backend=attention_backend,
      length_axis=length_axis,
      **kw,
    )(x, segment_ids)
  x = layers.layer_norm(name="norm", **kw)(x)
  return nn.with_logical_constraint(x, (BATCH, length_axis, EMBED))


class Encoder(layers.Runtime):
  """`depth` EncoderBlocks (scanned or unrolled) and a final LayerNorm."""

  depth: int
  num_heads: int
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x, segment_ids):
    # x: [B, L, D]; segment_ids: [B, L] -> [B, L, D]
    return encoder_stack(x, segment_ids, depth=self.depth, **options(self, ENCODER_FIELDS))


class MAPHead(Block):
  """Multihead attention pooling (Zhai et al. 2022, Sec. 3.2; big_vision `MAPHead`), per segment.

  K learned-probe queries, query k attending only to the tokens of segment k (NaViT, Sec. 3.1:
  pooling per example of a packed row), then x + MLP(LN(x)). An empty slot (no tokens) pools
  to a finite constant.
  """

  @nn.compact
  def __call__(self, x, segment_ids, num_queries: int = 1):
    # x: [B, L, D]; segment_ids: [B, L] (1..K; 0 = padding) -> [B, K, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, _, d = x.shape
    probe = self.param(
      "probe",
      nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, EMBED)),
      (1, 1, d),
      self.param_dtype,
    )
    queries = jnp.broadcast_to(probe.astype(x.dtype), (b, num_queries, d))
    query_ids = jnp.broadcast_to(jnp.arange(1, num_queries + 1, dtype=jnp.int32), (b, num_queries))
    h = layers.MultiHeadAttention(
      self.num_heads, backend=self.attention_backend, length_axis=None, name="attn", **kw
    )(queries, query_ids, x, segment_ids)
    y = layers.layer_norm(name="norm", **kw)(h)
    return h + layers.Mlp(self.mlp_ratio, length_axis=None, name="mlp", **kw)(y)


def class_head(num_classes: int, dtype, param_dtype) -> layers.Dense:
  """Zero-initialized Dense(D -> classes) (big_vision `head_zeroinit`)."""
  return layers.dense(
    num_classes, (EMBED, None), zero_init=True, dtype=dtype, param_dtype=param_dtype, name="head"
  )


def resample_posemb(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a learned position table [1, e + h·w, D] to `grid` (ViT, Sec. 3.2).

  A table of `ViT(pool="token")` starts with the class token's row (e = 1): it is kept as it
  is, and only the h×w grid rows are resized. Returns [1, e + grid_h·grid_w, D].
  """
  n, d = table.shape[1], table.shape[2]
  for extra in (0, 1):
    side = int(round(np.sqrt(n - extra)))
    if side * side == n - extra:
      break
  else:
    raise ValueError(
      f"position table of {n} rows is neither a square grid nor a class token and a square grid"
    )
  table = jnp.asarray(table)
  grid_rows = table[0, extra:].reshape(side, side, d)
  resized = jax.image.resize(grid_rows, (*grid, d), "bilinear").reshape(grid[0] * grid[1], d)
  return np.asarray(jnp.concatenate([table[0, :extra], resized])[None])


class ViT(layers.Runtime):
  """Images [B, H, W, C] -> logits [B, classes] (or pooled features [B, D] if num_classes=0)."""

  num_classes: int
  patch_size: int
  width: int  # D
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  pool: str = "token"  # see POOLS
  posemb: str = "learn"  # see POSEMBS

  @classmethod
  def from_variant(cls, variant: str, num_classes: int, **kwargs) -> "ViT":
    """ViT.from_variant("B/16", 1000): sizes from the ViT table."""
    return cls(num_classes=num_classes, **{**decode_variant(variant), **kwargs})

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r} is unknown; expected one of {POOLS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb={self.posemb!r} is unknown; expected one of {POSEMBS}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    patches, positions, grid = patchify(images[:, None], (1, p, p))  # [B, N, P]
    b, n, _ = patches.shape
    x = layers.dense(self.width, (PATCH, EMBED), name="embedding", **kw)(patches)  # [B, N, D]
    if self.posemb == "sincos2d":
      x = x + posemb.sincos_2d(jnp.asarray(positions[:, 1:]), self.width).astype(x.dtype)
    if self.pool == "token":
      cls = self.param(
        "cls",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, EMBED)),
        (1, 1, self.width),
        self.param_dtype,
      )
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], 1)
    if self.posemb == "learn":
      table = self.param(
        "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, LENGTH, EMBED)),
        (1, x.shape[1], self.width),
        self.param_dtype,
      )
      x = x + table.astype(x.dtype)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    x = Encoder(self.depth, name="encoder", **options(self, ENCODER_FIELDS))(x, segment_ids)
    if self.pool == "token":
      x = x[:, 0]
    elif self.pool == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(name="map_head", **options(self, BLOCK_FIELDS))(x, segment_ids)[:, 0]
    if self.num_classes <= 0:
      return x
    return class_head(self.num_classes, **kw)(x)
