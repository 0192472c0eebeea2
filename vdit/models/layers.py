"""Shared building blocks: attention backends, conditioning, positions.

Every parameter is created with `nn.with_logical_partitioning` and every large activation is
constrained with `nn.with_logical_constraint`, using the logical axis names of `vdit.axes`. The
mapping from logical names to mesh axes lives in the config (`config.sharding_rules`), never here.

Shape letters (STYLE.md): B rows, L packed length, K examples per row, D width, H heads,
P patch vector size, M text length.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.axes import BATCH, EMBED, HEADS, KV, LAYERS, LENGTH, MLP
from vdit.models import posemb, splash
from vdit.models.posemb import sincos_1d, sincos_3d  # noqa: F401  (re-exported)

Dtype = Any
Axes = tuple[str | None, ...]

# "xla": reference (any device); "splash": block-sparse TPU Pallas kernel (Pallas interpret
# mode elsewhere, for tests); "cudnn": cuDNN flash attention (GPU only).
ATTENTION_BACKENDS = ("xla", "splash", "cudnn")


# ------------------------------------------------------------------------------------------
# Packed-row helpers.
# ------------------------------------------------------------------------------------------


def grid_neighbours(
  positions: jax.Array, segment_ids: jax.Array, kernel: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
  """For every token, the row index of each of its neighbours in a `kernel` = (kt, kh, kw)
  window of its own example's (t, h, w) grid → (index [B, L, N], valid [B, L, N]),
  N = kt·kh·kw in (dt, dh, dw) raster order, the token itself in the middle.

  An example's tokens are contiguous and in raster order (as `patchify` and the packers
  write them), so a neighbour at (dt, dh, dw) sits dt·H·W + dh·W + dw further along the
  row, with H, W that example's grid extents. A neighbour off the grid, in another example,
  or whose position is not the expected one (tokens dropped) is not valid.
  """
  if any(k % 2 == 0 or k < 1 for k in kernel):
    raise ValueError(f"kernel={tuple(kernel)} must be odd sizes ≥ 1 (centred on the token)")
  length = positions.shape[1]
  positions = positions.astype(jnp.int32)

  def extents(pos, seg):  # one row: each token's example grid extents [L, 3]
    top = jax.ops.segment_max(pos, seg, num_segments=length + 1)
    return top[seg] + 1

  ext = jax.vmap(extents)(positions, segment_ids)
  stride = jnp.stack([ext[..., 1] * ext[..., 2], ext[..., 2], jnp.ones_like(ext[..., 2])], -1)
  row = jnp.arange(length, dtype=jnp.int32)[None, :]
  take = jax.vmap(lambda values, index: values[index])
  indices, valids = [], []
  for offset in itertools.product(*[range(-(k // 2), k // 2 + 1) for k in kernel]):
    delta = jnp.asarray(offset, jnp.int32)
    j = row + jnp.sum(stride * delta, axis=-1)  # [B, L]
    jc = jnp.clip(j, 0, length - 1)
    valid = (j >= 0) & (j < length) & (segment_ids > 0) & (take(segment_ids, jc) == segment_ids)
    valid &= jnp.all(take(positions, jc) == positions + delta, axis=-1)
    indices.append(jc)
    valids.append(valid)
  return jnp.stack(indices, -1), jnp.stack(valids, -1)


def gather_neighbours(x: jax.Array, neighbours: tuple[jax.Array, jax.Array]) -> jax.Array:
  """x [B, L, F] → [B, L, N, F]: each token's `grid_neighbours` (index, valid), zeros where a
  neighbour is not valid (off its example's grid: a zero-padded convolution window)."""
  index, valid = neighbours
  out = jax.vmap(lambda row, i: row[i])(x, index)
  return out * valid[..., None].astype(x.dtype)


def cell_canvas(
  x: jax.Array, neighbours: tuple[jax.Array, jax.Array], off_grid: str = "zeros"
) -> jax.Array:
  """Per-cell features x [B, L, pt, ph, pw, F] (the cells of each token's patch) → each token's
  cells amid its (1, 3, 3) `grid_neighbours`' cells, [B, L, pt, 3ph, 3pw, F]. A neighbour off
  the example's grid is zeros (`off_grid="zeros"`: a zero-padded convolution) or the token's
  own cells (`"self"`: about an edge replicate)."""
  if off_grid not in ("zeros", "self"):
    raise ValueError(f"off_grid={off_grid!r}: expected 'zeros' or 'self'")
  b, length, pt, ph, pw, f = x.shape
  flat = x.reshape(b, length, -1)
  window = gather_neighbours(flat, neighbours)  # [B, L, 9, pt·ph·pw·F], zeros off the grid
  if off_grid == "self":
    window = jnp.where(neighbours[1][..., None], window, flat[:, :, None, :])
  window = window.reshape(b, length, 3, 3, pt, ph, pw, f).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return window.reshape(b, length, pt, 3 * ph, 3 * pw, f)


def cell_windows(x: jax.Array, neighbours: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Per-cell features x [B, L, pt, ph, pw, F] → the 3×3 window of every cell in its frame,
  [B, L, pt, ph, pw, 9, F] in (dh, dw) raster order, across token borders (`cell_canvas`,
  zeros off the example's grid): a contraction of the last two axes is a zero-padded 3×3
  convolution over each frame's cells (`video_dit.CellHead`)."""
  ph, pw = x.shape[3], x.shape[4]
  canvas = cell_canvas(x, neighbours)
  taps = [
    canvas[:, :, :, ph + dh : 2 * ph + dh, pw + dw : 2 * pw + dw]
    for dh in (-1, 0, 1)
    for dw in (-1, 0, 1)
  ]
  return jnp.stack(taps, axis=-2)


def example_mean(patches: jax.Array, segment_ids: jax.Array, channels: int) -> jax.Array:
  """[B, L, P] patches (P = pixels·`channels`, channels last) → [B, L, C]: the mean value per
  channel over all the pixels of each token's example; 0 for padding."""
  b, length, p = patches.shape
  per_token = patches.reshape(b, length, p // channels, channels).mean(axis=2)  # [B, L, C]

  def row(x, seg):
    total = jax.ops.segment_sum(x, seg, num_segments=length + 1)
    count = jax.ops.segment_sum(jnp.ones_like(seg, x.dtype), seg, num_segments=length + 1)
    return (total / jnp.maximum(count, 1.0)[:, None])[seg]

  return jax.vmap(row)(per_token, segment_ids) * (segment_ids > 0)[..., None].astype(patches.dtype)


class GridDepthwiseConv(nn.Module):
  """A depthwise convolution over each example's (t, h, w) grid of packed tokens: [B, L, D] →
  [B, L, D], one weight per neighbour and channel, zero-initialised (a residual branch starts
  as nothing). `neighbours` = `grid_neighbours(...)` of the kernel."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, neighbours: tuple[jax.Array, jax.Array]) -> jax.Array:
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, EMBED)),
      (neighbours[0].shape[-1], x.shape[-1]),
      self.param_dtype,
    )
    window = gather_neighbours(x, neighbours)  # [B, L, N, D]
    return jnp.einsum("blnd,nd->bld", window, kernel.astype(self.dtype))


def positions_in_segment(segment_ids: jax.Array) -> jax.Array:
  """Index of each token inside its (contiguous) segment: [B, M] int32 -> [B, M] int32."""
  m = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start_index = jax.lax.cummax(jnp.where(starts, m, 0), axis=1)
  return m - start_index


# ------------------------------------------------------------------------------------------
# Attention.
# ------------------------------------------------------------------------------------------


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_segment_ids: jax.Array,
  kv_segment_ids: jax.Array,
  *,
  backend: str = "xla",
  bias: jax.Array | None = None,
  length_axis: str | None = None,
) -> jax.Array:
  """Scaled dot-product attention that never crosses segments (NaViT "Patch n' Pack").

  q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; q_segment_ids: [B, Lq]; kv_segment_ids: [B, Lk].
  Query i sees key j iff `q_segment_ids[i] == kv_segment_ids[j]` (padding 0 sees padding 0).
  A query with no visible key (e.g. a padding video token when the text row has no padding)
  returns 0, with zero gradient, never NaN. Returns [B, Lq, H, Dh]. Every backend computes the
  same function (Lq != Lk included); `splash` skips the blocks that cross examples.
  `bias` ([B, H, Lq, Lk], added to the logits; `locality_bias`) needs the "xla" backend.
  `length_axis`: the queries' logical length axis; under a mesh `splash` splits the queries
  over its mesh axes (the `xla` backend follows the constraints around it).
  """
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(
      f"attention backend={backend!r} is not available; expected one of {ATTENTION_BACKENDS}"
    )
  if bias is not None and backend != "xla":
    raise ValueError(f"an attention bias (locality) needs backend='xla', not {backend!r}")
  if backend == "splash":
    names = dict(batch_axis=BATCH, heads_axis=HEADS, length_axis=length_axis)
    return splash.sharded_splash_attention(q, k, v, q_segment_ids, kv_segment_ids, **names)
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, Lq, Lk]
  if backend == "xla":
    return masked_attention(q, k, v, mask, bias)
  if jax.default_backend() != "gpu":
    raise ValueError(
      f"attention backend='cudnn' needs a GPU, but JAX runs on {jax.default_backend()!r}; "
      "use 'xla' (any device) or 'splash' (TPU)"
    )
  # cuDNN flash attention takes fp16/bf16 only: fp32 inputs run in bf16 and come back fp32.
  dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  q_, k_, v_ = (a.astype(dtype) for a in (q, k, v))
  out = jax.nn.dot_product_attention(q_, k_, v_, mask=mask[:, None], implementation="cudnn")
  # Fully masked rows came out as a uniform average of v: zero them (and their gradients).
  has_key = jnp.any(mask, axis=-1)[:, :, None, None]  # [B, Lq, 1, 1]
  return jnp.where(has_key, out.astype(q.dtype), jnp.zeros_like(q))


def masked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
  """softmax(q·kᵀ/√Dh + bias, masked)·v as two einsums and a softmax carried in fp32 (the "xla"
  backend). q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; mask: [B, Lq, Lk] bool; bias:
  [B, H, Lq, Lk] or None. A query with no visible key gets 0 and zero gradients (its masked
  probabilities are zeroed, not renormalised). Forward + backward run 1.5–1.8× faster on CPU
  than `jax.nn.dot_product_attention(implementation="xla")` at the demo's shapes (4 rows × 144
  tokens, 4 heads of 32; BENCHMARKS.md), whose results it reproduces."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  visible = mask[:, None]  # [B, 1, Lq, Lk]
  probs = jax.nn.softmax(jnp.where(visible, logits, jnp.finfo(jnp.float32).min), axis=-1)
  probs = jnp.where(visible, probs, 0.0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def locality_bias(positions: jax.Array, slopes: jax.Array) -> jax.Array:
  """−slope_h · ‖p_i − p_j‖ for every pair of tokens: [B, L, A] positions (e.g. (t, h, w) in
  patches), [H] slopes → [B, H, L, L] logit bias. 2-D/3-D ALiBi (Press et al. 2022): a head with
  a large slope attends to its neighbours from the first step, one with slope 0 globally."""
  p = positions.astype(jnp.float32)
  dist = jnp.sqrt(jnp.sum((p[:, :, None, :] - p[:, None, :, :]) ** 2, axis=-1))  # [B, L, L]
  return -slopes[None, :, None, None] * dist[:, None]


# ------------------------------------------------------------------------------------------
# Dense layers and small modules.
# ------------------------------------------------------------------------------------------


class Dense(nn.Module):
  """A dense layer whose kernel keeps its full rank and carries logical `axes`.

  Contracts the input `axis` (default: last) into `features`. `nn.DenseGeneral` initializes a
  flattened 2-D kernel, which breaks logical sharding constraints of rank > 2 under a mesh;
  here the kernel is created at its real shape `[*in, *out]`. Xavier-uniform over the
  flattened fan-in/fan-out (as in DiT), zeros (`zero_init`), or `kernel_init`; the bias is zero.
  """

  features: tuple[int, ...]
  axes: Axes  # logical names of the kernel: contracted inputs, then outputs
  axis: tuple[int, ...] = (-1,)
  zero_init: bool = False
  kernel_init: Callable | None = None  # (key, shape, dtype) -> kernel; overrides the default
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(a % x.ndim for a in self.axis)
    n_in, n_out = len(axis), len(self.features)
    if len(self.axes) != n_in + n_out:
      raise ValueError(f"axes={self.axes} must name {n_in} input and {n_out} output dims")
    if self.zero_init:
      init = nn.initializers.zeros_init()
    elif self.kernel_init is not None:
      init = self.kernel_init
    else:
      init = nn.initializers.variance_scaling(
        1.0,
        "fan_avg",
        "uniform",
        in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + n_out)),
      )
    shape = tuple(x.shape[a] for a in axis) + tuple(self.features)
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, self.axes), shape, self.param_dtype
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n_in:]),
      tuple(self.features),
      self.param_dtype,
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
    return y + bias


def dense(
  features: int | tuple[int, ...],
  axes: Axes,
  *,
  axis: int | tuple[int, ...] = -1,
  zero_init: bool = False,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> Dense:
  """`Dense` contracting `axis` into `features` (ints or tuples), kernel axes `axes`."""
  return Dense(
    features=tuple(features) if isinstance(features, tuple) else (features,),
    axes=tuple(axes),
    axis=tuple(axis) if isinstance(axis, tuple) else (axis,),
    zero_init=zero_init,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def layer_norm(
  *,
  affine: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype=jnp.float32,
  name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm over EMBED (eps 1e-6 as in DiT); `affine=False` for adaLN-modulated norms."""
  return nn.LayerNorm(
    epsilon=1e-6,
    use_scale=affine,
    use_bias=affine,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (EMBED,)),
    name=name,
  )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x·(1 + scale) + shift (DiT, Sec. 3.2); all [B, L, D]."""
  return x * (1 + scale) + shift


class MultiHeadAttention(nn.Module):
  """Multi-head self- or cross-attention over packed rows (Vaswani et al. 2017, Sec. 3.2).

  Self-attention when `context` is None. Optional QK-norm (RMSNorm of q and k per head,
  Dehghani et al. 2023 "ViT-22B", Sec. 3.1) stabilizes large models. With `positions`
  ([B, L, A] coordinates, e.g. (t, h, w)), q and k get rotary embeddings (`posemb.rope`);
  `context_positions` are the keys' coordinates (default: `positions`, self-attention).
  `rope=False` skips the rotary embeddings. `locality` > 0 (self-attention with `positions`)
  adds `locality_bias` with learned per-head slopes, initialised to locality · 4^−h.
  """

  num_heads: int
  qk_norm: bool = False
  zero_init_out: bool = False  # True: the block output starts at 0 (identity residual).
  rope: bool = True  # rotary embeddings of `positions` (when given)
  rope_max_period: float = 10_000.0  # longest RoPE wavelength (in position units)
  locality: float = 0.0  # largest initial slope of the locality bias; 0 = none
  backend: str = "xla"
  length_axis: str = LENGTH  # logical axis of the query length
  kv_length_axis: str | None = None  # of the key length; None = `length_axis`
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x,
    segment_ids,
    context=None,
    context_segment_ids=None,
    positions=None,
    context_positions=None,
  ):
    # x: [B, L, D]; segment_ids: [B, L]; context: [B, M, Dc] or None; ids: [B, M];
    # positions: [B, L, A] or None (no RoPE); context_positions: [B, M, A] or None.
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    if context is None:
      context, context_segment_ids = x, segment_ids
    kv_axis = self.kv_length_axis or self.length_axis

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = (self.num_heads, head_dim)
    q = dense(heads, (EMBED, HEADS, KV), name="query", **kw)(x)  # [B, L, H, Dh]
    k = dense(heads, (EMBED, HEADS, KV), name="key", **kw)(context)  # [B, M, H, Dh]
    v = dense(heads, (EMBED, HEADS, KV), name="value", **kw)(context)  # [B, M, H, Dh]
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(
        epsilon=1e-6,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (KV,)),
        name=name,
        **kw,
      )
      q, k = norm("query_norm")(q), norm("key_norm")(k)
    bias = None
    if positions is not None and self.locality > 0:
      if context_positions is not None:
        raise ValueError("the locality bias is for self-attention (no context_positions)")
      init = lambda key, shape: self.locality * 4.0 ** -jnp.arange(shape[0], dtype=jnp.float32)
      slopes = self.param(
        "locality_slopes", nn.with_logical_partitioning(init, (HEADS,)), (self.num_heads,)
      )
      bias = locality_bias(positions, slopes.astype(jnp.float32))
    if positions is not None and self.rope:
      k_pos = positions if context_positions is None else context_positions
      q = posemb.rope(q, positions, self.rope_max_period)
      k = posemb.rope(k, k_pos, self.rope_max_period)
    q = nn.with_logical_constraint(q, (BATCH, self.length_axis, HEADS, KV))
    k = nn.with_logical_constraint(k, (BATCH, kv_axis, HEADS, KV))
    v = nn.with_logical_constraint(v, (BATCH, kv_axis, HEADS, KV))
    ids = (segment_ids, context_segment_ids)
    out = attention(q, k, v, *ids, backend=self.backend, bias=bias, length_axis=self.length_axis)
    out = nn.with_logical_constraint(out, (BATCH, self.length_axis, HEADS, KV))
    out = dense(
      width, (HEADS, KV, EMBED), axis=(-2, -1), zero_init=self.zero_init_out, name="out", **kw
    )(out)  # [B, L, D]
    return nn.with_logical_constraint(out, (BATCH, self.length_axis, EMBED))


class Mlp(nn.Module):
  """Transformer MLP D -> mlp_ratio·D -> D with tanh-GELU (as in ViT/DiT)."""

  mlp_ratio: float = 4.0
  length_axis: str = LENGTH
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # x: [B, L, D] -> [B, L, D]
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(int(width * self.mlp_ratio), (EMBED, MLP), name="fc1", **kw)(x)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True), (BATCH, self.length_axis, MLP))
    return dense(width, (MLP, EMBED), name="fc2", **kw)(h)


class TimestepEmbedding(nn.Module):
  """Diffusion time t ∈ [0, 1] -> [.., D]: sin-cos of 1000·t, then a 2-layer SiLU MLP.

  As DiT's TimestepEmbedder (Peebles & Xie 2023, Sec. 3.2; 256 frequencies), with the
  continuous flow time scaled to DiT's 0..1000 range.
  """

  width: int
  frequency_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    # t: [B, L] float -> [B, L, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = sincos_1d(1000.0 * t, self.frequency_dim)
    h = nn.silu(dense(self.width, (None, MLP), name="fc1", **kw)(h))
    return dense(self.width, (MLP, EMBED), name="fc2", **kw)(h)


class AdaLNModulation(nn.Module):
  """adaLN-Zero: SiLU -> Dense(D -> n·D), zero-initialized (DiT, Sec. 3.2).

  Returns the n modulation vectors concatenated, [B, L, n·D]; split them with
  `jnp.split(..., n, axis=-1)`. At init every shift/scale/gate is 0, so gated residual
  branches are switched off and the block is the identity.
  """

  n: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c):
    # c: [B, L, D] -> [B, L, n·D]
    return dense(
      self.n * c.shape[-1],
      (EMBED, MLP),
      zero_init=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="proj",
    )(nn.silu(c))


# ------------------------------------------------------------------------------------------
# Depth: scan over blocks, rematerialization, param layout conversion.
# ------------------------------------------------------------------------------------------

REMAT_POLICIES: dict[str, Callable | None] = {
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
REMAT_NAMES = ("none", *REMAT_POLICIES)  # "none": no jax.checkpoint at all


class Runtime(nn.Module, kw_only=True):
  """How a whole model runs, not what it computes: the keyword-only fields every top-level
  model (ViT, NaViT, ViViT, DiT, VideoDiT) and stack of blocks (`vit.Encoder`, `TextEncoder`)
  shares. None of them changes the parameter tree."""

  attention_backend: str = "xla"  # see ATTENTION_BACKENDS
  scan_layers: bool = True  # the blocks as one `nn.scan` (compile once) or unrolled
  remat_policy: str = "none"  # see REMAT_NAMES
  dtype: Any = jnp.float32  # activations
  param_dtype: Any = jnp.float32

  @nn.nowrap
  def block_stack(self, block_cls: type[nn.Module], depth: int, num_broadcast_args: int):
    """`stack_blocks(block_cls, ...)` scanned and rematerialised as this model's fields say."""
    return stack_blocks(
      block_cls,
      depth=depth,
      num_broadcast_args=num_broadcast_args,
      scan=self.scan_layers,
      remat_policy=self.remat_policy,
    )


def stack_blocks(
  block_cls: type[nn.Module],
  *,
  depth: int,
  num_broadcast_args: int,
  scan: bool,
  remat_policy: str,
) -> Callable[..., nn.Module]:
  """Returns a constructor of `depth` blocks: a scanned stack (params [LAYERS, ...]) or a list.

  `block_cls.__call__(carry, *broadcast_args)` must return `(carry, y)`; the stack returns
  `(carry, ys)`, every block's `y` stacked on a leading [depth] axis (None if y is). With
  `scan`, the result is one module (call it with name=...), params get a leading `depth` axis
  named LAYERS; otherwise it builds `depth` modules named `{name}_{i}` applied in order. Both take
  the same params after `unstack_layers` / `stack_layers`.
  """
  if remat_policy not in REMAT_NAMES:
    raise ValueError(f"remat_policy={remat_policy!r} is unknown; expected one of {REMAT_NAMES}")
  block = block_cls
  if remat_policy != "none":
    # prevent_cse is unnecessary (and slower) inside scan (jax.checkpoint docs).
    block = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
  if scan:
    scanned = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * num_broadcast_args,
      length=depth,
      metadata_params={nn.PARTITION_NAME: LAYERS},
    )

    def build_scanned(name: str, **kwargs):
      return scanned(name=name, **kwargs)

    return build_scanned

  def build_unrolled(name: str, **kwargs):
    blocks = [block(name=f"{name}_{i}", **kwargs) for i in range(depth)]

    def apply(x, *args):
      ys = []
      for b in blocks:
        x, y = b(x, *args)
        ys.append(y)
      return x, None if ys[0] is None else jax.tree.map(lambda *y: jnp.stack(y), *ys)

    return apply

  return build_unrolled


def unstack_layers(params: dict, name: str, depth: int) -> dict:
  """Scanned layout {name: [depth, ...]} -> unrolled {name_0: ..., name_{depth-1}: ...}.

  Works on unboxed params (`nn.unbox`) at any nesting level of `params`.
  """
  out = {}
  for key, value in params.items():
    if key == name:
      for i in range(depth):
        out[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    elif isinstance(value, dict):
      out[key] = unstack_layers(value, name, depth)
    else:
      out[key] = value
  return out


def stack_layers(params: dict, name: str, depth: int) -> dict:
  """Inverse of `unstack_layers`: {name_i: ...} -> {name: [depth, ...]}."""
  out = {}
  names: Sequence[str] = [f"{name}_{i}" for i in range(depth)]
  for key, value in params.items():
    if key in names:
      continue
    out[key] = stack_layers(value, name, depth) if isinstance(value, dict) else value
  if names[0] in params:
    out[name] = jax.tree.map(lambda *a: jnp.stack(a), *[params[n] for n in names])
  return out
