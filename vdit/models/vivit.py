"""ViViT: video vision transformers (Arnab et al. 2021), the four space-time variants.

Tubelet embedding (Sec. 3.2): non-overlapping (pt, ph, pw) tubelets, a Dense(P -> D) over the
flattened tubelet (the 3-D conv of the paper); the kernel starts with "central frame"
initialization (Sec. 3.4): zero except the middle time slice, which holds a 2-D patch kernel
(`inflate_patch_embedding` turns an image model's kernel into one). Tokens form an
(nt, ns = nh·nw) grid with learned position tables. Variants (Sec. 3.3):

  "spatio_temporal"           Model 1: all nt·ns tokens (+ CLS) in one encoder.
  "factorised_encoder"        Model 2: a spatial encoder per frame (+ CLS), then a temporal
                              encoder (`temporal_depth` blocks) over the frame CLS tokens.
  "factorised_self_attention" Model 3: each block attends over space, then over time, then MLP.
  "factorised_dot_product"    Model 4: half the heads attend over space, half over time.

Models 3 and 4 have no CLS token (the paper avoids it "when reshaping") and pool by mean.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.axes import BATCH, EMBED, HEADS, KV, LENGTH, PATCH
from vdit.data.patchify import patchify
from vdit.models import layers, vit
from vdit.models.vit import VARIANTS, Encoder, class_head, classification_loss

__all__ = ["ViViT", "inflate_patch_embedding", "classification_loss", "VIVIT_VARIANTS"]
VIVIT_VARIANTS = (
  "spatio_temporal",
  "factorised_encoder",
  "factorised_self_attention",
  "factorised_dot_product",
)


def inflate_patch_embedding(kernel_2d: np.ndarray, pt: int, mode: str = "central") -> np.ndarray:
  """A 2-D patch kernel [ph·pw·C, D] -> tubelet kernel [pt·ph·pw·C, D] (ViViT, Sec. 3.4).

  "central": zeros except frame ⌊pt/2⌋ (the tubelet model then equals the image model on a
  video of repeated frames at init); "average": the 2-D kernel / pt at every frame (I3D).
  """
  kernel_2d = jnp.asarray(kernel_2d)
  if mode == "central":
    frames = [jnp.zeros_like(kernel_2d)] * pt
    frames[pt // 2] = kernel_2d
  elif mode == "average":
    frames = [kernel_2d / pt] * pt
  else:
    raise ValueError(f"inflation mode={mode!r} is unknown; expected 'central' or 'average'")
  return jnp.concatenate(frames, axis=0)


def _central_frame_init(pt: int):
  """Initializer of a [pt·ph·pw·C, D] tubelet kernel: a Xavier 2-D kernel at the middle frame."""

  def init(key, shape, dtype=jnp.float32):
    p, d = shape
    kernel_2d = nn.initializers.xavier_uniform()(key, (p // pt, d), dtype)
    return inflate_patch_embedding(kernel_2d, pt).astype(dtype)

  return init


def _learned_table(module: nn.Module, name: str, rows: int, width: int, dtype) -> jax.Array:
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, LENGTH, EMBED))
  return module.param(name, init, (1, rows, width), dtype)


class FactorisedSelfAttentionBlock(vit.Block):
  """Model 3 block: y = x + MSA_s(LN(x)); z = y + MSA_t(LN(y)); out = z + MLP(LN(z))."""

  @nn.compact
  def __call__(self, x):
    # x: [B, nt, ns, D]. Returns (x, None) for nn.scan.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, backend=self.attention_backend, **kw)
    b, nt, ns, d = x.shape
    h = layers.layer_norm(name="norm_space", **kw)(x).reshape(b * nt, ns, d)
    ones = jnp.ones((b * nt, ns), jnp.int32)
    x = x + layers.MultiHeadAttention(name="attn_space", **attn)(h, ones).reshape(x.shape)
    h = layers.layer_norm(name="norm_time", **kw)(x).transpose(0, 2, 1, 3).reshape(b * ns, nt, d)
    ones = jnp.ones((b * ns, nt), jnp.int32)
    h = layers.MultiHeadAttention(name="attn_time", **attn)(h, ones)
    x = x + h.reshape(b, ns, nt, d).transpose(0, 2, 1, 3)
    h = layers.layer_norm(name="norm_mlp", **kw)(x)
    return x + layers.Mlp(self.mlp_ratio, name="mlp", **kw)(h), None


class FactorisedDotProductBlock(vit.Block):
  """Model 4 block: x + W_o[heads_s(LN x) ‖ heads_t(LN x)], then x + MLP(LN(x)) (Sec. 3.3).

  Half of the heads attend among the tokens of the same frame, the other half among the tokens
  of the same spatial location; their outputs are concatenated before the output projection.
  """

  @nn.compact
  def __call__(self, x):
    # x: [B, nt, ns, D]. Returns (x, None) for nn.scan.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, nt, ns, d = x.shape
    if self.num_heads % 2 or d % self.num_heads:
      raise ValueError(
        f"factorised dot-product attention needs an even num_heads={self.num_heads} "
        f"dividing width={d}"
      )
    hh, dh = self.num_heads // 2, d // self.num_heads
    h = layers.layer_norm(name="norm1", **kw)(x)
    proj = lambda name: layers.dense(  # noqa: E731
      (self.num_heads, dh), (EMBED, HEADS, KV), name=name, **kw
    )(h)  # [B, nt, ns, H, Dh]
    q, k, v = proj("query"), proj("key"), proj("value")
    backend = self.attention_backend
    # Space: heads [0, H/2) within each frame.
    qs, ks, vs = (a[..., :hh, :].reshape(b * nt, ns, hh, dh) for a in (q, k, v))
    ones = jnp.ones((b * nt, ns), jnp.int32)
    out_s = layers.attention(qs, ks, vs, ones, ones, backend=backend).reshape(b, nt, ns, hh, dh)
    # Time: heads [H/2, H) at each spatial location.
    qt, kt, vt = (
      a[..., hh:, :].transpose(0, 2, 1, 3, 4).reshape(b * ns, nt, hh, dh) for a in (q, k, v)
    )
    ones = jnp.ones((b * ns, nt), jnp.int32)
    out_t = layers.attention(qt, kt, vt, ones, ones, backend=backend)
    out_t = out_t.reshape(b, ns, nt, hh, dh).transpose(0, 2, 1, 3, 4)
    out = jnp.concatenate([out_s, out_t], axis=-2)  # [B, nt, ns, H, Dh]
    x = x + layers.dense(d, (HEADS, KV, EMBED), axis=(-2, -1), name="out", **kw)(out)
    h = layers.layer_norm(name="norm2", **kw)(x)
    return x + layers.Mlp(self.mlp_ratio, name="mlp", **kw)(h), None


class ViViT(layers.Runtime):
  """Video [B, T, H, W, C] -> logits [B, classes] (pooled features [B, D] if classes=0)."""

  num_classes: int
  variant: str  # see VIVIT_VARIANTS
  width: int
  depth: int  # spatial depth for "factorised_encoder"
  num_heads: int
  tubelet: tuple[int, int, int] = (2, 16, 16)  # (pt, ph, pw)
  temporal_depth: int = 4  # "factorised_encoder" only
  mlp_ratio: float = 4.0

  @classmethod
  def from_variant(cls, size_patch: str, variant: str, num_classes: int, **kwargs) -> "ViViT":
    """ViViT.from_variant("B/16", "factorised_encoder", 400, tubelet=(2, 16, 16))."""
    size = size_patch.partition("/")[0]
    if size not in VARIANTS:
      raise ValueError(f"size={size_patch!r} is not one of {sorted(VARIANTS)}")
    return cls(num_classes=num_classes, variant=variant, **{**VARIANTS[size], **kwargs})

  def _encoder(self, depth: int, name: str) -> Encoder:
    return Encoder(depth, name=name, **vit.options(self, vit.ENCODER_FIELDS))

  def _with_cls(self, x: jax.Array, name: str) -> jax.Array:
    # x: [B', N, D] -> [B', 1 + N, D] with a learned class token first.
    init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, EMBED))
    cls = self.param(name, init, (1, 1, x.shape[-1]), self.param_dtype).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    if self.variant not in VIVIT_VARIANTS:
      raise ValueError(f"variant={self.variant!r} is unknown; expected one of {VIVIT_VARIANTS}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pt = self.tubelet[0]
    patches, _, (nt, nh, nw) = patchify(video, self.tubelet)  # [B, N, P], t-major
    b, ns, d = patches.shape[0], nh * nw, self.width
    embed = layers.Dense(
      (d,), (PATCH, EMBED), kernel_init=_central_frame_init(pt), name="embedding", **kw
    )
    x = embed(patches)  # [B, nt·ns, D]

    if self.variant == "spatio_temporal":
      x = self._with_cls(x, "cls")
      x = x + _learned_table(self, "pos_embedding", x.shape[1], d, self.param_dtype)
      x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
      x = self._encoder(self.depth, "encoder")(x, jnp.ones(x.shape[:2], jnp.int32))
      pooled = x[:, 0]
    elif self.variant == "factorised_encoder":
      x = x.reshape(b * nt, ns, d)
      x = self._with_cls(x, "cls_space")
      x = x + _learned_table(self, "pos_embedding_space", ns + 1, d, self.param_dtype)
      x = self._encoder(self.depth, "encoder_space")(x, jnp.ones(x.shape[:2], jnp.int32))
      x = self._with_cls(x[:, 0].reshape(b, nt, d), "cls_time")  # [B, 1 + nt, D]
      x = x + _learned_table(self, "pos_embedding_time", nt + 1, d, self.param_dtype)
      x = self._encoder(self.temporal_depth, "encoder_time")(x, jnp.ones(x.shape[:2], jnp.int32))
      pooled = x[:, 0]
    else:
      x = x + _learned_table(self, "pos_embedding", nt * ns, d, self.param_dtype)
      block = (
        FactorisedSelfAttentionBlock
        if self.variant == "factorised_self_attention"
        else FactorisedDotProductBlock
      )
      stack = self.block_stack(block, self.depth, num_broadcast_args=0)
      x, _ = stack("blocks", **vit.options(self, vit.BLOCK_FIELDS))(x.reshape(b, nt, ns, d))
      x = layers.layer_norm(name="norm", **kw)(x)
      pooled = jnp.mean(x, axis=(1, 2))
    if self.num_classes <= 0:
      return pooled
    return class_head(self.num_classes, **kw)(pooled)
