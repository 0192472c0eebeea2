"""Invariants of the model layers: masked attention, packing, scan vs unrolled, adaLN-Zero."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vdit import segments  # noqa: E402
from vdit.models import layers, posemb  # noqa: E402
from vdit.models.text import TextEncoder  # noqa: E402
from vdit.models.video_dit import DiTBlock, VideoDiT, decode_variant  # noqa: E402

P, L, M, K = 12, 64, 16, 3
TINY = dict(
  patch_dim=P,
  width=32,
  depth=2,
  num_heads=4,
  text_width=32,
  text_depth=2,
  text_heads=4,
  vocab_size=40,
  num_classes=5,
)


# ------------------------------------------------------------------------------------------
# Attention.
# ------------------------------------------------------------------------------------------


def reference_attention(q, k, v, q_seg, kv_seg):
  """Loop over rows and queries; softmax over the keys of the same segment only."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      keys = np.nonzero(np.asarray(kv_seg[b]) == int(q_seg[b, i]))[0]
      if keys.size == 0:
        continue
      logits = np.einsum("hd,jhd->hj", q[b, i], k[b, keys]) / np.sqrt(q.shape[-1])
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, i] = np.einsum("hj,jhd->hd", p, v[b, keys])
  return out


def attention_inputs(seed=0):
  r = np.random.default_rng(seed)
  q = r.normal(size=(2, 12, 2, 4)).astype(np.float32)
  k = r.normal(size=(2, 10, 2, 4)).astype(np.float32)
  v = r.normal(size=(2, 10, 2, 4)).astype(np.float32)
  # Row 0: query segment 3 and the query padding have no keys (keys have no padding).
  q_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0], [1] * 5 + [2] * 5 + [0] * 2], np.int32)
  kv_seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 2, 0, 0, 0]], np.int32)
  return q, k, v, q_seg, kv_seg


def test_attention_matches_per_segment_loop():
  q, k, v, q_seg, kv_seg = attention_inputs()
  out = layers.attention(q, k, v, q_seg, kv_seg, backend="xla")
  np.testing.assert_allclose(out, reference_attention(q, k, v, q_seg, kv_seg), atol=2e-6)


def test_attention_rows_without_keys_are_zero_with_finite_gradients():
  q, k, v, q_seg, kv_seg = attention_inputs(1)
  out = layers.attention(q, k, v, q_seg, kv_seg)
  np.testing.assert_array_equal(out[0, 7:], 0.0)  # segment 3 and padding: no keys
  assert np.abs(np.asarray(out[0, :7])).min() > 0  # the others are not zeroed
  f = lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, q_seg, kv_seg)))
  grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(grads[0][0, 7:], 0.0)
  assert np.abs(grads[0][0, :7]).max() > 0


def test_attention_unknown_backend_names_choices():
  q, k, v, q_seg, kv_seg = attention_inputs()
  with pytest.raises(ValueError, match="backend='flash'.*xla"):
    layers.attention(q, k, v, q_seg, kv_seg, backend="flash")


# ------------------------------------------------------------------------------------------
# Small layers.
# ------------------------------------------------------------------------------------------


def test_sincos_3d_matches_formula_on_any_grid():
  dim = 32  # t gets 12, h and w 10 each
  pos = jnp.array([[[0, 0, 0], [3, 7, 100]], [[3, 7, 100], [1, 2, 3]]], jnp.int32)
  emb = layers.sincos_3d(pos, dim)
  assert emb.shape == (2, 2, dim)
  np.testing.assert_array_equal(emb[0, 1], emb[1, 0])  # same position, any row or grid

  def one_d(p, d):
    omega = 10_000.0 ** (-np.arange(d // 2) / (d // 2))
    return np.concatenate([np.sin(p * omega), np.cos(p * omega)])

  want = np.concatenate([one_d(3, 12), one_d(7, 10), one_d(100, 10)])
  np.testing.assert_allclose(emb[0, 1], want, atol=1e-4)
  with pytest.raises(ValueError, match="dim=7"):
    layers.sincos_3d(pos, 7)


def test_per_token_and_positions_in_segment():
  seg = jnp.array([[1, 1, 2, 2, 2, 0, 3]])
  np.testing.assert_array_equal(
    segments.per_token(jnp.array([[10, 20, 30]]), seg), [[10, 10, 20, 20, 20, 10, 30]]
  )
  np.testing.assert_array_equal(layers.positions_in_segment(seg), [[0, 1, 0, 1, 2, 0, 0]])


# ------------------------------------------------------------------------------------------
# VideoDiT on packed rows.
# ------------------------------------------------------------------------------------------


def perturb(params, seed, scale=0.1):
  """Adds normal noise to every parameter so zero-initialized paths become active."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [a + scale * jax.random.normal(key, a.shape, a.dtype) for a, key in zip(leaves, keys)]
  )


def assert_trees_close(a, b, rtol=1e-4):
  """Leafwise ‖a − b‖ ≤ rtol·‖b‖ (fp32 reassociation), with a floor of 1e-6 × the largest
  entry of `b` for leaves that are 0 in exact arithmetic (e.g. the key-bias gradient)."""
  floor = 1e-6 * max(float(np.abs(y).max()) for y in jax.tree.leaves(b))

  def check(path, x, y):
    err, ref = float(np.linalg.norm(x - y)), float(np.linalg.norm(y))
    assert err <= rtol * ref + floor, f"{jax.tree_util.keystr(path)}: |diff|={err}, |ref|={ref}"

  jax.tree_util.tree_map_with_path(check, a, b)


def grid_positions(shape):
  t, h, w = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  return np.stack([t, h, w], -1).reshape(-1, 3)


def packed_rows(rows, seed=0):
  """rows: list of rows, each a list of (grid shape, caption ids, label). Returns a batch."""
  r = np.random.default_rng(seed)
  b = len(rows)
  batch = dict(
    x=np.zeros((b, L, P), np.float32),
    t=np.zeros((b, L), np.float32),
    positions=np.zeros((b, L, 3), np.int32),
    segment_ids=np.zeros((b, L), np.int32),
    text_tokens=np.zeros((b, M), np.int32),
    text_segment_ids=np.zeros((b, M), np.int32),
    labels=np.full((b, K), -1, np.int32),
  )
  for i, row in enumerate(rows):
    n = m = 0
    for j, (shape, caption, label, patches, t) in enumerate(row):
      size = int(np.prod(shape))
      batch["x"][i, n : n + size] = patches
      batch["t"][i, n : n + size] = t
      batch["positions"][i, n : n + size] = grid_positions(shape)
      batch["segment_ids"][i, n : n + size] = j + 1
      batch["text_tokens"][i, m : m + len(caption)] = caption
      batch["text_segment_ids"][i, m : m + len(caption)] = j + 1
      batch["labels"][i, j] = label
      n, m = n + size, m + len(caption)
    batch["x"][i, n:] = r.normal(size=(L - n, P))  # padding content must not matter
  return {key: jnp.asarray(v) for key, v in batch.items()}


def examples(seed=0):
  r = np.random.default_rng(seed)
  shapes = [(2, 3, 4), (1, 4, 4), (3, 2, 2)]  # 24 + 16 + 12 = 52 tokens of 64
  captions = [[1, 5, 9], [1, 7, 8, 11, 3], [2]]
  labels = [3, -1, 0]
  times = [0.1, 0.5, 0.9]
  return [
    (s, c, lab, r.normal(size=(int(np.prod(s)), P)).astype(np.float32), t)
    for s, c, lab, t in zip(shapes, captions, labels, times)
  ]


def apply(model, params, batch):
  return model.apply(
    params,
    batch["x"],
    batch["t"],
    batch["positions"],
    batch["segment_ids"],
    batch["text_tokens"],
    batch["text_segment_ids"],
    batch["labels"],
  )


def assert_packed_equals_alone(model, params, ex):
  """Row 0 packs the examples `ex`; rows 1.. hold one each: every example's output is the same."""
  out = jax.jit(lambda p, b: apply(model, p, b))(params, packed_rows([ex] + [[e] for e in ex]))
  n = 0
  for j, e in enumerate(ex):
    size = int(np.prod(e[0]))
    np.testing.assert_allclose(out[0, n : n + size], out[j + 1, :size], atol=1e-5, rtol=1e-5)
    n += size
  assert np.abs(np.asarray(out[0, :n])).std() > 1e-2  # not trivially zero


@pytest.fixture(scope="module")
def tiny():
  model = VideoDiT(**TINY)
  batch = packed_rows([examples()])
  params = jax.jit(lambda r: nn.unbox(model.init(r, *list(batch.values()))))(jax.random.key(0))
  return model, params


def test_packed_row_equals_each_example_alone(tiny):
  model, params = tiny
  params = perturb(params, 1)
  ex = examples()
  # Row 0 packs the three examples; rows 1..3 hold one example each.
  assert_packed_equals_alone(model, params, ex)


def test_grid_neighbours_are_a_zero_padded_convolution_window():
  """Gathering each token's (3, 3, 3) neighbours in a packed row gives, per example, exactly
  the windows of its zero-padded (t, h, w) grid; padding tokens have none."""
  ex = examples()
  batch = packed_rows([ex])
  index, valid = layers.grid_neighbours(batch["positions"], batch["segment_ids"], (3, 3, 3))
  gathered = np.asarray(batch["x"][0][index[0]] * valid[0][..., None])  # [L, 27, P]
  n = 0
  for shape, _, _, patches, _ in ex:
    size = int(np.prod(shape))
    padded = np.pad(patches.reshape(*shape, P), [(1, 1)] * 3 + [(0, 0)])
    for i, (t, h, w) in enumerate(grid_positions(shape)):
      window = padded[t : t + 3, h : h + 3, w : w + 3].reshape(27, P)
      np.testing.assert_array_equal(gathered[n + i], window)
    n += size
  assert not np.asarray(valid[0, n:]).any()
  with pytest.raises(ValueError, match="odd"):
    layers.grid_neighbours(batch["positions"], batch["segment_ids"], (2, 3, 3))


def test_local_options_keep_packing_exact():
  """With the convolutional patch embedding, the blocks' and the output's convolutions, RoPE and
  the locality bias, a packed row still equals each example alone: none of them reaches across
  examples or into padding."""
  local = dict(patch_context=(3, 3, 3), mlp_context=(3, 3, 3), output_context=(1, 3, 3))
  model = VideoDiT(**TINY, **local, rope=True, rope_max_period=50.0, locality=1.0)
  ex = examples()
  inputs = list(packed_rows([ex]).values())
  params = jax.jit(lambda r: nn.unbox(model.init(r, *inputs)))(jax.random.key(0))
  p = params["params"]
  assert p["patch_conv"]["kernel"].shape == (27, P, TINY["width"])
  assert p["blocks"]["mlp_conv"]["kernel"].shape == (TINY["depth"], 27, TINY["width"])
  assert p["final"]["conv"]["kernel"].shape == (9, TINY["width"], P)
  assert_packed_equals_alone(model, perturb(params, 2), ex)


def test_center_input_sees_patches_relative_to_their_examples_mean():
  """`center_input`: a constant added per channel to one example's patches reaches the blocks
  only through the mean's own embedding (zero it and the output does not move), packing stays
  exact, and the mean is per example and per channel."""
  channels = 3  # P = 2·2·2·3 = 24 in TINY: 8 pixels of 3 channels
  model = VideoDiT(**TINY, center_input=True, channels=channels, patch_context=(3, 3, 3))
  ex = examples()
  batch = packed_rows([ex])
  mean = layers.example_mean(batch["x"], batch["segment_ids"], channels)
  n = int(np.prod(ex[0][0]))
  expected = ex[0][3].reshape(n, -1, channels).mean(axis=(0, 1))
  np.testing.assert_allclose(mean[0, :n], np.broadcast_to(expected, (n, channels)), atol=1e-6)
  assert not np.asarray(mean[0, 52:]).any()  # padding
  params = jax.jit(lambda r: nn.unbox(model.init(r, *list(batch.values()))))(jax.random.key(0))
  params = perturb(params, 3)
  assert_packed_equals_alone(model, params, ex)
  shift = np.tile(np.asarray([0.7, -0.4, 0.2], np.float32), P // channels)
  moved = [(s, c, lab, x + shift, t) if i == 0 else (s, c, lab, x, t) for i, (s, c, lab, x, t)
           in enumerate(ex)]  # fmt: skip
  out, out_moved = (np.asarray(apply(model, params, packed_rows([e]))) for e in (ex, moved))
  assert np.abs(out_moved[0, :n] - out[0, :n]).max() > 1e-3  # the mean is read
  np.testing.assert_allclose(out_moved[0, n:], out[0, n:], atol=1e-5)  # other examples: not
  no_mean = jax.tree_util.tree_map(lambda x: x, params)
  no_mean["params"]["mean_embed"]["kernel"] = jnp.zeros_like(
    params["params"]["mean_embed"]["kernel"]
  )
  a, b = (np.asarray(apply(model, no_mean, packed_rows([e]))) for e in (ex, moved))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_place_ids_group_each_place_along_time():
  """`segments.place_ids`: tokens share an id iff they are one example's at one (h, w), in any
  patch-frame; padding is 0."""
  batch = packed_rows([examples()])
  seg, pos = np.asarray(batch["segment_ids"][0]), np.asarray(batch["positions"][0])
  ids = np.asarray(segments.place_ids(batch["segment_ids"], batch["positions"]))[0]
  assert (ids[seg == 0] == 0).all() and (ids[seg > 0] > 0).all()
  real = np.flatnonzero(seg > 0)
  for i in real:
    same = (seg[real] == seg[i]) & (pos[real, 1] == pos[i, 1]) & (pos[real, 2] == pos[i, 2])
    np.testing.assert_array_equal(ids[real] == ids[i], same)
  # The first example's grid is (2, 3, 4): 12 places of 2 patch-frames each.
  assert len(set(ids[seg == 1])) == 12


def test_fractional_position_code_reads_the_canvas_and_keeps_packing_exact():
  """`segments.extents` gives every token its own example's grid; `position_code="fractional"`
  codes h and w as fractions of it (the middle of any canvas is scale/2), keeps t, and a packed
  row still equals each example alone — and differs from the absolute code."""
  ex = examples()
  batch = packed_rows([ex])
  seg, pos = np.asarray(batch["segment_ids"][0]), np.asarray(batch["positions"][0])
  ext = np.asarray(segments.extents(batch["segment_ids"], batch["positions"]))[0]
  for s, (shape, *_) in enumerate(ex, start=1):
    np.testing.assert_array_equal(ext[seg == s], np.broadcast_to(shape, ((seg == s).sum(), 3)))
  frac = np.asarray(posemb.fractional(pos, ext, scale=16.0))
  np.testing.assert_array_equal(frac[seg > 0, 0], pos[seg > 0, 0])
  # Example 1 is (2, 3, 4): its middle row h = 1 is 1.5/3 of the way down, w = 0 is 0.5/4 across.
  first = (seg == 1) & (pos[:, 1] == 1) & (pos[:, 2] == 0)
  np.testing.assert_allclose(frac[first, 1:], [[8.0, 2.0]] * int(first.sum()))
  assert ((frac[seg > 0, 1:] > 0) & (frac[seg > 0, 1:] < 16)).all()
  model = VideoDiT(**TINY, position_code="fractional")
  params = jax.jit(lambda r: nn.unbox(model.init(r, *batch.values())))(jax.random.key(0))
  assert_packed_equals_alone(model, perturb(params, 3), ex)
  absolute = apply(VideoDiT(**TINY), perturb(params, 3), batch)
  assert np.abs(np.asarray(apply(model, perturb(params, 3), batch) - absolute)).max() > 1e-3


@pytest.mark.slow
def test_temporal_attention_keeps_packing_exact_and_reads_along_time():
  """With the temporal attention a packed row still equals each example alone; the sublayer
  alone (its block's other paths switched off) mixes a token only with its own place's tokens
  in the other patch-frames."""
  model = VideoDiT(**TINY, rope=True, rope_max_period=50.0, temporal_attention=True)
  ex = examples()
  inputs = list(packed_rows([ex]).values())
  params = jax.jit(lambda r: nn.unbox(model.init(r, *inputs)))(jax.random.key(0))
  assert params["params"]["blocks"]["adaln"]["proj"]["kernel"].shape[-1] == 9 * TINY["width"]
  assert_packed_equals_alone(model, perturb(params, 3), ex)
  # One block: x → x + temporal_attn(x), every other path off.
  batch = packed_rows([ex])
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(1, L, 32)), jnp.float32)
  c = jnp.asarray(r.normal(size=(1, L, 32)), jnp.float32)
  text = jnp.asarray(r.normal(size=(1, M, 32)), jnp.float32)
  ids = segments.place_ids(batch["segment_ids"], batch["positions"])
  args = (x, c, batch["segment_ids"], text, batch["text_segment_ids"], None, None, ids)
  block = DiTBlock(num_heads=4, rope=False)
  p = perturb(block.init(jax.random.key(2), *args), 5)["params"]
  zero = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  p = {**p, "self_attn": zero(p["self_attn"]), "cross_attn": zero(p["cross_attn"])}
  p = {**p, "mlp": zero(p["mlp"])}
  f = jax.jit(lambda x: block.apply({"params": p}, x, *args[1:])[0])
  jac = np.asarray(jax.jacobian(lambda v: f(v)[0, :, 0])(x)[:, 0, :, 0])  # [L, L]: out i ← in j
  place = np.asarray(ids[0])
  reads = np.abs(jac) > 1e-7
  np.fill_diagonal(reads, False)
  real = place > 0
  assert reads[np.ix_(real, real)].any()
  assert not (reads[np.ix_(real, real)] & (place[real][:, None] != place[real][None, :])).any()


def test_patch_skip_adds_a_per_time_linear_map_of_the_own_patch():
  """`patch_skip`: zero at init; after training-like perturbation the output is the model's
  without the skip plus Σ_k a_k(t)·x W_k of each token's own noisy patch (Gaussian bumps a_k
  over t, normalised), and a packed row still equals each example alone."""
  model = VideoDiT(**TINY, patch_skip=3)
  ex = examples()
  batch = packed_rows([ex])
  params = jax.jit(lambda r: nn.unbox(model.init(r, *batch.values())))(jax.random.key(0))
  np.testing.assert_array_equal(jax.jit(lambda p: apply(model, p, batch))(params), 0.0)
  params = perturb(params, 6)
  kernel = np.asarray(params["params"]["skip"])  # [3, P, P]
  assert kernel.shape == (3, P, P)
  without = {"params": {**params["params"], "skip": jnp.zeros_like(kernel)}}
  run = jax.jit(lambda p: apply(model, p, batch))
  t = np.asarray(batch["t"])[..., None]  # [1, L, 1]
  bumps = np.exp(-0.5 * ((t - np.array([0.0, 0.5, 1.0])) / 0.5) ** 2)
  bumps /= bumps.sum(-1, keepdims=True)
  expected = np.einsum("blk,blp,kpq->blq", bumps, np.asarray(batch["x"]), kernel)
  np.testing.assert_allclose(run(params) - run(without), expected, atol=1e-4, rtol=1e-4)
  assert_packed_equals_alone(model, params, ex)


def test_position_conditioning_keeps_packing_exact():
  """`position_conditioning`: a packed row still equals each example alone (with the shared
  conditioning table, gathered to the tokens), and with its map zeroed the model is the model
  without it. That the map makes a word move content is the direction fit of
  test_generation."""
  model = VideoDiT(**TINY, shared_conditioning=K, pooled_text=True, position_conditioning=True)
  plain = VideoDiT(**TINY, shared_conditioning=K, pooled_text=True)
  ex = examples()
  batch = packed_rows([ex])
  params = jax.jit(lambda r: nn.unbox(model.init(r, *batch.values())))(jax.random.key(0))
  params = perturb(params, 7)
  kernel = params["params"]["position_conditioning"]["kernel"]
  assert kernel.shape == (TINY["width"], TINY["width"])
  assert_packed_equals_alone(model, params, ex)
  zeroed = {"params": dict(params["params"])}
  zeroed["params"]["position_conditioning"] = jax.tree.map(
    jnp.zeros_like, params["params"]["position_conditioning"]
  )
  without = {"params": {k: v for k, v in params["params"].items() if k != "position_conditioning"}}
  np.testing.assert_allclose(
    apply(model, zeroed, batch), apply(plain, without, batch), atol=1e-5, rtol=1e-5
  )


def test_shared_conditioning_equals_per_token():
  """Conditioning computed once per (example, clean or noisy) gives the per-token model's
  outputs, with clean (t = 0) tokens and padding of any time in the row (the same function of
  the same parameters, so the same gradients); a row that breaks the contract (a third time in
  one example) is NaN, not silently wrong."""
  shared = VideoDiT(**TINY, shared_conditioning=K, pooled_text=True)
  per_token = VideoDiT(**TINY, pooled_text=True)
  batch = packed_rows([examples(), examples(1)[:2]])
  t = np.asarray(batch["t"]).copy()
  t[0, :6] = 0.0  # the first patch-frame of example 1 is given (frame-conditioned)
  t[1, 40:] = np.linspace(0.2, 0.7, L - 40)  # padding tokens with arbitrary times
  params = jax.jit(lambda r: nn.unbox(per_token.init(r, *batch.values())))(jax.random.key(0))
  params = perturb(params, 4)
  run_shared = jax.jit(lambda p, b: apply(shared, p, b))
  out = run_shared(params, {**batch, "t": jnp.asarray(t)})
  ref = jax.jit(lambda p, b: apply(per_token, p, b))(params, {**batch, "t": jnp.asarray(t)})
  real = np.asarray(batch["segment_ids"]) > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
  t[0, 6] = 0.3  # a third time in example 1: outside the contract
  out = np.asarray(run_shared(params, {**batch, "t": jnp.asarray(t)}))
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_encode_text_then_denoise_is_the_model_call():
  """`__call__` is `encode_text` then `denoise` (a sampler encodes its captions once): the same
  output, and the two methods initialise disjoint parts of the one parameter tree with the same
  names and values (checkpoints load either way). The second row has an example without
  caption tokens (its pooled text is the MLP of zeros)."""
  model = VideoDiT(**TINY, pooled_text=True, shared_conditioning=K)
  uncaptioned = examples(1)
  uncaptioned[1] = (*uncaptioned[1][:1], [], *uncaptioned[1][2:])
  batch = packed_rows([examples(), uncaptioned])
  x, t, positions, segment_ids, tokens, text_segment_ids, labels = batch.values()
  key = jax.random.key(0)
  full = jax.jit(lambda r: nn.unbox(model.init(r, *batch.values())))(key)
  encode = lambda p, *a: model.apply(p, *a, method="encode_text")
  text = jax.jit(encode)(full, tokens, text_segment_ids)
  assert text.tokens.shape == (2, M, TINY["width"]) and text.pooled.shape == (2, M + 1, 32)
  parts = jax.jit(
    lambda r: [
      model.init(r, tokens, text_segment_ids, method="encode_text"),
      model.init(r, x, t, positions, segment_ids, text, labels, method="denoise"),
    ]
  )(key)
  text_part, denoise_part = (nn.unbox(p)["params"] for p in parts)
  assert set(text_part) == {"text", "text_proj", "text_pool_fc1", "text_pool_fc2"}
  assert not set(text_part) & set(denoise_part)
  assert jax.tree.structure(full["params"]) == jax.tree.structure({**text_part, **denoise_part})
  jax.tree.map(np.testing.assert_array_equal, full["params"], {**text_part, **denoise_part})

  @jax.jit
  def both(p):
    text = encode(p, tokens, text_segment_ids)
    denoised = model.apply(p, x, t, positions, segment_ids, text, labels, method="denoise")
    return denoised, apply(model, p, batch)

  denoised, called = both(perturb(full, 6))
  np.testing.assert_array_equal(denoised, called)
  assert np.abs(np.asarray(called)).std() > 1e-2


def test_caption_and_label_only_affect_their_own_example(tiny):
  model, params = tiny
  params = perturb(params, 2)
  ex = examples()
  other = list(ex)
  other[1] = (ex[1][0], [1, 30, 31, 32, 33], 4, ex[1][3], ex[1][4])  # new caption and label
  out = jax.jit(lambda p, b: apply(model, p, b))(params, packed_rows([ex, other]))
  a, b = 24, 24 + 16  # example 2 occupies tokens [a, b)
  np.testing.assert_allclose(out[0, :a], out[1, :a], atol=1e-6)
  np.testing.assert_allclose(out[0, b:52], out[1, b:52], atol=1e-6)
  assert np.abs(np.asarray(out[0, a:b] - out[1, a:b])).max() > 1e-3


def test_scan_equals_unrolled_with_and_without_remat(tiny):
  model, params = tiny
  params = perturb(params, 3)
  batch = packed_rows([examples()])
  scanned = VideoDiT(**TINY, remat_policy="dots_saveable")
  unrolled = VideoDiT(**TINY, scan_layers=False, remat_policy="full")
  params_unrolled = layers.unstack_layers(params, "blocks", TINY["depth"])
  assert "blocks_1" in params_unrolled["params"]["text"]  # text blocks follow the same rule
  # The unrolled model initializes to exactly this layout.
  init_shapes = jax.eval_shape(lambda: nn.unbox(unrolled.init(jax.random.key(0), *batch.values())))
  assert jax.tree.structure(init_shapes) == jax.tree.structure(params_unrolled)

  def loss(model, p):
    return jnp.mean(jnp.square(apply(model, p, batch)))

  # remat_policy="none" (the model fixture) is the baseline for the loss value.
  v0 = jax.jit(lambda p: loss(model, p))(params)
  v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(params)
  v2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params_unrolled)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(v2, v0, rtol=1e-5)
  assert_trees_close(g1, layers.stack_layers(g2, "blocks", TINY["depth"]))
  assert layers.stack_layers(params_unrolled, "blocks", 2)["params"]["blocks"]["mlp"]["fc1"][
    "kernel"
  ].shape == (2, 32, 128)


def test_unknown_remat_policy_names_choices(tiny):
  _, params = tiny
  batch = packed_rows([examples()])
  with pytest.raises(ValueError, match="remat_policy='some'.*dots_saveable"):
    jax.eval_shape(lambda p: apply(VideoDiT(**TINY, remat_policy="some"), p, batch), params)


def test_blocks_are_identity_and_output_zero_at_init(tiny):
  model, params = tiny
  r = np.random.default_rng(0)
  x, c = (jnp.asarray(r.normal(size=(1, L, 32)), jnp.float32) for _ in range(2))
  text = jnp.asarray(r.normal(size=(1, M, 32)), jnp.float32)
  batch = packed_rows([examples()])
  args = (x, c, batch["segment_ids"], text, batch["text_segment_ids"])
  block = DiTBlock(num_heads=4)
  block_apply = jax.jit(lambda p: block.apply(p, *args)[0])
  np.testing.assert_array_equal(block_apply(block.init(jax.random.key(1), *args)), x)
  # The same holds for the model's own (scanned) blocks, layer 1 of 2.
  layer1 = jax.tree.map(lambda a: a[1], params["params"]["blocks"])
  np.testing.assert_array_equal(block_apply({"params": layer1}), x)
  # Zero-init final projection: the model predicts 0, yet learns (non-zero gradient there).
  target = jnp.ones((1, L, P))
  out = jax.jit(lambda p: apply(model, p, batch))(params)
  np.testing.assert_array_equal(out, 0.0)
  g = jax.jit(jax.grad(lambda p: jnp.sum((apply(model, p, batch) - target) ** 2)))(params)
  assert np.abs(g["params"]["final"]["proj"]["kernel"]).max() > 0
  # ...but not yet to the self-attention (gated off by the zero gate).
  np.testing.assert_array_equal(g["params"]["blocks"]["self_attn"]["query"]["kernel"], 0.0)


def test_param_axes_and_variants():
  model = VideoDiT(**TINY)
  batch = packed_rows([examples()])
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *batch.values()))
  p = specs["params"]
  assert tuple(p["blocks"]["self_attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(p["blocks"]["cross_attn"]["out"]["kernel"]) == ("layers", "heads", "kv", "embed")
  assert tuple(p["blocks"]["mlp"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(p["text"]["embed"]["embedding"]) == ("vocab", "embed")
  assert tuple(p["patch_embed"]["kernel"]) == ("patch", "embed")
  assert decode_variant("XL/2") == dict(width=1152, depth=28, num_heads=16, patch_size=2)
  m = VideoDiT.from_variant(
    "S/4", **{k: v for k, v in TINY.items() if k not in ("width", "depth", "num_heads")}
  )
  assert (m.width, m.depth, m.num_heads) == (384, 12, 6)
  with pytest.raises(ValueError, match="variant='M/2'"):
    decode_variant("M/2")


def test_text_encoder_packed_equals_alone():
  enc = TextEncoder(vocab_size=40, width=16, depth=2, num_heads=2)
  tokens = jnp.array([[1, 5, 9, 1, 7, 8, 2, 0], [1, 7, 8, 0, 0, 0, 0, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 3, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  params = perturb(jax.jit(enc.init)(jax.random.key(0), tokens, seg), 5)
  out = jax.jit(enc.apply)(params, tokens, seg)
  np.testing.assert_allclose(out[0, 3:6], out[1, :3], atol=1e-5)


def test_self_conditioning_reads_the_previous_estimate():
  """A self-conditioned model embeds [x, x0_prev] (2P inputs per patch); x0_prev = None is
  zeros, a different estimate changes the output, packing stays exact; a plain model refuses
  an estimate."""
  model = VideoDiT(**TINY, self_condition=True, patch_context=(3, 3, 3))
  ex = examples()
  batch = packed_rows([ex])
  params = jax.jit(lambda r: nn.unbox(model.init(r, *batch.values())))(jax.random.key(0))
  params = perturb(params, 5)
  assert params["params"]["patch_conv"]["kernel"].shape == (27, 2 * P, TINY["width"])
  inputs = list(batch.values())
  run = jax.jit(lambda p, prev: model.apply(p, *inputs, x0_prev=prev))
  zeros = jnp.zeros_like(batch["x"])
  np.testing.assert_allclose(run(params, zeros), apply(model, params, batch), atol=1e-6)
  other = run(params, jnp.ones_like(zeros))
  assert float(jnp.abs(other - run(params, zeros)).max()) > 1e-3
  assert_packed_equals_alone(model, params, ex)
  plain = VideoDiT(**TINY)
  plain_params = jax.jit(lambda r: nn.unbox(plain.init(r, *batch.values())))(jax.random.key(0))
  with pytest.raises(ValueError, match="self_condition=False"):
    plain.apply(plain_params, *inputs, x0_prev=zeros)


def test_repa_projects_one_blocks_output_and_leaves_the_model_as_it_was(tiny):
  """REPA's projector (`repa_depth`, `repa_dim`) reads block `repa_depth`'s output only: the
  model's output is the model without it, the sown features are [B, L, repa_dim], their
  gradient reaches the blocks up to `repa_depth` and not the later ones, and the scanned and
  unrolled stacks sow the same features."""
  model, _ = tiny
  batch = packed_rows([examples()])
  repa = VideoDiT(**TINY, repa_depth=1, repa_dim=5)
  init = jax.jit(lambda r: nn.unbox(repa.init(r, *batch.values())))
  params = perturb(init(jax.random.key(0)), 4)
  extra = {"repa_fc1", "repa_fc2", "repa_fc3"}
  assert set(params["params"]) - set(nn.unbox(tiny[1])["params"]) == extra
  base = {"params": {k: v for k, v in params["params"].items() if k not in extra}}
  out = jax.jit(lambda p: apply(repa, p, batch))(params)
  np.testing.assert_array_equal(out, jax.jit(lambda p: apply(model, p, batch))(base))

  def features(m, p):
    out, state = m.apply(p, *batch.values(), mutable=["intermediates"])
    return out, state["intermediates"]["repa"][0]

  out_sown, feats = jax.jit(lambda p: features(repa, p))(params)
  np.testing.assert_array_equal(out_sown, out)
  assert feats.shape == (1, L, 5) and float(jnp.std(feats)) > 1e-3
  sown_norm = lambda p: jnp.sum(jnp.square(features(repa, p)[1]))  # noqa: E731
  grads = jax.jit(jax.grad(sown_norm))(params)["params"]

  def largest(tree, blocks):  # the largest |gradient| of the stacked blocks `blocks`
    return max(float(jnp.abs(g[blocks]).max()) for g in jax.tree.leaves(tree))

  assert largest(grads["blocks"], slice(0, 1)) > 0
  assert largest(grads["blocks"], slice(1, None)) == 0  # block 2 comes after the projection
  assert largest(grads["final"], slice(None)) == 0
  unrolled = VideoDiT(**TINY, repa_depth=1, repa_dim=5, scan_layers=False)
  unstacked = layers.unstack_layers(params, "blocks", TINY["depth"])
  _, feats_unrolled = jax.jit(lambda p: features(unrolled, p))(unstacked)
  np.testing.assert_allclose(feats_unrolled, feats, rtol=1e-5, atol=1e-6)


def test_repa_alignment_loss_is_minus_the_cosine_on_the_masked_tokens():
  from vdit.tasks.representation import alignment_loss  # noqa: PLC0415

  y = jnp.asarray([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
  same = alignment_loss(3 * y, y, jnp.asarray([[True, True, True]]))
  opposite = alignment_loss(-y, y, jnp.asarray([[True, True, True]]))
  np.testing.assert_allclose([same, opposite], [-1.0, 1.0], rtol=1e-6)
  half = jnp.asarray([[[1.0, 0.0], [2.0, 0.0], [-5.0, 1.0]]])  # cos 1, 0, and a masked token
  np.testing.assert_allclose(alignment_loss(half, y, jnp.asarray([[True, True, False]])), -0.5)


def test_cell_head_is_a_3x3_convolution_over_each_frames_cells():
  """`CellHead` (one block) on a packed row: per example, the features of every cell, normalised,
  modulated, SiLU, convolved 3×3 over the zero-padded cell grid of each frame (across token
  borders, never into another example), added back and projected: the same numbers as a numpy
  convolution of the unpatchified grid."""
  from vdit.data import patchify
  from vdit.models.video_dit import CellHead

  size, f, d = (1, 2, 2), 4, 8
  ex = examples()
  batch = packed_rows([ex])
  x = jax.random.normal(jax.random.key(1), (1, L, d))
  c = jax.random.normal(jax.random.key(2), (1, L, d))
  near = layers.grid_neighbours(batch["positions"], batch["segment_ids"], (1, 3, 3))
  head = CellHead(size, channels=3, features=f, depth=1)
  params = perturb(nn.unbox(head.init(jax.random.key(0), x, c, near)), 3, scale=0.5)["params"]
  out = np.asarray(head.apply({"params": params}, x, c, near))
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  x, c = np.asarray(x[0], np.float64), np.asarray(c[0], np.float64)
  cells = x @ params["to_cells"]["kernel"] + params["to_cells"]["bias"]  # [L, 4·F]
  film = silu(c) @ params["film_0"]["kernel"] + params["film_0"]["bias"]
  shift, scale = film[:, :f], film[:, f:]
  cells = cells.reshape(L, 4, f)
  mu, var = cells.mean(-1, keepdims=True), cells.var(-1, keepdims=True)
  y = silu((cells - mu) / np.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None])
  kernel = np.asarray(params["conv_0"]["kernel"]).reshape(3, 3, f, f)
  n = 0
  for shape, *_ in ex:
    tokens = int(np.prod(shape))
    grid = patchify.unpatchify(y[n : n + tokens].reshape(tokens, -1), shape, size, f)
    padded = np.pad(grid, [(0, 0), (1, 1), (1, 1), (0, 0)])
    conv = sum(
      padded[:, i : i + grid.shape[1], j : j + grid.shape[2]] @ kernel[i, j]
      for i in range(3)
      for j in range(3)
    )
    conv = conv + np.asarray(params["conv_0"]["bias"])
    new = cells[n : n + tokens] + patchify.patchify(conv, size)[0].reshape(tokens, 4, f)
    want = new @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
    np.testing.assert_allclose(out[0, n : n + tokens], want.reshape(tokens, -1), atol=2e-4)
    n += tokens


def test_cell_head_starts_as_nothing_and_keeps_packing_exact():
  """VideoDiT with `cell_head`: at init the same output as without (its projection is zero),
  a packed row still equals each example alone, and a bad patch size is a clear error."""
  ex = examples()
  inputs = list(packed_rows([ex]).values())
  plain = VideoDiT(**TINY)
  model = VideoDiT(**TINY, cell_head=2, cell_head_width=8, patch_size=(1, 2, 2), channels=3)
  params = jax.jit(lambda r: nn.unbox(model.init(r, *inputs)))(jax.random.key(0))
  base = jax.jit(lambda r: nn.unbox(plain.init(r, *inputs)))(jax.random.key(0))
  final = perturb({"final": base["params"]["final"]}, 4)["final"]  # an output that is not 0
  with_head = {"params": {**params["params"], "final": final}}
  without = {"params": {**base["params"], "final": final}}
  batch = packed_rows([ex])
  np.testing.assert_allclose(apply(model, with_head, batch), apply(plain, without, batch))
  assert params["params"]["cell_head"]["conv_1"]["kernel"].shape == (9, 8, 8)
  assert_packed_equals_alone(model, perturb(params, 5), ex)
  bad = VideoDiT(**TINY, cell_head=1, patch_size=(2, 2, 2), channels=3)
  with pytest.raises(ValueError, match=r"cell_head=1 needs patch_size"):
    bad.init(jax.random.key(0), *inputs)
