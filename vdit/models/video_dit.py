"""VideoDiT: a diffusion transformer over packed spacetime latent patches (Sora-style).

DiT (Peebles & Xie 2023) with adaLN-Zero blocks, applied to NaViT-packed rows of spacetime
patches (Dehghani et al. 2023): every per-example quantity (diffusion time, class label) is
gathered to tokens with `segment_ids`, and no attention crosses examples. Text enters by
cross-attention (as PixArt-α, Sec. 2.3), conditioning positions by 3-D sin-cos encodings.

Parameter layout with `scan_layers=True`: `params["blocks"]` holds every DiTBlock parameter
with a leading [depth] axis (logical name LAYERS); `scan_layers=False` names them
`blocks_0 … blocks_{depth-1}`. `layers.unstack_layers` / `layers.stack_layers` convert.
The text encoder's blocks (`params["text"]["blocks"]`) follow the same rule.

`VideoDiT.__call__` is `encode_text` then `denoise`: a sampler encodes its prompts once per run
(`EncodedText`) and calls only `denoise` at each step; the parameters are the same either way.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit import segments
from vdit.axes import BATCH, EMBED, LENGTH, MLP, PATCH, TEXT_LENGTH, VOCAB
from vdit.models import layers, posemb
from vdit.models.text import TextEncoder

# DiT sizes (Peebles & Xie 2023, Table 1); "/p" is the spatial patch size of the latent.
VARIANTS = {
  "S": dict(width=384, depth=12, num_heads=6),
  "B": dict(width=768, depth=12, num_heads=12),
  "L": dict(width=1024, depth=24, num_heads=16),
  "XL": dict(width=1152, depth=28, num_heads=16),
}


def decode_variant(variant: str) -> dict:
  """ "S/2" -> dict(width=384, depth=12, num_heads=6, patch_size=2)."""
  size, sep, patch = variant.partition("/")
  if size not in VARIANTS or not sep or not patch.isdigit():
    raise ValueError(f"variant={variant!r} is not SIZE/PATCH with SIZE in {sorted(VARIANTS)}")
  return dict(VARIANTS[size], patch_size=int(patch))


def modulation(adaln: nn.Module, c) -> jax.Array:
  """adaLN modulation per token [B, L, n·D] from the conditioning `c`: per-token vectors
  [B, L, D], or a (table [B, U, D], index [B, L]) pair of `VideoDiT.conditioning_table` (the
  modulation is computed once per table entry and gathered to the tokens)."""
  if isinstance(c, tuple):
    table, index = c
    return jnp.take_along_axis(adaln(table), index[..., None], axis=1)
  return adaln(c)


def caption_index(segment_ids: jax.Array, text_segment_ids: jax.Array) -> jax.Array:
  """Index [B, L] of the first text token of each token's example (segment_ids [B, L]) among
  text_segment_ids [B, M]; M where the example has no caption tokens."""
  same = segment_ids[:, :, None] == text_segment_ids[:, None, :]  # [B, L, M]
  first = jnp.argmax(same, axis=-1).astype(segment_ids.dtype)
  return jnp.where(jnp.any(same, axis=-1), first, text_segment_ids.shape[1])


class EncodedText(NamedTuple):
  """Captions as the denoiser reads them (`VideoDiT.encode_text`); they do not change while a
  video is denoised, so a sampler computes them once per run."""

  tokens: jax.Array  # [B, M, D]: encoded, projected to the video width (cross-attention)
  segment_ids: jax.Array  # [B, M]: caption of each text token (0 = padding)
  # [B, M + 1, D]: the pooled-text vector of each text token's caption (`pooled_text`), the last
  # row that of no caption; None without pooled text.
  pooled: jax.Array | None = None


class DiTBlock(nn.Module):
  """adaLN-Zero self-attention, cross-attention to text, adaLN-Zero MLP (DiT, Sec. 3.2).

  The cross-attention is pre-LN with a zero-initialized output projection, and the two
  adaLN gates start at 0, so the block is exactly the identity at init. Without text (`text`
  None) there is no cross-attention: the class-conditional block of DiT (`models/dit.py`).
  """

  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  rope: bool = True
  rope_max_period: float = 10_000.0
  locality: float = 0.0
  attention_backend: str = "xla"
  return_hidden: bool = False  # also return the block's output (the stack stacks them)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x,
    c,
    segment_ids,
    text=None,
    text_segment_ids=None,
    rope_positions=None,
    neighbours=None,
    place_ids=None,
  ):
    # x: [B, L, D] tokens; c: [B, L, D] per-token conditioning (packed rows mix examples with
    # different diffusion times; [B, 1, D] per example); segment_ids: [B, L]; text: [B, M, D]
    # or None; text ids: [B, M];
    # rope_positions: [B, L, 3] ((t, h, w) for RoPE and/or the locality bias) or None;
    # neighbours: `layers.grid_neighbours` (index, valid) [B, L, N] of `mlp_context`, or None;
    # place_ids: `segments.place_ids` [B, L] for a temporal attention after the self-attention
    # (`VideoDiT.temporal_attention`), or None.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, qk_norm=self.qk_norm, backend=self.attention_backend)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    self_attn = dict(rope=self.rope, rope_max_period=self.rope_max_period, locality=self.locality)
    n = 6 if place_ids is None else 9
    mods = jnp.split(modulation(layers.AdaLNModulation(n, name="adaln", **kw), c), n, axis=-1)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]  # each [B, L, D], zero-init
    h = layers.modulate(layers.layer_norm(affine=False, name="norm1", **kw)(x), shift1, scale1)
    x = x + gate1 * layers.MultiHeadAttention(**attn, **self_attn, name="self_attn", **kw)(
      h, segment_ids, positions=rope_positions
    )
    if place_ids is not None:  # attention along time at each place, adaLN-Zero gated
      shift_t, scale_t, gate_t = mods[6:]
      norm = layers.layer_norm(affine=False, name="norm_temporal", **kw)
      h = layers.modulate(norm(x), shift_t, scale_t)
      x = x + gate_t * layers.MultiHeadAttention(**attn, **self_attn, name="temporal_attn", **kw)(
        h, place_ids, positions=rope_positions
      )
    if text is not None:
      h = layers.layer_norm(name="norm_cross", **kw)(x)
      x = x + layers.MultiHeadAttention(
        **attn, zero_init_out=True, kv_length_axis=TEXT_LENGTH, name="cross_attn", **kw
      )(h, segment_ids, text, text_segment_ids)
    h = layers.modulate(layers.layer_norm(affine=False, name="norm2", **kw)(x), shift2, scale2)
    if neighbours is not None:  # Mix-FFN (Xie et al. 2021): a depthwise conv before the MLP
      h = h + layers.GridDepthwiseConv(name="mlp_conv", **kw)(h, neighbours)
    x = x + gate2 * layers.Mlp(self.mlp_ratio, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    return x, x if self.return_hidden else None


class FinalLayer(nn.Module):
  """adaLN-modulated LayerNorm + zero-initialized Dense(D -> P) (DiT, Sec. 3.2)."""

  patch_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, neighbours=None, head=None, cell_neighbours=None):
    # x, c: [B, L, D] -> [B, L, P]; neighbours: `grid_neighbours` of `output_context` or None
    # (then each token's output also reads its neighbours' features: a convolutional unpatchify);
    # head: a `CellHead` added to the projection, reading the (1, 3, 3) `cell_neighbours`.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale = jnp.split(
      modulation(layers.AdaLNModulation(2, name="adaln", **kw), c), 2, axis=-1
    )
    x = layers.modulate(layers.layer_norm(affine=False, name="norm", **kw)(x), shift, scale)
    out = layers.dense(self.patch_dim, (EMBED, PATCH), zero_init=True, name="proj", **kw)(x)
    if neighbours is not None:
      window = layers.gather_neighbours(x, neighbours)  # [B, L, N, D]
      out = out + layers.dense(
        self.patch_dim, (None, EMBED, PATCH), axis=(-2, -1), zero_init=True, name="conv", **kw
      )(window)
    if head is not None:
      out = out + head(x, c, cell_neighbours)
    return out


class CellHead(nn.Module):
  """A convolutional head at the latent cells' (or pixels') resolution, added to the final
  projection: the final features → `features` per cell of the token's patch, `depth` residual
  blocks of a 3×3 convolution over the cells of each frame (across token borders, inside the
  example), modulated by the conditioning (time, pooled caption), then a zero-initialised
  projection to the cell's channels. A token's outline is drawn by filters that are the same
  at every place (translation-equivariant below the patch size), instead of by a per-token
  linear map that must learn every sub-patch offset of an object apart (docs/recipe.md, row CH).
  """

  patch_size: tuple[int, int, int]
  channels: int  # C per cell of the output
  features: int = 32
  depth: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, neighbours):
    # x: [B, L, D] final (normalised, modulated) features; c: the conditioning (`modulation`);
    # neighbours: `grid_neighbours` of (1, 3, 3) → [B, L, pt·ph·pw·C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pt, ph, pw = self.patch_size
    b, length, f = x.shape[0], x.shape[1], self.features
    cells = layers.dense(pt * ph * pw * f, (EMBED, None), name="to_cells", **kw)(x)
    cells = cells.reshape(b, length, pt, ph, pw, f)
    for i in range(self.depth):
      film = layers.dense(2 * f, (EMBED, None), zero_init=True, name=f"film_{i}", **kw)
      shift, scale = jnp.split(modulation(lambda z, film=film: film(nn.silu(z)), c), 2, axis=-1)
      y = layers.layer_norm(affine=False, name=f"norm_{i}", **kw)(cells)
      y = y * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
      taps = layers.cell_windows(nn.silu(y), neighbours)  # [B, L, pt, ph, pw, 9, F]
      conv = layers.dense(f, (None, None, None), axis=(-2, -1), name=f"conv_{i}", **kw)
      cells = cells + conv(taps)
    out = layers.dense(self.channels, (None, PATCH), zero_init=True, name="out", **kw)(cells)
    return out.reshape(b, length, -1)


class VideoDiT(layers.Runtime):
  """Predicts the flow velocity [B, L, P] of packed noisy spacetime patches.

  `labels` (optional, `num_classes > 0`) are per example [B, K] with −1 = null class (for
  classifier-free guidance); they are gathered to tokens through `segment_ids`.
  """

  patch_dim: int  # P = pt·ph·pw·C
  width: int  # D
  depth: int
  num_heads: int
  text_width: int
  text_depth: int
  text_heads: int
  vocab_size: int
  mlp_ratio: float = 4.0
  out_dim: int = 0  # output channels per token; 0 → P (2P for a learned variance, DiT Sec. 3.2)
  num_classes: int = 0  # 0: no label embedding
  text_embed_dim: int = 0  # E of precomputed caption embeddings; 0: the built-in token encoder
  qk_norm: bool = False
  # Positions: 3-D sin-cos added to the patch embedding, and with `rope` also 3-D rotary
  # embeddings of (t, h, w) in every self-attention (relative positions inside an example).
  rope: bool = False
  rope_max_period: float = 10_000.0  # longest RoPE wavelength, in patches
  # > 0: self-attention logits get −slope_h·distance (in patches) to the key, with learned
  # per-head slopes starting at locality·4^−h (`layers.locality_bias`, a 3-D ALiBi): heads that
  # attend to their neighbours from the first step.
  locality: float = 0.0
  # Pooled text: the mean of each caption's encoded tokens also enters the per-token adaLN
  # conditioning (next to the time), as the pooled text vector of SD3 (Esser et al. 2024,
  # Sec. 4); cross-attention still reads the whole sequence.
  pooled_text: bool = False
  # Every block also attends along time at each spatial place (divided space-time attention,
  # TimeSformer, Bertasius et al. 2021), after its full 3-D self-attention: what a token was
  # and will be at its own place, one short attention away (docs/recipe.md).
  temporal_attention: bool = False
  # > 0: the output also gets a learned linear map of the token's own noisy patch, a function
  # of its time t: Σ_k a_k(t)·x W_k with `patch_skip` Gaussian bumps a_k over t ∈ [0, 1] and
  # zero-initialised W_k [P, P] (a per-t linear denoiser, as a Wiener filter projects a noisy
  # patch onto the patch statistics; the network adds what a linear map cannot).
  patch_skip: int = 0
  # > 0: the patch embedding is low-rank, P → patch_bottleneck → D (JiT, Li & He 2025,
  # Sec. 4.2): a linear path of rank < P cannot copy the per-pixel noise of its input through.
  patch_bottleneck: int = 0
  # (kt, kh, kw), e.g. (3, 3, 3): each token is embedded from the noisy patches of its
  # neighbourhood on its example's grid (a convolutional patch embedding, "early convolutions",
  # Xiao et al. 2021), not its own patch alone; () = its own patch.
  patch_context: tuple[int, ...] = ()
  # Each example's mean noisy input per channel is subtracted from its patches before the
  # embedding and enters as its own embedding (Dense C → D): the object's tokens look alike on
  # every background (the captioner's `center_input`, docs/models.md). `channels` = C.
  center_input: bool = False
  channels: int = 3
  # (kt, kh, kw): every block's MLP input also gets a depthwise convolution over the token's
  # grid neighbourhood (Mix-FFN, Xie et al. 2021); () = none.
  mlp_context: tuple[int, ...] = ()
  # (kt, kh, kw): the final projection also reads the neighbours' features (a convolutional
  # unpatchify, as U-ViT's last 3×3 convolution, Bao et al. 2023); () = its own token only.
  output_context: tuple[int, ...] = ()
  text_embed_std: float = 0.02  # init std of the text encoder's id table (`TextEncoder.embed_std`)
  # > 0: the conditioning (time, caption, label) and its adaLN modulations are computed once
  # per example and noise state instead of once per token, for rows of at most this many
  # examples whose tokens have either the example's time or 0 (clean, frame-conditioned):
  # what training and the samplers give. The result is the same; a row that breaks the
  # contract gives NaN (skipped by the train step's non-finite guard), never a silent error.
  # 0 = per token (any per-token times, e.g. per-frame noise levels).
  shared_conditioning: int = 0
  # Self-conditioning (Chen et al. 2023, "Analog Bits", Sec. 3.2): every token's input is its
  # noisy patch and the model's previous estimate of its clean patch, `x0_prev` (zeros when
  # there is none: the first sampling step, and the training batches that do without it).
  self_condition: bool = False
  # The adaLN conditioning of each token also gets a learned linear map of its 3-D sin-cos
  # position code, so the modulations are functions of (time, caption, position) and a word can
  # act on *where* content goes (a direction word on the object's place in each frame) through
  # the adaLN's SiLU, not only through attention. Conditioning is then per token (the
  # `shared_conditioning` table is gathered to the tokens first). docs/recipe.md, row X1.
  position_conditioning: bool = False
  # "absolute": the sin-cos code reads (t, h, w) in patches from the example's corner;
  # "fractional": h and w as fractions of the example's grid (NaViT), so that "the left edge"
  # or "the middle" has one code on every canvas size.
  position_code: str = "absolute"
  # Representation alignment (REPA, Yu et al. 2024): > 0, the output of block `repa_depth`
  # (1-based) goes through a 3-layer SiLU MLP to `repa_dim` features, sown as
  # ("intermediates", "repa"); the training loss pulls them towards a frozen encoder's features
  # of the clean video (`vdit.tasks.video_diffusion`). Sampling never reads them.
  repa_depth: int = 0
  repa_dim: int = 0
  # > 0: a `CellHead` of this many 3×3-convolution blocks over the cells of each frame (width
  # `cell_head_width`) is added to the final projection; `patch_size` (pt, ph, pw) then gives
  # the cells of a token (P = pt·ph·pw·channels).
  cell_head: int = 0
  cell_head_width: int = 32
  patch_size: tuple[int, ...] = ()

  @classmethod
  def from_variant(cls, variant: str, **kwargs) -> "VideoDiT":
    """VideoDiT.from_variant("S/2", patch_dim=..., text_width=..., ...): DiT sizes by name.

    The variant's (spatial) patch size is for the data pipeline (it sets P); the `patch_size`
    field, (pt, ph, pw) for the cell head only, is given with the other kwargs when needed.
    """
    sizes = decode_variant(variant)
    sizes.pop("patch_size")
    return cls(**{**sizes, **kwargs})

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    text_tokens: jax.Array,
    text_segment_ids: jax.Array,
    labels: jax.Array | None = None,
    text_embeddings: jax.Array | None = None,
    *,
    x0_prev: jax.Array | None = None,
  ) -> jax.Array:
    # x: [B, L, P]; t: [B, L] in [0, 1]; positions: [B, L, 3]; segment_ids: [B, L];
    # text_tokens, text_segment_ids: [B, M]; labels: [B, K] or None; text_embeddings:
    # [B, M, E] (precomputed, `text_embed_dim` > 0) or None; x0_prev: [B, L, P] or None (with
    # `self_condition`). Returns [B, L, P].
    text = self.encode_text(text_tokens, text_segment_ids, text_embeddings)
    return self.denoise(x, t, positions, segment_ids, text, labels, x0_prev=x0_prev)

  @nn.compact
  def encode_text(
    self,
    text_tokens: jax.Array,
    text_segment_ids: jax.Array,
    text_embeddings: jax.Array | None = None,
  ) -> EncodedText:
    """The captions as every denoising step reads them: the text encoder, its projection to the
    video width, and the pooled-text MLP. text_tokens, text_segment_ids: [B, M]; text_embeddings:
    [B, M, E] (precomputed, `text_embed_dim` > 0) or None."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    text = TextEncoder(
      self.vocab_size,
      self.text_width,
      self.text_depth,
      self.text_heads,
      mlp_ratio=self.mlp_ratio,
      attention_backend=self.attention_backend,
      scan_layers=self.scan_layers,
      remat_policy=self.remat_policy,
      embed_dim=self.text_embed_dim,
      embed_std=self.text_embed_std,
      name="text",
      **kw,
    )(text_tokens, text_segment_ids, text_embeddings)  # [B, M, Dt]
    pooled = self.pool_text(text, text_segment_ids) if self.pooled_text else None
    tokens = layers.dense(self.width, (MLP, EMBED), name="text_proj", **kw)(text)  # [B, M, D]
    tokens = nn.with_logical_constraint(tokens, (BATCH, TEXT_LENGTH, EMBED))
    return EncodedText(tokens, text_segment_ids, pooled)

  @nn.compact
  def denoise(
    self,
    x: jax.Array,
    t: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    text: EncodedText,
    labels: jax.Array | None = None,
    *,
    x0_prev: jax.Array | None = None,
  ) -> jax.Array:
    """The model on encoded captions (`encode_text`): as `__call__`, with `text` for the text
    tokens, their segment ids and embeddings. Returns [B, L, P]."""
    if x.shape[-1] != self.patch_dim:
      raise ValueError(f"patches have P={x.shape[-1]}, expected patch_dim={self.patch_dim}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    noisy = x  # [B, L, P]
    if self.self_condition:  # [B, L, 2P]: the noisy patch and the previous estimate
      prev = jnp.zeros_like(x) if x0_prev is None else x0_prev.astype(x.dtype)
      x = jnp.concatenate([x, prev], axis=-1)
    elif x0_prev is not None:
      raise ValueError("x0_prev is given but the model has self_condition=False")

    # Tokens: patch embedding + 3-D position of the patch inside its own example.
    def neighbours(kernel):
      return layers.grid_neighbours(positions, segment_ids, kernel) if kernel else None

    mean = None
    if self.center_input:  # [B, L, C] per example, and the patches centred on it
      mean = layers.example_mean(x[..., : self.patch_dim], segment_ids, self.channels)
      x = x - jnp.tile(mean, (1, 1, x.shape[-1] // self.channels))
    if self.patch_bottleneck:  # per patch, before the neighbours are gathered (N× cheaper)
      x = layers.dense(self.patch_bottleneck, (PATCH, None), name="patch_bottleneck", **kw)(x)
    if self.patch_context:
      x = layers.gather_neighbours(x, neighbours(self.patch_context))
      x = nn.with_logical_constraint(x, (BATCH, LENGTH, None, PATCH))  # [B, L, N, P or r]
    if self.patch_context:
      h = layers.dense(self.width, (None, PATCH, EMBED), axis=(-2, -1), name="patch_conv", **kw)(x)
    else:
      h = layers.dense(self.width, (PATCH, EMBED), name="patch_embed", **kw)(x)
    if mean is not None:
      h = h + layers.dense(self.width, (None, EMBED), name="mean_embed", **kw)(mean)
    code_positions = posemb.coded_positions(self.position_code, positions, segment_ids)
    h = h + layers.sincos_3d(code_positions, self.width).astype(h.dtype)
    h = nn.with_logical_constraint(h, (BATCH, LENGTH, EMBED))

    # Conditioning: diffusion time (+ class label, + pooled caption of the token's example),
    # per token [B, L, D] or as a shared (table [B, U, D], index [B, L]).
    if self.shared_conditioning:
      t_cond, seg_cond, index, valid = self.conditioning_table(t, segment_ids)
    else:
      t_cond, seg_cond, index, valid = t, segment_ids, None, None
    c = layers.TimestepEmbedding(self.width, name="t_embed", **kw)(t_cond)
    if self.num_classes > 0:
      if labels is None:
        raise ValueError(f"num_classes={self.num_classes} needs labels [B, K] (−1 = null)")
      table = nn.Embed(
        self.num_classes + 1,  # the last row is the null class
        self.width,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
        name="label_embed",
        **kw,
      )
      label_ids = jnp.where(labels < 0, self.num_classes, labels)  # [B, K]
      c = c + table(segments.per_token(label_ids, seg_cond))
    if self.pooled_text:
      caption = caption_index(seg_cond, text.segment_ids)  # [B, L] or [B, U]
      c = c + jnp.take_along_axis(text.pooled, caption[..., None], axis=1)
    if self.position_conditioning:
      if index is not None:
        c, index = jnp.take_along_axis(c, index[..., None], axis=1), None
      code = layers.sincos_3d(positions, self.width).astype(c.dtype)
      c = c + layers.dense(self.width, (None, EMBED), name="position_conditioning", **kw)(code)
    if index is None:
      c = nn.with_logical_constraint(c, (BATCH, LENGTH, EMBED))
    else:
      c = (nn.with_logical_constraint(c, (BATCH, None, EMBED)), index)

    stack = self.block_stack(DiTBlock, self.depth, num_broadcast_args=7)
    h, hidden = stack(
      "blocks",
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      qk_norm=self.qk_norm,
      rope=self.rope,
      rope_max_period=self.rope_max_period,
      locality=self.locality,
      attention_backend=self.attention_backend,
      return_hidden=bool(self.repa_depth),
      **kw,
    )(
      h,
      c,
      segment_ids,
      text.tokens,
      text.segment_ids,
      positions if self.rope or self.locality else None,
      neighbours(self.mlp_context),
      segments.place_ids(segment_ids, positions) if self.temporal_attention else None,
    )
    if self.repa_depth:  # [B, L, repa_dim]; unused (and compiled away) when not collected
      self.sow("intermediates", "repa", self.repa_projector(hidden[self.repa_depth - 1]))
    head = None
    if self.cell_head:
      cells = math.prod(self.patch_size) if len(self.patch_size) == 3 else 0
      if cells * self.channels != self.patch_dim or self.out_dim not in (0, self.patch_dim):
        raise ValueError(
          f"cell_head={self.cell_head} needs patch_size (pt, ph, pw) with pt·ph·pw·channels = "
          f"patch_dim={self.patch_dim} (got {self.patch_size}, channels={self.channels}) and "
          f"an output of P channels (out_dim={self.out_dim})"
        )
      head = CellHead(
        tuple(self.patch_size),
        self.channels,
        self.cell_head_width,
        self.cell_head,
        name="cell_head",
        **kw,
      )
    out = FinalLayer(self.out_dim or self.patch_dim, name="final", **kw)(
      h, c, neighbours(self.output_context), head, neighbours((1, 3, 3)) if head else None
    )
    if self.patch_skip:
      out = out + self.skip(noisy, t)
    if valid is not None:  # a row outside the shared-conditioning contract: loud, not wrong
      out = jnp.where(valid[:, None, None], out, jnp.nan)
    return nn.with_logical_constraint(out, (BATCH, LENGTH, PATCH))

  def repa_projector(self, h):
    """REPA's projector h_φ: [B, L, D] → [B, L, repa_dim], three Dense layers with SiLU."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if not 1 <= self.repa_depth <= self.depth or self.repa_dim < 1:
      raise ValueError(
        f"repa_depth={self.repa_depth}, repa_dim={self.repa_dim}: expected a block in "
        f"[1, depth={self.depth}] and a feature width >= 1"
      )
    h = nn.silu(layers.dense(2 * self.width, (EMBED, MLP), name="repa_fc1", **kw)(h))
    h = nn.silu(layers.dense(2 * self.width, (None, MLP), name="repa_fc2", **kw)(h))
    return layers.dense(self.repa_dim, (MLP, None), name="repa_fc3", **kw)(h)

  def skip(self, x, t):
    """Σ_k a_k(t)·x W_k: [B, L, out]; x: [B, L, P] noisy patches, t: [B, L] their times."""
    k = self.patch_skip
    centres = jnp.linspace(0.0, 1.0, k)
    width = 1.0 / max(k - 1, 1)
    bumps = jnp.exp(-0.5 * ((t[..., None] - centres) / width) ** 2)  # [B, L, K]
    bumps = bumps / jnp.sum(bumps, axis=-1, keepdims=True)
    out_dim = self.out_dim or self.patch_dim
    kernel = self.param(
      "skip",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, PATCH, None)),
      (k, x.shape[-1], out_dim),
      self.param_dtype,
    )
    per_k = jnp.einsum("blp,kpq->blkq", x.astype(self.dtype), kernel.astype(self.dtype))
    return jnp.einsum("blk,blkq->blq", bumps.astype(self.dtype), per_k)

  def conditioning_table(self, t, segment_ids):
    """The distinct (example, time) pairs of each row: (times [B, U], their segment ids [B, U],
    each token's entry [B, L], whether the row keeps the contract [B]), U = 2·(K + 1) with
    K = `shared_conditioning`: entry 2k is example k clean (t = 0), 2k + 1 example k at its
    time (the largest of its tokens'); segment 0 is padding."""
    k = self.shared_conditioning
    seg = jnp.clip(segment_ids, 0, k)

    def example_times(tt, s):
      top = jax.ops.segment_max(tt, s, num_segments=k + 1)
      return jnp.where(jnp.isfinite(top), top, 0.0)  # no tokens: −inf → 0

    t_example = jax.vmap(example_times)(t, seg)  # [B, K + 1]
    times = jnp.stack([jnp.zeros_like(t_example), t_example], -1).reshape(t.shape[0], -1)
    segs = jnp.repeat(jnp.arange(k + 1, dtype=segment_ids.dtype), 2)[None].repeat(t.shape[0], 0)
    own = jnp.take_along_axis(t_example, seg, axis=1)  # [B, L]
    index = 2 * seg + (t != 0).astype(seg.dtype)
    padding = segment_ids == 0  # its outputs are masked: any time is fine
    valid = jnp.all(((t == 0) | (t == own) | padding) & (segment_ids <= k), axis=1)
    return times, segs, index, valid

  def pool_text(self, text, text_segment_ids):
    """The pooled-text vector of each text token's caption: its mean encoded token through a SiLU
    MLP, [B, M + 1, D]; the last row is the MLP of zeros, for tokens whose example has no
    caption (`caption_index`). text: [B, M, Dt]; text_segment_ids: [B, M]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    same = (text_segment_ids[:, :, None] == text_segment_ids[:, None, :]).astype(text.dtype)
    pooled = jnp.einsum("bnm,bmd->bnd", same, text) / jnp.sum(same, axis=-1, keepdims=True)
    pooled = jnp.concatenate([pooled, jnp.zeros_like(pooled[:, :1])], axis=1)  # [B, M + 1, Dt]
    h = nn.silu(layers.dense(self.width, (None, MLP), name="text_pool_fc1", **kw)(pooled))
    return layers.dense(self.width, (MLP, EMBED), name="text_pool_fc2", **kw)(h)
