"""Block-sparse splash attention over packed rows (TPU Pallas; interpret mode elsewhere).

The recipe of DESIGN.md ("Block-sparse packed attention on TPU"): a *template* splash kernel
is built once per (row length, block size) from a full mask, which fixes the kernel's static
arguments and the shapes of its block metadata. Inside `jit`, the metadata is re-derived from
the segment ids of each row: a (q-block, kv-block) pair is visited only if the two blocks share
a segment id, so blocks that cross examples are skipped; `SegmentIds` then masks element by
element inside the visited blocks. The metadata is O((L/block)²) small ints per row, and every
packing of a row runs the same compiled program.

Differences from the recipe text, and why:
  * Visited blocks are marked "full" (block_mask 2), not "partial" with an all-true mask
    block: the kernel applies `SegmentIds` to every visited block regardless, so the partial
    mask block would only cost a DMA. The metadata then has exactly the template's pytree
    structure (`mask_next`/`partial_mask_blocks` None).
  * Block overlap is decided by per-block bitsets of segment ids (bit `id mod 32`), which is
    exact for ids < 31 and conservative beyond; per-block [min, max] intervals over-count the
    block holding the end of the last example and the padding (ids K and 0).
  * Skipped kv blocks point `data_next` at the last fetched block of their q row (the first
    one before any), so the pipeline revisits instead of re-fetching.

These are private splash internals (jax 0.10.x): `layers.attention` is the only caller, and
tests/test_attention.py compares against the `xla` backend to catch upstream changes.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as smi
from jax.sharding import PartitionSpec

BLOCK = 128  # the kernel's segment-id masking needs blocks that are multiples of 128 lanes
PAD_ID = -1  # segment id of the rows added to reach a multiple of the block size
_BITS = 32


@functools.lru_cache(maxsize=32)
def template_kernel(
  q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool
) -> sk.SplashAttentionKernel:
  """A splash kernel for a full [q_len, kv_len] mask: static kwargs and metadata shapes."""
  sizes = sk.BlockSizes(
    block_q=block_q,
    block_kv=block_kv,
    block_kv_compute=block_kv,
    block_q_dkv=block_q,
    block_kv_dkv=block_kv,
    block_kv_dkv_compute=block_kv,
    block_q_dq=block_q,
    block_kv_dq=block_kv,
  )
  mask = sm.MultiHeadMask((sm.FullMask((q_len, kv_len)),))
  return sk.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _block_bits(segment_ids: jax.Array, block: int) -> jax.Array:
  """Per-block bitset of the segment ids present: [..., L] -> [..., L / block] uint32."""
  bits = jnp.left_shift(jnp.uint32(1), jnp.mod(segment_ids, _BITS).astype(jnp.uint32))
  bits = bits.reshape(*segment_ids.shape[:-1], -1, block)
  return jax.lax.reduce(bits, jnp.uint32(0), jax.lax.bitwise_or, (bits.ndim - 1,))


def block_overlap(
  q_segment_ids: jax.Array, kv_segment_ids: jax.Array, block_q: int, block_kv: int
) -> jax.Array:
  """Which (q-block, kv-block) pairs share a segment id: [B, Lq], [B, Lk] -> [B, nq, nk] bool.

  A superset of the pairs with at least one visible (query, key) pair, never a subset.
  """
  q_bits = _block_bits(q_segment_ids, block_q)  # [B, nq]
  kv_bits = _block_bits(kv_segment_ids, block_kv)  # [B, nk]
  return jnp.bitwise_and(q_bits[:, :, None], kv_bits[:, None, :]) != 0


def _data_next(active: jax.Array, axis: int) -> jax.Array:
  """Index along `axis` of the block to hold in memory at each grid step: the block itself if
  active, else the last active one before it (the first active one if none came before)."""
  n = active.shape[axis]
  shape = [1] * active.ndim
  shape[axis] = n
  index = jnp.arange(n, dtype=jnp.int32).reshape(shape)
  last = jax.lax.cummax(jnp.where(active, index, -1), axis=axis)
  first = jnp.argmax(active, axis=axis, keepdims=True).astype(jnp.int32)
  return jnp.where(last >= 0, last, first)


def _mask_info(template: smi.MaskInfo, active: jax.Array, axis: int) -> smi.MaskInfo:
  """Template metadata with the block mask and fetch order of `active` [nq, nk]."""
  block_mask = jnp.where(active, 2, 0)[None]  # [1, nq, nk]: 2 = run, segment ids mask it
  data_next = _data_next(active, axis)[None]
  return template._replace(
    block_mask=block_mask.astype(template.block_mask.dtype),
    data_next=data_next.astype(template.data_next.dtype),
  )


def _no_key_remap(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """Queries whose segment has no key get the first key's segment, so that no softmax row is
  empty inside the kernel (their outputs are zeroed afterwards). Also returns which queries
  have keys. Both [B, Lq]; O(L log L) by sorting the key ids."""
  sorted_kv = jnp.sort(kv_segment_ids, axis=-1)
  index = jax.vmap(jnp.searchsorted)(sorted_kv, q_segment_ids)
  index = jnp.minimum(index, sorted_kv.shape[-1] - 1)
  has_key = jnp.take_along_axis(sorted_kv, index, axis=-1) == q_segment_ids
  return jnp.where(has_key, q_segment_ids, kv_segment_ids[:, :1]), has_key


def _pad_to(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def block_fraction(
  q_segment_ids: jax.Array, kv_segment_ids: jax.Array, block_q: int = BLOCK, block_kv: int = BLOCK
) -> jax.Array:
  """Fraction of (q-block, kv-block) pairs the kernel computes, per row: [B]."""
  q_seg = _pad_to(q_segment_ids, 1, block_q, PAD_ID)
  kv_seg = _pad_to(kv_segment_ids, 1, block_kv, PAD_ID)
  q_seg, _ = _no_key_remap(q_seg, kv_seg)
  return jnp.mean(block_overlap(q_seg, kv_seg, block_q, block_kv), axis=(1, 2))


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_segment_ids: jax.Array,
  kv_segment_ids: jax.Array,
  *,
  block_q: int = BLOCK,
  block_kv: int = BLOCK,
  interpret: bool | None = None,
) -> jax.Array:
  """Segment-masked attention with the block-sparse splash kernel (same contract as `xla`).

  q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; ids: [B, Lq], [B, Lk]. Lengths are padded to the
  block sizes with segment id −1. Queries without keys return 0 with zero gradient.
  `interpret` defaults to True off TPU (Pallas interpret mode: slow, for tests).
  """
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  for name, size in (("block_q", block_q), ("block_kv", block_kv)):
    if size % BLOCK:
      raise ValueError(f"splash {name}={size} must be a multiple of {BLOCK}")
  lq = q.shape[1]
  q_seg = _pad_to(q_segment_ids.astype(jnp.int32), 1, block_q, PAD_ID)
  kv_seg = _pad_to(kv_segment_ids.astype(jnp.int32), 1, block_kv, PAD_ID)
  q_seg, has_key = _no_key_remap(q_seg, kv_seg)
  scale = 1.0 / math.sqrt(q.shape[-1])
  # The kernel wants heads first and does not scale the logits.
  q = _pad_to(q * jnp.asarray(scale, q.dtype), 1, block_q, 0).transpose(0, 2, 1, 3)
  k = _pad_to(k, 1, block_kv, 0).transpose(0, 2, 1, 3)  # [B, H, Lk', Dh]
  v = _pad_to(v, 1, block_kv, 0).transpose(0, 2, 1, 3)

  template = template_kernel(q.shape[2], k.shape[2], block_q, block_kv, bool(interpret))
  active = block_overlap(q_seg, kv_seg, block_q, block_kv)  # [B, nq, nk]

  def one_row(q, k, v, q_seg, kv_seg, active):
    kernel = sk.SplashAttentionKernel(
      _mask_info(template.fwd_mask_info, active, axis=1),
      _mask_info(template.dq_mask_info, active, axis=1),
      _mask_info(template.dkv_mask_info, active, axis=0),
      **template.kwargs,
    )
    return kernel(q, k, v, segment_ids=sk.SegmentIds(q=q_seg, kv=kv_seg))

  # Per-row metadata is a batched scalar-prefetch operand: Pallas runs vmap as a loop.
  out = jax.vmap(one_row)(q, k, v, q_seg, kv_seg, active)  # [B, H, Lq', Dh]
  out = out.transpose(0, 2, 1, 3)[:, :lq]
  has_key = has_key[:, :lq, None, None]
  return jnp.where(has_key, out, jnp.zeros_like(out))


def sharded_splash_attention(
  q,
  k,
  v,
  q_segment_ids,
  kv_segment_ids,
  *,
  batch_axis: str,
  heads_axis: str,
  length_axis: str | None = None,
) -> jax.Array:
  """`splash_attention` per device: rows over the mesh axes of the logical `batch_axis`, heads
  over those of `heads_axis`, queries over those of `length_axis` (the logical rules in
  context, as `nn.logical_axis_rules`).

  A Pallas kernel is opaque to the SPMD partitioner, so under a mesh (`jax.set_mesh`) it runs in
  `shard_map`. The keys and values are gathered and each device attends its share of the
  queries to the whole row: all-gather sequence parallelism, as the `xla` backend's (the
  gradients of the keys and values are summed over the query shards). A dimension the mesh
  axes do not divide is replicated. Without a mesh it is `splash_attention`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)

  def mesh_axes(logical: str, size: int):
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    n = math.prod(mesh.shape[name] for name in names)
    return axes if names and size % n == 0 else None

  rows, heads = mesh_axes(batch_axis, q.shape[0]), mesh_axes(heads_axis, q.shape[2])
  length = mesh_axes(length_axis, q.shape[1]) if length_axis else None
  names = lambda a: set() if a is None else {a} if isinstance(a, str) else set(a)
  if names(length) & (names(rows) | names(heads)):  # a mesh axis can split one dimension only
    length = None
  q_spec, kv_spec = PartitionSpec(rows, length, heads, None), PartitionSpec(rows, None, heads, None)
  return jax.shard_map(
    splash_attention,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(rows, length), PartitionSpec(rows, None)),
    out_specs=q_spec,
    check_vma=False,
  )(q, k, v, q_segment_ids, kv_segment_ids)


def ideal_fraction(segment_ids: np.ndarray) -> float:
  """Σ Lᵢ² / L² over the examples (and padding) of one row: the element-level density."""
  _, counts = np.unique(np.asarray(segment_ids), return_counts=True)
  return float(np.sum(counts.astype(np.float64) ** 2) / len(segment_ids) ** 2)
