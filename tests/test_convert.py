"""Weight import/export: reference name→shape tables, round trips, and reference forwards.

The reference tables are written from the module structure of facebookresearch/DiT
(`models.py`), diffusers `DiTTransformer2DModel`, google-research/vision_transformer and
big_vision `vit.py`; synthetic state dicts with those names and shapes stand in for the real
checkpoints (no downloads). The DiT and ViT imports are also checked against numpy
re-implementations of the reference forward passes (DiT in torch's NCHW layout), which catches
the qkv/head order, the time features' [cos, sin] order, the patch order and DiT's w-first 2-D
position code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.models import convert, dit, vit

D, P, C, DEPTH, HEADS, CLASSES, SIZE = 32, 2, 4, 2, 4, 10, 8  # tiny DiT over an 8×8×4 latent


def official_dit_shapes(depth=DEPTH, d=D, p=P, c=C, classes=CLASSES, size=SIZE):
  """facebookresearch/DiT state-dict names and shapes (learn_sigma, class dropout > 0)."""
  shapes = {
    "pos_embed": (1, (size // p) ** 2, d),
    "x_embedder.proj.weight": (d, c, p, p),
    "x_embedder.proj.bias": (d,),
    "t_embedder.mlp.0.weight": (d, 256),
    "t_embedder.mlp.0.bias": (d,),
    "t_embedder.mlp.2.weight": (d, d),
    "t_embedder.mlp.2.bias": (d,),
    "y_embedder.embedding_table.weight": (classes + 1, d),
    "final_layer.linear.weight": (p * p * 2 * c, d),
    "final_layer.linear.bias": (p * p * 2 * c,),
    "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    "final_layer.adaLN_modulation.1.bias": (2 * d,),
  }
  for i in range(depth):
    b = f"blocks.{i}."
    shapes |= {
      b + "attn.qkv.weight": (3 * d, d),
      b + "attn.qkv.bias": (3 * d,),
      b + "attn.proj.weight": (d, d),
      b + "attn.proj.bias": (d,),
      b + "mlp.fc1.weight": (4 * d, d),
      b + "mlp.fc1.bias": (4 * d,),
      b + "mlp.fc2.weight": (d, 4 * d),
      b + "mlp.fc2.bias": (d,),
      b + "adaLN_modulation.1.weight": (6 * d, d),
      b + "adaLN_modulation.1.bias": (6 * d,),
    }
  return shapes


def diffusers_dit_shapes(depth=DEPTH, d=D, p=P, c=C, classes=CLASSES):
  """diffusers DiTTransformer2DModel names and shapes (norm_type="ada_norm_zero")."""
  shapes = {
    "pos_embed.proj.weight": (d, c, p, p),
    "pos_embed.proj.bias": (d,),
    "proj_out_1.weight": (2 * d, d),
    "proj_out_1.bias": (2 * d,),
    "proj_out_2.weight": (p * p * 2 * c, d),
    "proj_out_2.bias": (p * p * 2 * c,),
  }
  for i in range(depth):
    b = f"transformer_blocks.{i}."
    shapes |= {
      b + "norm1.emb.timestep_embedder.linear_1.weight": (d, 256),
      b + "norm1.emb.timestep_embedder.linear_1.bias": (d,),
      b + "norm1.emb.timestep_embedder.linear_2.weight": (d, d),
      b + "norm1.emb.timestep_embedder.linear_2.bias": (d,),
      b + "norm1.emb.class_embedder.embedding_table.weight": (classes + 1, d),
      b + "norm1.linear.weight": (6 * d, d),
      b + "norm1.linear.bias": (6 * d,),
      b + "ff.net.0.proj.weight": (4 * d, d),
      b + "ff.net.0.proj.bias": (4 * d,),
      b + "ff.net.2.weight": (d, 4 * d),
      b + "ff.net.2.bias": (d,),
    }
    for n in ("to_q", "to_k", "to_v", "to_out.0"):
      shapes |= {f"{b}attn1.{n}.weight": (d, d), f"{b}attn1.{n}.bias": (d,)}
  return shapes


def synthetic(shapes, seed=0):
  r = np.random.default_rng(seed)
  return {k: (0.2 * r.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def official_dit_state(seed=0):
  state = synthetic(official_dit_shapes(), seed)
  state["pos_embed"] = convert._dit_pos_embed(SIZE // P, D).astype(np.float32)
  return state


def assert_same_arrays(a: dict, b: dict):
  assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ------------------------------------------------------------------------------------------
# numpy DiT forward in the official layout (models.py), NCHW.
# ------------------------------------------------------------------------------------------


def _ln(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _lin(s, name, x):
  return x @ s[name + ".weight"].T + s[name + ".bias"]


def _mha(q, k, v, heads):
  b, n, d = q.shape
  q, k, v = (a.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3) for a in (q, k, v))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return (w @ v).transpose(0, 2, 1, 3).reshape(b, n, d)


def official_dit_forward(s, x, t, y, depth=DEPTH, heads=HEADS, p=P):
  s = {k: v.astype(np.float64) for k, v in s.items()}
  b, c, h, w = x.shape
  d = s["x_embedder.proj.bias"].shape[0]
  # Conv2d(stride p) as patches (c, p, p) -> tokens row-major over (h/p, w/p).
  patches = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
  patches = patches.reshape(b, -1, c * p * p)
  tok = patches @ s["x_embedder.proj.weight"].reshape(d, -1).T + s["x_embedder.proj.bias"]
  tok = tok + s["pos_embed"]
  half = 128
  freqs = np.exp(-np.log(10000) * np.arange(half) / half)
  args = t[:, None] * freqs[None]
  temb = np.concatenate([np.cos(args), np.sin(args)], -1)
  temb = _lin(s, "t_embedder.mlp.2", _silu(_lin(s, "t_embedder.mlp.0", temb)))
  cond = temb + s["y_embedder.embedding_table.weight"][y]
  for i in range(depth):
    pre = f"blocks.{i}."
    mod = np.split(_lin(s, pre + "adaLN_modulation.1", _silu(cond)), 6, axis=1)
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod)
    hmod = _ln(tok) * (1 + sc1) + sh1
    q, k, v = np.split(_lin(s, pre + "attn.qkv", hmod), 3, axis=-1)
    tok = tok + g1 * _lin(s, pre + "attn.proj", _mha(q, k, v, heads))
    hmod = _ln(tok) * (1 + sc2) + sh2
    tok = tok + g2 * _lin(s, pre + "mlp.fc2", _gelu(_lin(s, pre + "mlp.fc1", hmod)))
  shift, scale = np.split(_lin(s, "final_layer.adaLN_modulation.1", _silu(cond)), 2, axis=1)
  tok = _lin(s, "final_layer.linear", _ln(tok) * (1 + scale[:, None]) + shift[:, None])
  co = tok.shape[-1] // (p * p)
  out = tok.reshape(b, h // p, w // p, p, p, co)
  return np.einsum("nhwpqc->nchpwq", out).reshape(b, co, h, w)


def tiny_dit(**kw):
  return dit.DiT(patch_size=P, width=D, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, **kw)


def test_official_dit_import_matches_reference_forward():
  state = official_dit_state()
  params = convert.dit_from_reference(state, num_heads=HEADS)
  r = np.random.default_rng(1)
  x = r.normal(size=(2, C, SIZE, SIZE)).astype(np.float32)
  steps = np.array([17, 903])
  labels = np.array([3, CLASSES])  # the second is the null class
  want = official_dit_forward(state, x, steps.astype(np.float64), labels)
  model = tiny_dit()
  latents = jnp.asarray(x.transpose(0, 2, 3, 1))
  got = model.apply(params, latents, steps / 1000.0, labels)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-4, rtol=1e-3)
  # The import fits the model's own parameter tree exactly (names, shapes).
  init = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), latents, steps, labels)))
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_dit_round_trips_both_layouts(scan_layers):
  state = official_dit_state(2)
  params = convert.dit_from_reference(state, num_heads=HEADS, scan_layers=scan_layers)
  assert ("blocks" in params["params"]) == scan_layers
  assert_same_arrays(convert.dit_to_reference(params, P, "dit", input_size=SIZE), state)
  # official -> vdit -> diffusers -> vdit -> official.
  diffusers = convert.dit_to_reference(params, P, "diffusers")
  assert {k: v.shape for k, v in diffusers.items()} == diffusers_dit_shapes()
  again = convert.dit_from_reference(diffusers, num_heads=HEADS, layout="diffusers")
  assert_same_arrays(convert.dit_to_reference(again, P, "dit", input_size=SIZE), state)


def test_diffusers_import_consumes_every_key_and_checks_copies():
  state = synthetic(diffusers_dit_shapes(), 3)
  for i in range(1, DEPTH):  # converted checkpoints carry equal embedder copies
    for k in list(state):
      if k.startswith(f"transformer_blocks.{i}.norm1.emb."):
        state[k] = state[k.replace(f"blocks.{i}.", "blocks.0.")]
  params = convert.dit_from_reference(state, num_heads=HEADS, layout="diffusers")
  assert_same_arrays(convert.dit_to_reference(params, P, "diffusers"), state)
  extra = dict(state, **{"transformer_blocks.0.norm2.weight": np.ones(D, np.float32)})
  with pytest.raises(ValueError, match="not imported.*norm2.weight"):
    convert.dit_from_reference(extra, num_heads=HEADS, layout="diffusers")
  key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
  with pytest.raises(ValueError, match="block 1 has other t_embed/fc2"):
    convert.dit_from_reference(dict(state, **{key: state[key] + 1}), HEADS, "diffusers")
  missing = {k: v for k, v in state.items() if k != "proj_out_2.bias"}
  with pytest.raises(KeyError, match="proj_out_2.bias"):
    convert.dit_from_reference(missing, num_heads=HEADS, layout="diffusers")


def test_dit_pos_embed_is_checked():
  state = official_dit_state()
  state["pos_embed"] = state["pos_embed"][:, :, ::-1].copy()
  with pytest.raises(ValueError, match="pos_embed"):
    convert.dit_from_reference(state, num_heads=HEADS)


# ------------------------------------------------------------------------------------------
# ViT.
# ------------------------------------------------------------------------------------------

VD, VP, VDEPTH, VHEADS, VIMG = 32, 8, 2, 4, 32


def vit_shapes(layout, pool, d=VD, p=VP, depth=VDEPTH, heads=VHEADS, img=VIMG, classes=CLASSES):
  """vision_transformer (timm `_load_weights`) / big_vision npz names and shapes."""
  n = (img // p) ** 2
  vt = layout == "vision_transformer"
  shapes = {
    "embedding/kernel": (p, p, 3, d),
    "embedding/bias": (d,),
    "Transformer/encoder_norm/scale": (d,),
    "Transformer/encoder_norm/bias": (d,),
    "head/kernel": (d, classes),
    "head/bias": (classes,),
  }
  if pool == "token":
    shapes["cls"] = (1, 1, d)
  pos = "Transformer/posembed_input/pos_embedding" if vt else "pos_embedding"
  shapes[pos] = (1, n + (pool == "token"), d)
  names = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
  names = (
    names if vt else ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )

  def attn(prefix):
    out = {}
    for x in ("query", "key", "value"):
      out |= {
        f"{prefix}/{x}/kernel": (d, heads, d // heads),
        f"{prefix}/{x}/bias": (heads, d // heads),
      }
    return out | {f"{prefix}/out/kernel": (heads, d // heads, d), f"{prefix}/out/bias": (d,)}

  def mlp(prefix):
    return {
      f"{prefix}/Dense_0/kernel": (d, 4 * d),
      f"{prefix}/Dense_0/bias": (4 * d,),
      f"{prefix}/Dense_1/kernel": (4 * d, d),
      f"{prefix}/Dense_1/bias": (d,),
    }

  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for norm in (names[0], names[2]):
      shapes |= {f"{b}{norm}/scale": (d,), f"{b}{norm}/bias": (d,)}
    shapes |= attn(b + names[1]) | mlp(b + names[3])
  if pool == "map":
    shapes |= {"MAPHead_0/probe": (1, 1, d), "MAPHead_0/LayerNorm_0/scale": (d,)}
    shapes |= {"MAPHead_0/LayerNorm_0/bias": (d,)}
    shapes |= attn("MAPHead_0/MultiHeadDotProductAttention_0") | mlp("MAPHead_0/MlpBlock_0")
  return shapes


def reference_vit_forward(a, images, pool, depth=VDEPTH, heads=VHEADS, p=VP):
  """vision_transformer `VisionTransformer.__call__` in numpy (token/gap, flax layout)."""
  a = {k: v.astype(np.float64) for k, v in a.items()}
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, p * p * c) @ a["embedding/kernel"].reshape(-1, a["embedding/bias"].size)
  x = x + a["embedding/bias"]
  if pool == "token":
    x = np.concatenate([np.broadcast_to(a["cls"], (b, 1, x.shape[-1])), x], 1)
  x = x + a["Transformer/posembed_input/pos_embedding"]

  def ln(x, n):
    return _ln(x) * a[n + "/scale"] + a[n + "/bias"]

  def dense(x, n):
    kernel = a[n + "/kernel"]
    return x @ kernel.reshape(-1, kernel.shape[-1]) if n.endswith("out") else x @ kernel

  for i in range(depth):
    blk = f"Transformer/encoderblock_{i}/"
    y = ln(x, blk + "LayerNorm_0")
    m = blk + "MultiHeadDotProductAttention_1/"
    q, k, v = (
      np.einsum("bnd,dhk->bnhk", y, a[m + f"{n}/kernel"]) + a[m + f"{n}/bias"]
      for n in ("query", "key", "value")
    )
    flat = lambda t: t.reshape(b, t.shape[1], -1)  # noqa: E731
    o = _mha(flat(q), flat(k), flat(v), heads).reshape(q.shape)
    x = x + np.einsum("bnhk,hkd->bnd", o, a[m + "out/kernel"]) + a[m + "out/bias"]
    y = ln(x, blk + "LayerNorm_2")
    mb = blk + "MlpBlock_3/"
    y = _gelu(y @ a[mb + "Dense_0/kernel"] + a[mb + "Dense_0/bias"])
    x = x + y @ a[mb + "Dense_1/kernel"] + a[mb + "Dense_1/bias"]
  x = ln(x, "Transformer/encoder_norm")
  x = x[:, 0] if pool == "token" else x.mean(1)
  return x @ a["head/kernel"] + a["head/bias"]


def tiny_vit(pool):
  return vit.ViT(CLASSES, patch_size=VP, width=VD, depth=VDEPTH, num_heads=VHEADS, pool=pool)


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_vision_transformer_import_matches_reference_forward(pool):
  arrays = synthetic(vit_shapes("vision_transformer", pool), 4)
  params = convert.vit_from_reference(arrays)
  images = np.random.default_rng(5).normal(size=(2, VIMG, VIMG, 3)).astype(np.float32)
  got = tiny_vit(pool).apply(params, jnp.asarray(images))
  np.testing.assert_allclose(got, reference_vit_forward(arrays, images, pool), atol=1e-4)
  assert_same_arrays(convert.vit_to_reference(params, VP), arrays)


@pytest.mark.parametrize(("layout", "pool"), [("big_vision", "map"), ("big_vision", "gap")])
def test_vit_round_trips_and_fits_the_model(layout, pool):
  arrays = synthetic(vit_shapes(layout, pool), 6)
  prefixed = {f"params/{k}": v for k, v in arrays.items()}
  params = convert.vit_from_reference(prefixed, layout, scan_layers=False)
  model = vit.ViT(
    CLASSES, patch_size=VP, width=VD, depth=VDEPTH, num_heads=VHEADS, pool=pool, scan_layers=False
  )
  images = jnp.zeros((1, VIMG, VIMG, 3))
  init = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), images)))
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)
  assert_same_arrays(convert.vit_to_reference(params, VP, layout), arrays)


def test_vit_import_errors_name_the_problem():
  arrays = synthetic(vit_shapes("vision_transformer", "token"), 7)
  with pytest.raises(ValueError, match="pre_logits"):
    convert.vit_from_reference(dict(arrays, **{"pre_logits/kernel": np.zeros((VD, VD))}))
  with pytest.raises(ValueError, match="not imported.*Transformer/extra"):
    convert.vit_from_reference(dict(arrays, **{"Transformer/extra": np.zeros(3)}))
  params = convert.vit_from_reference(arrays)
  with pytest.raises(ValueError, match="big_vision adds its position table"):
    convert.vit_to_reference(params, VP, "big_vision")
  with pytest.raises(ValueError, match="layout='timm'"):
    convert.vit_to_reference(params, VP, "timm")


def test_files_round_trip(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  params = convert.dit_from_reference(official_dit_state(8), num_heads=HEADS)
  state = convert.dit_to_reference(params, P, "diffusers")
  path = str(tmp_path / "diffusion_pytorch_model.safetensors")
  safetensors_numpy.save_file(state, path)
  assert_same_arrays(convert.load_safetensors(path), state)
  arrays = synthetic(vit_shapes("vision_transformer", "gap"), 9)
  np.savez(tmp_path / "vit.npz", **arrays)
  assert_same_arrays(convert.load_npz(str(tmp_path / "vit.npz")), arrays)


def test_torch_is_needed_only_to_unpickle(tmp_path, monkeypatch):
  import builtins  # noqa: PLC0415

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match="DiT-XL-2-256x256.pt.*needs torch"):
    convert.load_torch(str(tmp_path / "DiT-XL-2-256x256.pt"))
