"""DiT: class-conditional diffusion transformer on image latents (Peebles & Xie 2023).

As the paper (Sec. 3.2) and its code (facebookresearch/DiT `models.py`): the latent [B, I, I, C]
is cut into p×p patches (N = (I/p)² tokens), embedded linearly, given the fixed 2-D sin-cos
code, and run through adaLN-Zero blocks conditioned on c = embed(t) + embed(y); a final adaLN
layer maps each token to p·p·C' values (C' = 2C with learned σ: ε then the variance
interpolation v, Sec. 3.1) and they are put back in place. Label −1 (or `num_classes`) is the
null class of classifier-free guidance: its embedding is the extra row that
`class_dropout_prob > 0` adds, as in the reference's `LabelEmbedder`. Dropping labels to it in
training is the loss's job (`vdit.diffusion.guidance.drop_conditions`, at
`diffusion.text_dropout`), as for VideoDiT; the model has no dropout of its own.

Time t ∈ [0, 1) is DiT's integer step n / 1000 (`layers.TimestepEmbedding` scales it back by
1000; its sin-cos layout is [sin, cos] where DiT's is [cos, sin] — `convert.py` permutes the
first time-MLP kernel accordingly). Sizes: `video_dit.VARIANTS` ("S/2" … "XL/8", Table 1).

Parameter layout: `patch_embed`, `t_embed/{fc1, fc2}`, `label_embed`, `blocks/{adaln/proj,
self_attn/{query,key,value,out}, mlp/{fc1,fc2}}` (scanned: leading [depth] axis),
`final/{adaln/proj, proj}`. Every block is the identity at init (zero adaLN gates) and the
output is 0. The blocks are VideoDiT's (`video_dit.DiTBlock`) without text, so without
cross-attention.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.axes import EMBED, PATCH, VOCAB
from vdit.data.patchify import patchify, unpatchify
from vdit.models import layers, posemb
from vdit.models.video_dit import DiTBlock, FinalLayer, decode_variant


class DiT(layers.Runtime):
  """Noisy latents [B, I, I, C], t [B], labels [B] -> ε (and v) [B, I, I, C or 2C]."""

  patch_size: int
  width: int  # D
  depth: int
  num_heads: int
  in_channels: int = 4  # C of the latent (SD VAE)
  num_classes: int = 1000
  class_dropout_prob: float = 0.1  # > 0 adds the null-class row (CFG); the loss drops labels
  learn_sigma: bool = True  # output 2C channels: ε, then the variance interpolation
  mlp_ratio: float = 4.0

  @classmethod
  def from_variant(cls, variant: str, **kwargs) -> "DiT":
    """DiT.from_variant("XL/2", num_classes=1000): DiT sizes and patch size by name."""
    return cls(**{**decode_variant(variant), **kwargs})

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    labels: jax.Array,
  ) -> jax.Array:
    # x: [B, I, I, C]; t: [B] in [0, 1); labels: [B] int (−1 or num_classes = null).
    # Returns [B, I, I, C'].
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(
        f"latents of shape {tuple(x.shape)}: expected [B, I, I, in_channels={self.in_channels}]"
      )
    p = self.patch_size
    patches, positions, grid = patchify(x[:, None], (1, p, p))  # [B, N, p·p·C]
    h = layers.dense(self.width, (PATCH, EMBED), name="patch_embed", **kw)(patches)
    h = h + posemb.sincos_2d(jnp.asarray(positions[:, 1:]), self.width).astype(h.dtype)

    c = layers.TimestepEmbedding(self.width, name="t_embed", **kw)(t)  # [B, D]
    null = self.num_classes
    labels = jnp.where((labels < 0) | (labels >= null), null, labels)
    rows = self.num_classes + int(self.class_dropout_prob > 0)
    table = nn.Embed(
      rows,
      self.width,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
      name="label_embed",
      **kw,
    )
    c = (c + table(jnp.minimum(labels, rows - 1)))[:, None, :]  # [B, 1, D]

    # Broadcast to every block: c, segment_ids (no text: no cross-attention).
    stack = self.block_stack(DiTBlock, self.depth, num_broadcast_args=2)
    segment_ids = jnp.ones(h.shape[:2], jnp.int32)
    h, _ = stack(
      "blocks",
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      rope=False,  # positions are the sin-cos code added to the patch embedding
      attention_backend=self.attention_backend,
      **kw,
    )(h, c, segment_ids)
    out = FinalLayer(p * p * self.out_channels, name="final", **kw)(h, c)  # [B, N, p·p·C']
    return unpatchify(out, grid, (1, p, p), self.out_channels)[:, 0]
