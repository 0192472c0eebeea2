"""Attention backends agree (values and gradients), block sparsity, and position encodings.

`splash` runs in Pallas interpret mode on CPU: the same kernel code and block metadata as on
TPU, so these tests catch upstream changes of the (private) splash internals.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from vdit import axes, sharding
from vdit.models import layers, posemb, splash
from vdit.tools.bench import attention as bench_attention


def packed_ids(lengths_per_row, total):
  """[B, total] segment ids: row b holds examples of the given lengths, then padding (0)."""
  return jnp.asarray(bench_attention.packed_ids(lengths_per_row, total))


def qkv(b, lq, lk, heads=2, dh=16, seed=0):
  r = np.random.default_rng(seed)
  make = lambda n: jnp.asarray(r.normal(size=(b, n, heads, dh)), jnp.float32)  # noqa: E731
  return make(lq), make(lk), make(lk)


def loss_and_grads(backend, q, k, v, q_ids, kv_ids):
  def f(q, k, v):
    return jnp.sum(jnp.sin(layers.attention(q, k, v, q_ids, kv_ids, backend=backend)))

  out = jax.jit(lambda q, k, v: layers.attention(q, k, v, q_ids, kv_ids, backend=backend))
  return out(q, k, v), jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)


def assert_backends_agree(q, k, v, q_ids, kv_ids, atol=1e-5):
  out_x, grads_x = loss_and_grads("xla", q, k, v, q_ids, kv_ids)
  out_s, grads_s = loss_and_grads("splash", q, k, v, q_ids, kv_ids)
  np.testing.assert_allclose(out_s, out_x, atol=atol)
  for gs, gx in zip(grads_s, grads_x):
    assert np.all(np.isfinite(gs))
    np.testing.assert_allclose(gs, gx, atol=atol)
  return out_s, grads_s


def test_xla_backend_matches_jax_dot_product_attention():
  # The "xla" backend is its own two einsums and softmax (faster on CPU): values and gradients
  # equal jax.nn.dot_product_attention's, with a logit bias and queries that see no key.
  q_ids = packed_ids([[50, 30], [70]], 90)
  kv_ids = jnp.asarray(np.array([[1] * 20 + [2] * 10 + [0] * 10, [1] * 40], np.int32))
  q, k, v = qkv(2, 90, 40, seed=2)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 90, 40)), jnp.float32)
  mask = q_ids[:, :, None] == kv_ids[:, None, :]

  def ours(q, k, v):
    return layers.attention(q, k, v, q_ids, kv_ids, bias=bias)

  def reference(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask[:, None])
    return jnp.where(jnp.any(mask, -1)[:, :, None, None], out, 0.0)

  out = np.asarray(ours(q, k, v))
  np.testing.assert_array_equal(out[1, 70:], 0.0)  # row 1's padding queries: no padding key
  assert np.abs(out[1, :70]).min() > 0
  np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)  # noqa: E731
  for g_ours, g_ref in zip(grad(ours), grad(reference)):
    assert np.all(np.isfinite(g_ours))
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-5)


def test_splash_self_attention_matches_xla_on_packed_rows():
  # 300 tokens: padded to 384 inside (3 blocks of 128); examples straddle block borders.
  ids = packed_ids([[100, 80, 110], [250]], 300)
  q, k, v = qkv(2, 300, 300)
  assert_backends_agree(q, k, v, ids, ids)


def test_splash_cross_attention_with_keyless_queries():
  # Video queries [B, 260] against text keys [B, 40]: row 0's third example has no caption and
  # the text row has no padding, so those queries and the video padding see no key at all.
  q_ids = packed_ids([[90, 90, 60], [200]], 260)
  kv_ids = jnp.asarray(np.array([[1] * 25 + [2] * 15, [1] * 30 + [0] * 10], np.int32))
  q, k, v = qkv(2, 260, 40, seed=1)
  out, grads = assert_backends_agree(q, k, v, q_ids, kv_ids)
  np.testing.assert_array_equal(out[0, 180:], 0.0)
  np.testing.assert_array_equal(grads[0][0, 180:], 0.0)
  assert np.abs(np.asarray(out[0, :180])).min() > 0


def test_splash_compiles_once_for_every_packing():
  f = jax.jit(lambda q, k, v, ids: splash.splash_attention(q, k, v, ids, ids))
  q, k, v = qkv(1, 256, 256)
  for lengths in ([[256]], [[10, 20, 30]], [[128, 100]]):
    ids = packed_ids(lengths, 256)
    np.testing.assert_allclose(
      f(q, k, v, ids), layers.attention(q, k, v, ids, ids), atol=1e-5, err_msg=str(lengths)
    )
  assert f._cache_size() == 1


def test_block_metadata_skips_blocks_across_examples():
  # Two examples of 256 in a 512 row, 128-blocks: only the two diagonal 2×2 groups run.
  ids = packed_ids([[256, 256]], 512)
  active = np.asarray(splash.block_overlap(ids, ids, 128, 128)[0])
  np.testing.assert_array_equal(active, np.kron(np.eye(2), np.ones((2, 2))).astype(bool))
  np.testing.assert_allclose(splash.block_fraction(ids, ids), [0.5])
  # Fetch order: a skipped block holds the last fetched kv block of its row (no re-fetch).
  np.testing.assert_array_equal(
    np.asarray(splash._data_next(jnp.asarray(active), axis=1)),
    [[0, 1, 1, 1]] * 2 + [[2, 2, 2, 3]] * 2,
  )
  # Six examples and padding in a 1024 row: exactly the blocks holding a visible pair run.
  ids = packed_ids([[300, 200, 180, 150, 100, 60]], 1024)
  row = np.asarray(ids[0])
  visible = (row[:, None] == row[None, :]).reshape(8, 128, 8, 128).any(axis=(1, 3))
  active = np.asarray(splash.block_overlap(ids, ids, 128, 128)[0])
  np.testing.assert_array_equal(active, visible)
  fraction = float(splash.block_fraction(ids, ids)[0])
  assert splash.ideal_fraction(row) <= fraction == visible.mean() < 0.5


@pytest.mark.parametrize(
  "shape", [(2, 2, 1, 2), (1, 1, 4, 2)], ids=["data2-fsdp2-tensor2", "seq4-tensor2"]
)
def test_splash_under_a_mesh_matches_xla(shape):
  """Rows, heads and (with a `sequence` axis) the queries split over the mesh: values and the
  gradients of q, k and v (summed over the query shards) equal the unsharded `xla` ones."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(shape), sharding.MESH_AXES)
  ids = packed_ids([[100, 28], [128], [64, 64], [50]], 128)
  q, k, v = qkv(4, 128, 128, heads=2, seed=2)
  split = dict(backend="splash", length_axis=axes.LENGTH)

  def loss(q, k, v, **kw):
    return jnp.sum(jnp.sin(layers.attention(q, k, v, ids, ids, **kw)))

  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    out = jax.jit(lambda q, k, v: layers.attention(q, k, v, ids, ids, **split))(q, k, v)
    grads = jax.jit(jax.grad(functools.partial(loss, **split), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(out, layers.attention(q, k, v, ids, ids), atol=1e-5)
  for got, want in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cudnn_backend_errors_clearly_off_gpu():
  q, k, v = qkv(1, 8, 8)
  ids = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="backend='cudnn' needs a GPU.*'cpu'"):
    layers.attention(q, k, v, ids, ids, backend="cudnn")


def test_splash_block_size_error_names_value():
  q, k, v = qkv(1, 128, 128)
  ids = jnp.ones((1, 128), jnp.int32)
  with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
    splash.splash_attention(q, k, v, ids, ids, block_q=64)


# ------------------------------------------------------------------------------------------
# Position encodings.
# ------------------------------------------------------------------------------------------


def test_sincos_2d_is_dits_w_first_layout():
  pos = jnp.array([[2, 5]])  # (h, w)
  emb = np.asarray(posemb.sincos_2d(pos, 16))[0]
  omega = 1.0 / 10_000 ** (np.arange(4) / 4)
  want = np.concatenate(
    [np.sin(5 * omega), np.cos(5 * omega), np.sin(2 * omega), np.cos(2 * omega)]
  )
  np.testing.assert_allclose(emb, want, atol=1e-6)
  with pytest.raises(ValueError, match="dim=6"):
    posemb.sincos_2d(pos, 6)


def test_rope_depends_only_on_relative_positions():
  r = np.random.default_rng(0)
  q, k = (jnp.asarray(r.normal(size=(1, 1, 1, 24)), jnp.float32) for _ in range(2))
  assert posemb.rope_split(24) == (8, 8, 8)

  def score(pq, pk):
    a = posemb.rope(q, jnp.asarray([[pq]]))
    b = posemb.rope(k, jnp.asarray([[pk]]))
    return float(jnp.sum(a * b))

  base = score((1, 2, 3), (4, 0, 7))
  np.testing.assert_allclose(
    score((6, 12, 8), (9, 10, 12)), base, rtol=1e-4
  )  # shifted by (5, 10, 5)
  assert abs(score((1, 2, 3), (4, 1, 7)) - base) > 1e-3  # a different offset changes it
  # A rotation: norms are kept.
  rot = posemb.rope(q, jnp.asarray([[[3, 1, 4]]]))
  np.testing.assert_allclose(jnp.linalg.norm(rot), jnp.linalg.norm(q), rtol=1e-5)


def test_attention_module_applies_rope_with_positions():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 16)), jnp.float32)
  ids = jnp.ones((1, 6), jnp.int32)
  pos = jnp.asarray(np.stack([np.zeros(6), np.arange(6), np.arange(6)[::-1]], -1)[None], jnp.int32)
  mha = layers.MultiHeadAttention(num_heads=2)
  params = mha.init(jax.random.key(0), x, ids)
  plain = mha.apply(params, x, ids)
  rotated = mha.apply(params, x, ids, positions=pos)
  assert np.abs(np.asarray(plain - rotated)).max() > 1e-3
  # Translating every position leaves attention unchanged.
  np.testing.assert_allclose(mha.apply(params, x, ids, positions=pos + 7), rotated, atol=1e-5)
  assert nn.get_partition_spec(params)  # params still carry logical names


def test_locality_bias_is_distance_times_slope_and_makes_heads_local():
  pos = jnp.asarray([[[0, 0, 0], [0, 0, 1], [0, 3, 4], [1, 0, 0]]], jnp.int32)  # [1, 4, 3]
  bias = layers.locality_bias(pos, jnp.asarray([2.0, 0.0]))
  assert bias.shape == (1, 2, 4, 4)
  np.testing.assert_allclose(bias[0, 0, 0], [0.0, -2.0, -10.0, -2.0], atol=1e-6)
  np.testing.assert_allclose(bias[0, 1], 0.0)  # slope 0: a global head
  # A steep slope: every query attends to itself (distance 0), never to another example.
  q, k, v = qkv(1, 4, 4)
  ids = jnp.asarray([[1, 1, 2, 2]])
  out = layers.attention(q, k, v, ids, ids, bias=layers.locality_bias(pos, jnp.full(2, 1e3)))
  np.testing.assert_allclose(out, v, atol=1e-5)
  with pytest.raises(ValueError, match="backend='xla'"):
    layers.attention(q, k, v, ids, ids, backend="splash", bias=bias)


def test_attention_module_locality_without_rope():
  """`locality` adds learned per-head slopes (init locality·4^−h); with `rope=False` the
  positions enter only through that bias, so translating them changes nothing either."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 16)), jnp.float32)
  ids = jnp.ones((1, 6), jnp.int32)
  pos = jnp.asarray(np.stack([np.zeros(6), np.arange(6) // 3, np.arange(6) % 3], -1)[None])
  mha = layers.MultiHeadAttention(num_heads=2, rope=False, locality=2.0)
  params = mha.init(jax.random.key(0), x, ids, positions=pos)
  np.testing.assert_allclose(params["params"]["locality_slopes"].value, [2.0, 0.5])
  local = mha.apply(params, x, ids, positions=pos)
  assert np.abs(np.asarray(local - mha.apply(params, x, ids))).max() > 1e-3
  np.testing.assert_allclose(mha.apply(params, x, ids, positions=pos + 5), local, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(mha.apply(p, x, ids, positions=pos) ** 2))(params)
  assert np.abs(np.asarray(grads["params"]["locality_slopes"].value)).max() > 0  # learned
