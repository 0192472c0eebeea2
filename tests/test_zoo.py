"""The model zoo: ViT, NaViT, ViViT, DiT — sizes, FLOPs, packing, variants, scan, adaLN-Zero."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.data.patchify import patchify
from vdit.models import dit, flops, layers, navit, vit, vivit


def param_count(model, *args, **kwargs) -> int:
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args, **kwargs)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def perturb(params, seed, scale=0.1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  )


def init(model, *args):
  return jax.jit(lambda r: nn.unbox(model.init(r, *args)))(jax.random.key(0))


def assert_scan_equals_unrolled(make, args, depth, stacks=("blocks",), seed=3):
  """Loss and gradients of the scanned (full remat) and unrolled (no remat) models agree."""
  scanned, unrolled = make(True, "full"), make(False, "none")
  params = perturb(init(scanned, *args), seed)
  params_u = layers.unstack_layers(params, "blocks", depth)
  shapes_u = jax.eval_shape(lambda: nn.unbox(unrolled.init(jax.random.key(0), *args)))
  assert jax.tree.structure(shapes_u) == jax.tree.structure(params_u)

  def loss(model, p):
    return jnp.mean(jnp.square(model.apply(p, *args)))

  v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(params)
  v2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params_u)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  g2 = layers.stack_layers(g2, "blocks", depth)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6 + 1e-4 * float(np.abs(b).max()))


# ------------------------------------------------------------------------------------------
# ViT.
# ------------------------------------------------------------------------------------------


def test_vit_parameter_counts_are_the_standard_ones():
  images = jnp.zeros((1, 224, 224, 3))
  # ViT-B/16: 86.6M (Dosovitskiy et al., Table 1; timm `vit_base_patch16_224`: 86,567,656).
  assert param_count(vit.ViT.from_variant("B/16", 1000), images) == 86_567_656
  assert param_count(vit.ViT.from_variant("S/16", 1000), images) == 22_050_664
  assert param_count(vit.ViT.from_variant("L/32", 1000), images) == 306_535_400
  assert vit.decode_variant("Ti/8") == dict(width=192, depth=12, num_heads=3, patch_size=8)
  with pytest.raises(ValueError, match="variant='B/4'"):
    vit.decode_variant("B/4")


def test_vit_heads_shapes_and_scan():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  for pool, pe in (("token", "learn"), ("gap", "sincos2d"), ("map", "learn")):
    model = vit.ViT(7, 8, 32, 2, 4, pool=pool, posemb=pe)
    out, params = jax.eval_shape(lambda m=model: m.init_with_output(jax.random.key(0), images))
    assert out.shape == (2, 7)
    assert ("cls" in params["params"]) == (pool == "token")
    assert ("pos_embedding" in params["params"]) == (pe == "learn")
    assert ("map_head" in params["params"]) == (pool == "map")
  make = lambda scan, remat: vit.ViT(7, 8, 32, 2, 4, scan_layers=scan, remat_policy=remat)  # noqa: E731
  assert_scan_equals_unrolled(make, (images,), depth=2)
  with pytest.raises(ValueError, match="pool='cls'"):
    vit.ViT(7, 8, 32, 2, 4, pool="cls").init(jax.random.key(0), images)


def test_resampled_position_table_runs_a_vit_at_another_resolution():
  """A learned table trained at 16×16 pixels (2×2 patches of 8), resized for 32×32 (4×4): the
  class token's row is kept, the grid rows are resized, and the bigger ViT takes the table."""
  small, big = (jnp.zeros((1, s, s, 3)) for s in (16, 32))
  for pool, extra in (("token", 1), ("gap", 0)):
    model = vit.ViT(7, 8, 32, 2, 4, pool=pool)
    params = nn.unbox(model.init(jax.random.key(0), small))["params"]
    table = np.asarray(params["pos_embedding"])  # [1, extra + 4, 32]
    resized = vit.resample_posemb(table, (4, 4))
    assert resized.shape == (1, extra + 16, 32)
    np.testing.assert_array_equal(resized[0, :extra], table[0, :extra])
    # A constant table stays constant under the bilinear resize.
    flat = vit.resample_posemb(np.ones_like(table), (4, 4))
    np.testing.assert_allclose(flat, 1.0, atol=1e-6)
    assert model.apply({"params": {**params, "pos_embedding": resized}}, big).shape == (1, 7)
  with pytest.raises(ValueError, match="neither a square grid"):
    vit.resample_posemb(np.zeros((1, 7, 4)), (2, 2))


def test_classification_loss_masks_and_counts():
  logits = jnp.array([[[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]]])  # [B=1, K=3, C=2]
  labels = jnp.array([[0, 0, -1]])  # the third slot is empty
  loss, m = vit.classification_loss(logits, labels)
  want = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(1 / (1 + np.e))])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(m["accuracy"]) == 0.5 and int(m["count"]) == 2
  loss, m = vit.classification_loss(logits, labels, mask=jnp.array([[True, False, True]]))
  assert float(m["accuracy"]) == 1.0 and int(m["count"]) == 1
  loss, m = vit.classification_loss(logits[:, 0], jnp.array([-1]))
  assert float(loss) == 0.0 and int(m["count"]) == 0
  with pytest.raises(ValueError, match=r"logits \(1, 3, 2\) and labels \(1, 2\)"):
    vit.classification_loss(logits, labels[:, :2])


# ------------------------------------------------------------------------------------------
# NaViT.
# ------------------------------------------------------------------------------------------

NP, NL, NK = 12, 48, 3  # patch dim (2×2×3), row length, examples per row


def navit_rows(rows, seed=0):
  """rows: lists of (grid (h, w), patches) -> packed batch arrays."""
  b = len(rows)
  patches = np.random.default_rng(seed).normal(size=(b, NL, NP)).astype(np.float32)  # padding
  positions = np.zeros((b, NL, 3), np.int32)
  ids = np.zeros((b, NL), np.int32)
  shapes = np.zeros((b, NK, 3), np.int32)
  for i, row in enumerate(rows):
    n = 0
    for j, (grid, x) in enumerate(row):
      size = grid[0] * grid[1]
      hh, ww = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
      patches[i, n : n + size] = x
      positions[i, n : n + size, 1:] = np.stack([hh.ravel(), ww.ravel()], -1)
      ids[i, n : n + size] = j + 1
      shapes[i, j] = (1, *grid)
      n += size
  return tuple(jnp.asarray(a) for a in (patches, positions, ids, shapes))


def navit_examples(seed=0):
  r = np.random.default_rng(seed)
  grids = [(3, 5), (4, 4), (2, 3)]  # 15 + 16 + 6 = 37 of 48 tokens
  return [(g, r.normal(size=(g[0] * g[1], NP)).astype(np.float32)) for g in grids]


@pytest.fixture(scope="module")
def tiny_navit():
  model = navit.NaViT(5, 32, 2, 4, posemb_size=8)
  params = perturb(init(model, *navit_rows([navit_examples()])), 1)
  return model, params


def test_navit_packed_equals_each_image_alone(tiny_navit):
  model, params = tiny_navit
  ex = navit_examples()
  batch = navit_rows([ex] + [[e] for e in ex])
  logits = jax.jit(model.apply)(params, *batch)
  assert logits.shape == (4, NK, 5)
  for j in range(NK):
    np.testing.assert_allclose(logits[0, j], logits[j + 1, 0], atol=1e-5)
  assert np.abs(np.asarray(logits[0])).std() > 1e-2


def test_navit_token_dropping_keeps_coordinates(tiny_navit):
  model, params = tiny_navit
  ex = navit_examples()
  patches, positions, ids, shapes = navit_rows([ex])
  rate = jnp.array([[0.5, 0.0, 0.3]])
  new_ids, new_patches, new_pos, keep = navit.drop_tokens(
    jax.random.key(4), rate, ids, patches, positions
  )
  keep = np.asarray(keep[0])
  assert keep[15:31].all() and 0 < keep[:15].sum() < 15  # rate 0 keeps all of example 2
  n = int(keep.sum())
  np.testing.assert_array_equal(new_ids[0, :n], ids[0][keep])
  np.testing.assert_array_equal(new_ids[0, n:], 0)
  np.testing.assert_array_equal(new_pos[0, :n], positions[0][keep])
  # The dropped row equals each example's kept tokens fed alone (fractional posemb uses the
  # full grid from `shapes`, so the kept tokens keep their place).
  rows = [(new_patches[0], new_pos[0], new_ids[0], shapes[0])]
  for j in range(NK):
    sel = keep & (np.asarray(ids[0]) == j + 1)
    m = int(sel.sum())
    rows.append(
      (
        jnp.zeros((NL, NP)).at[:m].set(patches[0][sel]),
        jnp.zeros((NL, 3), jnp.int32).at[:m].set(positions[0][sel]),
        jnp.zeros((NL,), jnp.int32).at[:m].set(1),
        jnp.zeros((NK, 3), jnp.int32).at[0].set(shapes[0, j]),
      )
    )
  out = jax.jit(model.apply)(params, *(jnp.stack(a) for a in zip(*rows)))
  for j in range(NK):
    np.testing.assert_allclose(out[0, j], out[j + 1, 0], atol=1e-5)


def test_navit_posemb_kinds_and_splash_backend(tiny_navit):
  model, params = tiny_navit
  batch = navit_rows([navit_examples()])
  emb = navit.FactorizedPositionEmbedding(8, "fractional")
  pos = jnp.array([[[0, 0], [3, 6], [3, 3]]])
  grid = jnp.array([[[4, 8], [4, 8], [4, 4]]])
  out, p = emb.init_with_output(jax.random.key(0), pos, grid, 16)
  h, w = (nn.unbox(p["params"][k]) for k in ("pos_h", "pos_w"))
  np.testing.assert_allclose(out[0, 0], h[0] + w[0])
  np.testing.assert_allclose(out[0, 1], h[6] + w[6])  # 3/4 and 6/8 of the grid -> bucket 6
  np.testing.assert_allclose(out[0, 2], out[0, 1])  # the same fractions of another grid
  with pytest.raises(ValueError, match="kind='relative'"):
    navit.FactorizedPositionEmbedding(8, "relative").init(jax.random.key(0), pos, grid, 16)
  # The block-sparse kernel gives the model the same logits.
  splash_model = navit.NaViT(5, 32, 2, 4, posemb_size=8, attention_backend="splash")
  np.testing.assert_allclose(
    jax.jit(splash_model.apply)(params, *batch), jax.jit(model.apply)(params, *batch), atol=1e-5
  )


# ------------------------------------------------------------------------------------------
# ViViT.
# ------------------------------------------------------------------------------------------


def tiny_vivit(variant, scan=True, remat="none"):
  return vivit.ViViT(
    6,
    variant,
    32,
    2,
    4,
    tubelet=(2, 4, 4),
    temporal_depth=1,
    scan_layers=scan,
    remat_policy=remat,
  )


def test_vivit_variants_on_a_tiny_video():
  video = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 8, 12, 3)), jnp.float32)
  for variant in vivit.VIVIT_VARIANTS:
    # Pooled features (classes=0; the zero-init head would hide them), then the logits' shape.
    feats = vivit.ViViT(0, variant, 32, 2, 4, tubelet=(2, 4, 4), temporal_depth=1)
    out, _ = jax.jit(lambda v, m=feats: m.init_with_output(jax.random.key(0), v))(video)
    assert out.shape == (2, 32), variant
    assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3, variant  # depends on the video
    logits = jax.eval_shape(
      lambda v=variant: tiny_vivit(v).init_with_output(jax.random.key(0), video)[0]
    )
    assert logits.shape == (2, 6)
  with pytest.raises(ValueError, match="variant='joint'"):
    vivit.ViViT(6, "joint", 32, 2, 4).init(jax.random.key(0), video)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["factorised_self_attention", "factorised_dot_product"])
def test_vivit_factorised_blocks_scan_equals_unrolled(variant):
  video = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 8, 12, 3)), jnp.float32)
  make = lambda scan, remat: tiny_vivit(variant, scan, remat)  # noqa: E731
  assert_scan_equals_unrolled(make, (video,), depth=2)


def test_vivit_sizes_match_the_paper():
  # ViViT-B, 16×2 tubelets, 32×224² clips, 400 classes (Arnab et al., Table 4: 88.9M, 115.1M,
  # 117.3M, 88.9M for models 1-4).
  video = jnp.zeros((1, 32, 224, 224, 3))
  want = [88.9, 115.1, 117.3, 88.9]
  for variant, millions in zip(vivit.VIVIT_VARIANTS, want):
    model = vivit.ViViT.from_variant("B/16", variant, 400, tubelet=(2, 16, 16))
    assert abs(param_count(model, video) / 1e6 - millions) < 0.1, variant


def test_tubelet_central_frame_init_equals_the_image_embedding():
  kernel_2d = np.random.default_rng(0).normal(size=(4 * 4 * 3, 8)).astype(np.float32)
  kernel = vivit.inflate_patch_embedding(kernel_2d, 3)
  frame = np.random.default_rng(1).normal(size=(1, 1, 8, 8, 3)).astype(np.float32)
  still = np.repeat(frame, 3, axis=1)  # a video of one repeated frame
  tubelets, _, _ = patchify(still, (3, 4, 4))
  patches, _, _ = patchify(frame, (1, 4, 4))
  np.testing.assert_allclose(tubelets @ kernel, patches @ kernel_2d, atol=1e-5)
  avg = vivit.inflate_patch_embedding(kernel_2d, 3, "average")
  np.testing.assert_allclose(tubelets @ avg, patches @ kernel_2d, atol=1e-5)
  # The model's own init is central-frame: only the middle time slice is non-zero.
  model = vivit.ViViT(6, "spatio_temporal", 32, 1, 4, tubelet=(3, 4, 4))
  params = init(model, jnp.zeros((1, 3, 8, 8, 3)))
  k = np.asarray(params["params"]["embedding"]["kernel"]).reshape(3, 48, 32)
  assert not k[0].any() and not k[2].any() and k[1].any()


def test_factorised_dot_product_heads_stay_in_their_frame_or_location():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4, 16)), jnp.float32)
  block = vivit.FactorisedDotProductBlock(num_heads=2)
  params = jax.jit(block.init)(jax.random.key(0), x)
  apply = jax.jit(lambda x: block.apply(params, x)[0][0])
  bump = jnp.linspace(-1.0, 1.0, 16)  # not constant: LayerNorm would remove a constant
  base, moved = apply(x), apply(x.at[0, 1, 2].add(bump))
  changed = np.abs(np.asarray(moved - base)).max(-1) > 1e-6  # [nt, ns]
  want = np.zeros((3, 4), bool)
  want[1, :] = want[:, 2] = True  # same frame (space heads) or same location (time heads)
  np.testing.assert_array_equal(changed, want)


# ------------------------------------------------------------------------------------------
# DiT.
# ------------------------------------------------------------------------------------------


def dit_args(b=1, size=32, c=4):
  return jnp.zeros((b, size, size, c)), jnp.zeros((b,)), jnp.zeros((b,), jnp.int32)


def test_dit_table_params_and_gflops_match_the_paper():
  for variant, gflops in flops.DIT_PAPER_GFLOPS.items():
    sizes = dit.decode_variant(variant)
    ours = flops.dit(1, 32, sizes["patch_size"], sizes["width"], sizes["depth"]) / 2 / 1e9
    assert abs(ours / gflops - 1) < 0.01, (variant, ours, gflops)
  # DiT-XL/2: 675,129,632 in the official state dict = trainable + the fixed pos_embed (N·D).
  count = param_count(dit.DiT.from_variant("XL/2"), *dit_args())
  assert count + 256 * 1152 == 675_129_632
  assert round(param_count(dit.DiT.from_variant("B/4"), *dit_args()) / 1e6) == 130


def test_analytic_flops_equal_the_traced_matmuls():
  def check(model, formula, *args):
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args)))
    assert flops.dot_flops(lambda p: model.apply(p, *args), params) == formula

  check(
    dit.DiT(patch_size=2, width=32, depth=2, num_heads=4),
    flops.dit(2, 8, 2, 32, 2),
    *dit_args(2, 8),
  )
  for variant in vivit.VIVIT_VARIANTS:
    f = flops.vivit(1, variant, 4, 8, (2, 4, 4), 32, 2, 6, temporal_depth=1)
    check(tiny_vivit(variant), f, jnp.zeros((1, 4, 8, 8, 3)))
  check(
    navit.NaViT(5, 32, 2, 4), flops.navit_packed(2, NL, NK, NP, 32, 2, 5), *navit_rows([[]] * 2)
  )
  check(
    vit.ViT(7, 8, 32, 2, 4, pool="map"),
    flops.vit(1, 16, 8, 32, 2, 7, "map"),
    jnp.zeros((1, 16, 16, 3)),
  )


@pytest.fixture(scope="module")
def tiny_dit():
  model = dit.DiT(patch_size=2, width=32, depth=2, num_heads=4, num_classes=10)
  return model, init(model, *dit_args(2, 8))


def test_dit_blocks_are_identity_and_output_zero_at_init(tiny_dit):
  model, params = tiny_dit
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(2, 16, 32)), jnp.float32)
  c = jnp.asarray(r.normal(size=(2, 1, 32)), jnp.float32)
  ids = jnp.ones((2, 16), jnp.int32)
  block_apply = jax.jit(lambda p: dit.DiTBlock(4, rope=False).apply({"params": p}, x, c, ids)[0])
  for i in range(2):
    layer = jax.tree.map(lambda a, i=i: a[i], params["params"]["blocks"])
    np.testing.assert_array_equal(block_apply(layer), x)
  latents = jnp.asarray(r.normal(size=(2, 8, 8, 4)), jnp.float32)
  t, labels = jnp.array([0.1, 0.7]), jnp.array([3, -1])
  out = jax.jit(model.apply)(params, latents, t, labels)
  assert out.shape == (2, 8, 8, 8)  # learned σ: ε then v channels
  np.testing.assert_array_equal(out, 0.0)
  # ... yet it learns: the final projection gets a gradient, the gated blocks not yet.
  g = jax.jit(jax.grad(lambda p: jnp.sum((model.apply(p, latents, t, labels) - 1.0) ** 2)))(params)
  assert np.abs(g["params"]["final"]["proj"]["kernel"]).max() > 0
  np.testing.assert_array_equal(g["params"]["blocks"]["self_attn"]["query"]["kernel"], 0.0)
  plain = dit.DiT(patch_size=2, width=32, depth=2, num_heads=4, learn_sigma=False)
  shape = jax.eval_shape(lambda: plain.init_with_output(jax.random.key(0), *dit_args(1, 8))[0])
  assert shape.shape == (1, 8, 8, 4)


def test_dit_null_class_and_scan(tiny_dit):
  """Labels −1 and `num_classes` read the null-class row (what the loss's guidance dropout
  turns a label into), which `class_dropout_prob > 0` adds; scan equals unrolled."""
  model, params = tiny_dit
  params = perturb(params, 5)
  r = np.random.default_rng(1)
  latents = jnp.asarray(r.normal(size=(2, 8, 8, 4)), jnp.float32)
  t = jnp.array([0.2, 0.6])
  apply = jax.jit(model.apply)
  null = apply(params, latents, t, jnp.array([-1, 10]))
  np.testing.assert_array_equal(null, apply(params, latents, t, jnp.array([10, -1])))
  for labels in ([3, 4], [9, 0]):
    assert np.abs(np.asarray(apply(params, latents, t, jnp.array(labels)) - null)).max() > 1e-4

  kw = dict(patch_size=2, width=32, depth=2, num_heads=4, num_classes=10)

  def label_rows(class_dropout_prob):
    m = dit.DiT(**kw, class_dropout_prob=class_dropout_prob)
    shapes = jax.eval_shape(lambda: nn.unbox(m.init(jax.random.key(0), *dit_args(1, 8))))
    return shapes["params"]["label_embed"]["embedding"].shape[0]

  assert label_rows(0.1) == 11 and label_rows(0.0) == 10
  make = lambda scan, remat: dit.DiT(**kw, scan_layers=scan, remat_policy=remat)  # noqa: E731
  assert_scan_equals_unrolled(make, (latents, t, jnp.array([3, -1])), depth=2)


@pytest.mark.slow
def test_analytic_flops_within_2_percent_of_xla_cost_analysis():
  from vdit.tools.bench import flop_counts as bench  # noqa: PLC0415

  for row in bench.xla_agreement(quick=True):
    assert abs(row["ratio"] - 1) < 0.02, row
