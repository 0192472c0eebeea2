"""Captioner: a packed-video (or prompt) encoder and a small autoregressive caption decoder.

The encoder reads the packed rows of `vdit.data.pipeline` at native size, as NaViT does
(Dehghani et al. 2023, Sec. 3.1), extended to spacetime patches as in ViViT's Model 1 (Arnab et
al. 2021, "spatio-temporal attention"): a Dense(P -> D) patch embedding, the 3-D sin-cos code
of each patch's (t, h, w) inside its own example, and the ViT encoder (`vit.Encoder`) with
attention masked by `segment_ids`. With `source="prompt"` the context is a short text prompt
instead, encoded by the project's `TextEncoder` (prompt expansion). Either way the context is
[B, Lc, D] with per-example segment ids.

The decoder is a pre-LN transformer decoder (Vaswani et al. 2017, Sec. 3.1): token embedding +
1-D sin-cos position inside its caption, then blocks of causal self-attention (a token sees the
earlier tokens of its own caption only), cross-attention to the context of its own example
(`seg_text == seg_context`) and an MLP; a final LayerNorm and a Dense to the vocabulary. Captions
are packed like the batch's `text_tokens` ([BOS, w1, …] per example, `text_segment_ids`); the
target of a caption's last token is `END_ID` (the tokenizer's PAD, which no caption contains).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.axes import BATCH, EMBED, HEADS, KV, LENGTH, PATCH, TEXT_LENGTH, VOCAB
from vdit.data.tokenizer import BOS_ID, PAD_ID
from vdit.models import layers, posemb, vit
from vdit.models.text import TextEncoder

END_ID = PAD_ID  # the token a caption ends with (never inside a caption)
SOURCES = ("video", "prompt")  # what the decoder is conditioned on


class CausalSelfAttention(vit.Block):
  """Multi-head self-attention where token i sees tokens j ≤ i of its own segment."""

  @nn.compact
  def __call__(self, x, segment_ids):
    # x: [B, M, D]; segment_ids: [B, M] -> [B, M, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    heads = (self.num_heads, width // self.num_heads)
    q, k, v = (
      layers.dense(heads, (EMBED, HEADS, KV), name=name, **kw)(x)
      for name in ("query", "key", "value")
    )
    m = x.shape[1]
    causal = jnp.arange(m)[:, None] >= jnp.arange(m)[None, :]  # [M, M]
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal[None]
    out = layers.masked_attention(q, k, v, mask)  # [B, M, H, Dh]
    out = nn.with_logical_constraint(out, (BATCH, TEXT_LENGTH, HEADS, KV))
    return layers.dense(width, (HEADS, KV, EMBED), axis=(-2, -1), name="out", **kw)(out)


class DecoderBlock(vit.Block):
  """x + CausalSA(LN x); x + CrossAttn(LN x, context); x + MLP(LN x)."""

  @nn.compact
  def __call__(self, x, segment_ids, context, context_segment_ids):
    # x: [B, M, D]; segment_ids: [B, M]; context: [B, Lc, D]; context_segment_ids: [B, Lc].
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    axes = (BATCH, TEXT_LENGTH, EMBED)
    x = nn.with_logical_constraint(x, axes)
    h = layers.layer_norm(name="norm1", **kw)(x)
    x = x + CausalSelfAttention(self.num_heads, name="self_attn", **kw)(h, segment_ids)
    h = layers.layer_norm(name="norm2", **kw)(x)
    x = x + layers.MultiHeadAttention(
      self.num_heads,
      backend=self.attention_backend,
      length_axis=TEXT_LENGTH,
      kv_length_axis=LENGTH,
      name="cross_attn",
      **kw,
    )(h, segment_ids, context, context_segment_ids)
    h = layers.layer_norm(name="norm3", **kw)(x)
    x = x + layers.Mlp(self.mlp_ratio, length_axis=TEXT_LENGTH, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, axes), None


class Captioner(layers.Runtime):
  """Context (packed video, or a prompt) -> next-token logits of its packed captions.

  `__call__` = `decode(encode(...), ...)` (teacher forcing); `vdit.tasks.captioning` calls
  `encode` once and `decode` per generated token.
  """

  vocab_size: int
  width: int  # D of the encoder and the decoder
  depth: int  # encoder blocks (video or prompt)
  decoder_depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  source: str = "video"  # see SOURCES
  channels: int = 3  # C of the patches (P = pt·ph·pw·C), for `center_input`
  # (kt, kh, kw), e.g. (3, 3, 3): each token is embedded from the patches of its neighbourhood
  # on its example's grid (a convolutional patch embedding, as VideoDiT's `patch_context`);
  # () = its own patch.
  patch_context: tuple[int, ...] = ()
  # Subtract from every patch its example's mean colour (per channel, over all its pixels): on
  # `shapes` the background, so the object is what is left whatever the colour pair.
  center_input: bool = False
  # What the encoder's 3-D sin-cos code reads (`posemb.POSITION_CODES`): "absolute" patches from
  # the example's corner, or "fractional" h and w as fractions of its grid (NaViT), in which an
  # object's travel across the canvas (`shapes`' speed words) is a difference of codes.
  position_code: str = "absolute"

  def setup(self):
    if self.source not in SOURCES:
      raise ValueError(f"source={self.source!r} is unknown; expected one of {SOURCES}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    fields = vit.options(self, vit.ENCODER_FIELDS)
    if self.source == "video":
      axes, axis = ((None, PATCH, EMBED), (-2, -1)) if self.patch_context else ((PATCH, EMBED), -1)
      self.patch_embedding = layers.dense(self.width, axes, axis=axis, name="embedding", **kw)
      self.encoder = vit.Encoder(self.depth, name="encoder", **fields)
    else:
      self.prompt_encoder = TextEncoder(
        vocab_size=self.vocab_size, width=self.width, depth=self.depth, **fields
      )
    self.token_embedding = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
      **kw,
    )
    self.blocks = layers.stack_blocks(
      DecoderBlock,
      depth=self.decoder_depth,
      num_broadcast_args=3,
      scan=self.scan_layers,
      remat_policy=self.remat_policy,
    )("decoder", **vit.options(self, vit.BLOCK_FIELDS))
    self.decoder_norm = layers.layer_norm(**kw)
    self.head = layers.dense(self.vocab_size, (EMBED, VOCAB), **kw)

  def encode(self, patches, positions, segment_ids, prompt_tokens, prompt_segment_ids):
    """The context [B, Lc, D] and its segment ids [B, Lc]: the packed video (patches [B, L, P],
    positions [B, L, 3], segment_ids [B, L]) or the prompt (tokens, segment ids [B, M])."""
    if self.source == "prompt":
      return self.prompt_encoder(prompt_tokens, prompt_segment_ids), prompt_segment_ids
    if self.center_input:
      mean = layers.example_mean(patches, segment_ids, self.channels)  # [B, L, C]
      patches = patches - jnp.tile(mean, (1, 1, patches.shape[-1] // self.channels))
    if self.patch_context:  # [B, L, N, P]: the neighbourhood's patches (zeros off the grid)
      near = layers.grid_neighbours(positions, segment_ids, self.patch_context)
      patches = layers.gather_neighbours(patches, near)
    x = self.patch_embedding(patches)  # [B, L, D]
    code = posemb.coded_positions(self.position_code, positions, segment_ids)
    x = x + posemb.sincos_3d(code, self.width).astype(x.dtype)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    return self.encoder(x, segment_ids), segment_ids

  def decode(self, context, context_segment_ids, tokens, token_segment_ids):
    """Next-token logits [B, M, V] (float32) of packed captions `tokens` [B, M]."""
    x = self.token_embedding(tokens)  # [B, M, D]
    pos = layers.positions_in_segment(token_segment_ids)
    x = x + posemb.sincos_1d(pos, self.width).astype(x.dtype)
    x, _ = self.blocks(x, token_segment_ids, context, context_segment_ids)
    logits = self.head(self.decoder_norm(x))
    return nn.with_logical_constraint(logits, (BATCH, TEXT_LENGTH, VOCAB)).astype(jnp.float32)

  def __call__(
    self,
    patches: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    prompt_tokens: jax.Array,
    prompt_segment_ids: jax.Array,
    tokens: jax.Array,
    token_segment_ids: jax.Array,
  ) -> jax.Array:
    context, context_ids = self.encode(
      patches, positions, segment_ids, prompt_tokens, prompt_segment_ids
    )
    return self.decode(context, context_ids, tokens, token_segment_ids)


def caption_targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Teacher forcing on packed captions: (targets [B, M], weights [B, M] bool).

  The target of a token is the next token of its caption, or `END_ID` after its last one.
  Padding and the null caption ([NULL], no words: nothing to describe) carry no weight.
  """
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  nxt_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  targets = jnp.where(nxt_seg == segment_ids, nxt, END_ID)
  starts_null = tokens != BOS_ID  # a caption starts with BOS; [NULL] does not
  first = layers.positions_in_segment(segment_ids) == 0
  null_segment = first & starts_null & (segment_ids > 0)  # [B, M] at each caption's first token
  # Spread "this caption is null" over its tokens (segments are contiguous: a cummax of ids).
  null_ids = jnp.where(null_segment, segment_ids, 0)
  nulls = jax.vmap(lambda ids, seg: jnp.isin(seg, jnp.where(ids > 0, ids, -1)))(
    null_ids, segment_ids
  )
  return targets, (segment_ids > 0) & ~nulls
