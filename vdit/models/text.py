"""A small trainable text encoder over packed captions.

Token ids come from the built-in tokenizer (PAD=0, BOS=1, NULL=2, words >= 3; the empty
caption is [NULL]). Captions of different examples share a row and never attend to each other
(`text_segment_ids`, 0 = padding), so each caption's encoding is independent of its neighbours.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.axes import EMBED, TEXT_LENGTH, VOCAB
from vdit.data.tokenizer import NULL_ID
from vdit.models import layers, vit


class TextEncoder(layers.Runtime):
  """Token ids [B, M] -> contextual embeddings [B, M, Dt] (per-caption, packed).

  Embedding (VOCAB, EMBED) + 1-D sin-cos position of each token inside its own caption, then
  `depth` pre-LN blocks with segment-masked self-attention, then a final LayerNorm.

  With `embed_dim` = E > 0 the inputs are precomputed embeddings [B, M, E] (a frozen text model's
  outputs, `vdit.data.caption_table`) instead: a linear projection E → Dt replaces the id table,
  and tokens equal to NULL (the empty or dropped caption) take a learned null embedding. The token
  ids then only mark NULL; `depth` may be 0 (projection and LayerNorm only).
  """

  vocab_size: int
  width: int  # Dt
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  embed_dim: int = 0  # E of precomputed embeddings; 0: token ids through the id table
  # Init std of the id table. The 1-D sin-cos position code has norm √(Dt/2) (8 at Dt = 128):
  # BERT's 0.02 makes each word a ~3% perturbation of its position; 1.0 (T5) makes them equal.
  embed_std: float = 0.02

  @nn.compact
  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array, embeddings: jax.Array | None = None
  ) -> jax.Array:
    # tokens, segment_ids: [B, M] int32; embeddings: [B, M, E] or None -> [B, M, Dt]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.embed_dim:
      if embeddings is None or embeddings.shape[-1] != self.embed_dim:
        got = None if embeddings is None else embeddings.shape
        raise ValueError(f"embed_dim={self.embed_dim} needs embeddings [B, M, E], got {got}")
      x = layers.dense(self.width, (None, EMBED), name="embed_proj", **kw)(embeddings)
      null = self.param(
        "null",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (EMBED,)),
        (self.width,),
        self.param_dtype,
      )
      x = jnp.where((tokens == NULL_ID)[..., None], null.astype(x.dtype), x)
    else:
      embed = nn.Embed(
        self.vocab_size,
        self.width,
        embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(self.embed_std), (VOCAB, EMBED)
        ),
        name="embed",
        **kw,
      )
      x = embed(tokens)  # [B, M, Dt]
    x = x + layers.sincos_1d(layers.positions_in_segment(segment_ids), self.width).astype(x.dtype)
    # The ViT encoder's blocks over each caption's tokens.
    fields = vit.options(self, vit.ENCODER_FIELDS)
    return vit.encoder_stack(x, segment_ids, depth=self.depth, length_axis=TEXT_LENGTH, **fields)
