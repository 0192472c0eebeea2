"""Weight import/export between vdit and reference checkpoints, as functions over name→array dicts.

Layouts (names and shapes follow the reference code's module structure):

* `"dit"`: facebookresearch/DiT `models.py` state dicts (`DiT-XL-2-256x256.pt`, …): `x_embedder.
  proj` (Conv2d [D, C, p, p]), `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`,
  `blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}`, `final_layer.
  {linear, adaLN_modulation.1}`, and the fixed `pos_embed` buffer (checked against
  `posemb.sincos_2d`, not imported). torch Linear weights are [out, in]; vdit kernels [in, out].
* `"diffusers"`: diffusers `DiTTransformer2DModel` safetensors: `pos_embed.proj`,
  `transformer_blocks.{i}.{norm1.emb.timestep_embedder.linear_{1,2}, norm1.emb.class_embedder.
  embedding_table, norm1.linear, attn1.to_{q,k,v}, attn1.to_out.0, ff.net.0.proj, ff.net.2}`,
  `proj_out_{1,2}`. diffusers keeps a copy of the time/label embedders in every block (they are
  equal in converted checkpoints; import checks that and takes one). Its time frequencies use
  the denominator half−1 (`downscale_freq_shift=1`) where DiT uses half: imported diffusers
  weights see slightly different time features than in diffusers itself.
* `"vision_transformer"`: the ViT npz of google-research/vision_transformer (AugReg; what timm's
  `_load_weights` reads): `embedding` (conv [p, p, C, D]), `cls`, `Transformer/posembed_input/
  pos_embedding` (1 + N rows with a class token), `Transformer/encoderblock_{i}/{LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3/Dense_{0,1}}`, `Transformer/
  encoder_norm`, `head`.
* `"big_vision"`: big_vision `vit.py` npz: as above but `pos_embedding` at the top (no class
  token row, so only "gap"/"map" pooling maps exactly), blocks `LayerNorm_0,
  MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`, and `MAPHead_0/...`.

Every reference key must be consumed (a leftover or missing key is an error naming it), and
export∘import is the identity (tests/test_convert.py). vdit params come back unboxed, in the
scanned layout (`blocks` with a leading [depth] axis) or unrolled (`scan_layers=False`).

Reading files: `.npz` needs numpy only; `.safetensors` needs the `safetensors` package;
DiT `.pt` files are pickled torch tensors, so `load_torch` imports torch (an optional
dependency used for nothing else).
"""

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from vdit.models import layers, posemb

Arrays = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------
# Files and trees.
# ------------------------------------------------------------------------------------------


def load_npz(path: str) -> Arrays:
  with np.load(path, allow_pickle=False) as f:
    return {k: np.asarray(f[k]) for k in f.files}


def load_safetensors(path: str) -> Arrays:
  from safetensors.numpy import load_file  # noqa: PLC0415  (optional dependency)

  return dict(load_file(path))


def load_torch(path: str) -> Arrays:
  """A torch-pickled state dict (official DiT `.pt`) -> numpy. Needs torch (optional)."""
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      f"reading {path!r} needs torch to unpickle it; install torch, or convert the file to "
      ".safetensors/.npz once elsewhere"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if "ema" in state and isinstance(state["ema"], Mapping):  # DiT training checkpoints
    state = state["ema"]
  return {k: v.float().numpy() for k, v in state.items()}


def flatten(tree: Mapping, prefix: str = "") -> Arrays:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = np.asarray(value)
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *path, last = name.split("/")
    for part in path:
      node = node.setdefault(part, {})
    node[last] = value
  return tree


class _Source:
  """A reference state dict whose keys are popped as they are used; `done()` checks the rest."""

  def __init__(self, arrays: Mapping[str, np.ndarray], layout: str):
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.layout = layout

  def pop(self, name: str) -> np.ndarray:
    if name not in self.arrays:
      raise KeyError(f"{self.layout} checkpoint has no {name!r}")
    return self.arrays.pop(name)

  def has(self, name: str) -> bool:
    return name in self.arrays

  def done(self) -> None:
    if self.arrays:
      raise ValueError(f"{self.layout} keys not imported: {sorted(self.arrays)[:20]}")


def _params(flat: Arrays, depth: int, scan_layers: bool) -> dict:
  """Unrolled flat names (`…/blocks_{i}/…`) -> {"params": tree}, stacked if `scan_layers`."""
  tree = unflatten(flat)
  if scan_layers:
    tree = layers.stack_layers(tree, "blocks", depth)
  return {"params": jax.tree.map(np.asarray, tree)}


def _unrolled(params: Mapping) -> tuple[Arrays, int]:
  """vdit params (scanned or unrolled, boxed or not) -> (flat unrolled names, depth)."""
  flat = flatten(nn.unbox(params.get("params", params)))
  scanned = [v for k, v in flat.items() if k.startswith("blocks/") or "/blocks/" in k]
  if scanned:
    depth = int(scanned[0].shape[0])
    tree = layers.unstack_layers(unflatten(flat), "blocks", depth)
    flat = {k: np.asarray(v) for k, v in flatten(tree).items()}
  else:
    depth = len({m.group(0) for k in flat if (m := re.search(r"blocks_\d+", k))})
  return flat, depth


# ------------------------------------------------------------------------------------------
# DiT: official (facebookresearch/DiT) and diffusers.
# ------------------------------------------------------------------------------------------

DIT_LAYOUTS = ("dit", "diffusers")
# vdit name -> (official DiT, diffusers) torch Linear names; "{i}" is the block index.
_DIT_LINEARS = {
  "final/adaln/proj": ("final_layer.adaLN_modulation.1", "proj_out_1"),
  "final/proj": ("final_layer.linear", "proj_out_2"),
  "blocks_{i}/adaln/proj": ("blocks.{i}.adaLN_modulation.1", "transformer_blocks.{i}.norm1.linear"),
  "blocks_{i}/mlp/fc1": ("blocks.{i}.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
  "blocks_{i}/mlp/fc2": ("blocks.{i}.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
}
# Time and label embedders: once in DiT, a copy in every block in diffusers.
_DIT_EMBEDDERS = {
  "t_embed/fc1": ("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
  "t_embed/fc2": ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
}
_DIT_LABELS = (
  "y_embedder.embedding_table.weight",
  "norm1.emb.class_embedder.embedding_table.weight",
)
_DIT_PATCH = ("x_embedder.proj", "pos_embed.proj")


def _check_dit_layout(layout: str) -> int:
  if layout not in DIT_LAYOUTS:
    raise ValueError(f"DiT layout={layout!r} is unknown; expected one of {DIT_LAYOUTS}")
  return DIT_LAYOUTS.index(layout)


def _time_fc1(kernel: np.ndarray) -> np.ndarray:
  """Swaps the two halves of the first time-MLP kernel's input rows: DiT's time features are
  [cos, sin], `layers.TimestepEmbedding`'s are [sin, cos]. Its own inverse."""
  half = kernel.shape[0] // 2
  return np.concatenate([kernel[half:], kernel[:half]], axis=0)


def _dit_pos_embed(side: int, width: int) -> np.ndarray:
  grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
  return np.asarray(posemb.sincos_2d(grid.reshape(-1, 2), width))[None]  # [1, N, D]


def dit_from_reference(
  arrays: Mapping[str, np.ndarray], num_heads: int, layout: str = "dit", scan_layers: bool = True
) -> dict:
  """Official DiT (`layout="dit"`) or diffusers DiTTransformer2DModel state dict -> vdit DiT."""
  j = _check_dit_layout(layout)
  src = _Source(arrays, layout)
  conv = src.pop(f"{_DIT_PATCH[j]}.weight")  # [D, C, p, p]
  d, c, p, _ = conv.shape
  flat: Arrays = {
    "patch_embed/kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * c, d),
    "patch_embed/bias": src.pop(f"{_DIT_PATCH[j]}.bias"),
  }
  block = ("blocks.{i}.attn.qkv.weight", "transformer_blocks.{i}.attn1.to_q.weight")[j]
  depth = 0
  while src.has(block.format(i=depth)):
    depth += 1
  if depth == 0:
    raise ValueError(f"{layout} checkpoint has no {block.format(i=0)!r}: no blocks")

  copies = [""] if j == 0 else [f"transformer_blocks.{i}." for i in range(depth)]
  for ours, names in {**_DIT_EMBEDDERS, "label_embed": None}.items():
    values = []
    for prefix in copies:
      if names is None:
        values.append({"embedding": src.pop(prefix + _DIT_LABELS[j])})
      else:
        w, b = src.pop(f"{prefix}{names[j]}.weight"), src.pop(f"{prefix}{names[j]}.bias")
        values.append({"kernel": w.T, "bias": b})
    for i, value in enumerate(values[1:], 1):
      for key in value:
        if not np.array_equal(value[key], values[0][key]):
          raise ValueError(f"diffusers block {i} has other {ours} weights than block 0")
    for key, value in values[0].items():
      flat[f"{ours}/{key}"] = value
  flat["t_embed/fc1/kernel"] = _time_fc1(flat["t_embed/fc1/kernel"])

  for i in range(depth):
    ours = f"blocks_{i}/self_attn/"
    if j == 0:
      w, b = src.pop(f"blocks.{i}.attn.qkv.weight"), src.pop(f"blocks.{i}.attn.qkv.bias")
      qkv = list(zip(np.split(w, 3), np.split(b, 3)))
      out_w, out_b = src.pop(f"blocks.{i}.attn.proj.weight"), src.pop(f"blocks.{i}.attn.proj.bias")
    else:
      pre = f"transformer_blocks.{i}.attn1."
      qkv = [(src.pop(f"{pre}to_{n}.weight"), src.pop(f"{pre}to_{n}.bias")) for n in "qkv"]
      out_w, out_b = src.pop(f"{pre}to_out.0.weight"), src.pop(f"{pre}to_out.0.bias")
    for name, (w, b) in zip(("query", "key", "value"), qkv):
      flat[f"{ours}{name}/kernel"] = w.T.reshape(d, num_heads, d // num_heads)
      flat[f"{ours}{name}/bias"] = b.reshape(num_heads, d // num_heads)
    flat[f"{ours}out/kernel"] = out_w.T.reshape(num_heads, d // num_heads, d)
    flat[f"{ours}out/bias"] = out_b
  for ours, names in _DIT_LINEARS.items():
    for i in range(depth) if "{i}" in ours else [0]:
      name = names[j].format(i=i)
      flat[f"{ours.format(i=i)}/kernel"] = src.pop(f"{name}.weight").T
      flat[f"{ours.format(i=i)}/bias"] = src.pop(f"{name}.bias")
  if j == 0:  # the fixed position code: check it, vdit computes it
    table = src.pop("pos_embed")
    side = int(round(np.sqrt(table.shape[1])))
    if side * side != table.shape[1] or not np.allclose(table, _dit_pos_embed(side, d), atol=1e-4):
      raise ValueError("DiT pos_embed is not the 2-D sin-cos code of a square grid")
  src.done()
  return _params(flat, depth, scan_layers)


def dit_to_reference(
  params: Mapping, patch_size: int, layout: str = "dit", input_size: int = 32
) -> Arrays:
  """vdit DiT params (scanned or unrolled) -> official DiT or diffusers state dict (numpy).

  `input_size` (latent side I) sizes the official `pos_embed` buffer ((I/p)² rows).
  """
  j = _check_dit_layout(layout)
  flat, depth = _unrolled(params)
  p = patch_size
  kernel = flat["patch_embed/kernel"]
  d = kernel.shape[1]
  c = kernel.shape[0] // (p * p)
  out: Arrays = {
    f"{_DIT_PATCH[j]}.weight": kernel.reshape(p, p, c, d).transpose(3, 2, 0, 1),
    f"{_DIT_PATCH[j]}.bias": flat["patch_embed/bias"],
  }
  copies = [""] if j == 0 else [f"transformer_blocks.{i}." for i in range(depth)]
  for prefix in copies:
    for ours, names in _DIT_EMBEDDERS.items():
      w = flat[f"{ours}/kernel"]
      w = _time_fc1(w) if ours == "t_embed/fc1" else w
      out[f"{prefix}{names[j]}.weight"] = w.T
      out[f"{prefix}{names[j]}.bias"] = flat[f"{ours}/bias"]
    out[prefix + _DIT_LABELS[j]] = flat["label_embed/embedding"]
  for i in range(depth):
    ours = f"blocks_{i}/self_attn/"
    qkv = [
      (flat[f"{ours}{n}/kernel"].reshape(d, d).T, flat[f"{ours}{n}/bias"].reshape(d))
      for n in ("query", "key", "value")
    ]
    out_w, out_b = flat[f"{ours}out/kernel"].reshape(d, d).T, flat[f"{ours}out/bias"]
    if j == 0:
      out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([w for w, _ in qkv])
      out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([b for _, b in qkv])
      out[f"blocks.{i}.attn.proj.weight"], out[f"blocks.{i}.attn.proj.bias"] = out_w, out_b
    else:
      pre = f"transformer_blocks.{i}.attn1."
      for n, (w, b) in zip("qkv", qkv):
        out[f"{pre}to_{n}.weight"], out[f"{pre}to_{n}.bias"] = w, b
      out[f"{pre}to_out.0.weight"], out[f"{pre}to_out.0.bias"] = out_w, out_b
  for ours, names in _DIT_LINEARS.items():
    for i in range(depth) if "{i}" in ours else [0]:
      name = names[j].format(i=i)
      out[f"{name}.weight"] = flat[f"{ours.format(i=i)}/kernel"].T
      out[f"{name}.bias"] = flat[f"{ours.format(i=i)}/bias"]
  if j == 0:
    out["pos_embed"] = _dit_pos_embed(input_size // p, d).astype(np.float32)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}  # writers need C order


# ------------------------------------------------------------------------------------------
# ViT: google-research/vision_transformer (timm-readable) and big_vision npz.
# ------------------------------------------------------------------------------------------

VIT_LAYOUTS = ("vision_transformer", "big_vision")
# vdit sub-module of a block -> reference name, per layout.
_VIT_BLOCK = {
  "norm1": ("LayerNorm_0", "LayerNorm_0"),
  "attn": ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
  "norm2": ("LayerNorm_2", "LayerNorm_1"),
  "mlp/fc1": ("MlpBlock_3/Dense_0", "MlpBlock_0/Dense_0"),
  "mlp/fc2": ("MlpBlock_3/Dense_1", "MlpBlock_0/Dense_1"),
}
_VIT_MAP = {  # big_vision MAPHead
  "map_head/probe": "MAPHead_0/probe",
  "map_head/attn": "MAPHead_0/MultiHeadDotProductAttention_0",
  "map_head/norm": "MAPHead_0/LayerNorm_0",
  "map_head/mlp/fc1": "MAPHead_0/MlpBlock_0/Dense_0",
  "map_head/mlp/fc2": "MAPHead_0/MlpBlock_0/Dense_1",
}
_VIT_POS = ("Transformer/posembed_input/pos_embedding", "pos_embedding")


def _vit_names(layout: str, depth: int, flat_keys) -> dict[str, str]:
  """vdit flat name -> reference flat name for every ViT parameter present in `flat_keys`."""
  if layout not in VIT_LAYOUTS:
    raise ValueError(f"ViT layout={layout!r} is unknown; expected one of {VIT_LAYOUTS}")
  if layout == "big_vision" and "cls" in flat_keys:
    raise ValueError(
      "big_vision adds its position table before the class token; a pool='token' ViT (table "
      "over 1 + N rows, as vision_transformer) has no exact big_vision form"
    )
  j = VIT_LAYOUTS.index(layout)
  names = {"pos_embedding": _VIT_POS[j]}
  for ours in ("embedding", "cls", "head", "encoder/norm"):
    names[ours] = {"encoder/norm": "Transformer/encoder_norm"}.get(ours, ours)
  for i in range(depth):
    for ours, ref in _VIT_BLOCK.items():
      names[f"encoder/blocks_{i}/{ours}"] = f"Transformer/encoderblock_{i}/{ref[j]}"
  names.update(_VIT_MAP)
  out = {}
  for key in flat_keys:
    prefix = max((n for n in names if key == n or key.startswith(n + "/")), key=len, default=None)
    if prefix is None:
      raise ValueError(f"vdit ViT parameter {key!r} has no {layout} name")
    out[key] = names[prefix] + key[len(prefix) :]
  return out


def vit_from_reference(
  arrays: Mapping[str, np.ndarray], layout: str = "vision_transformer", scan_layers: bool = True
) -> dict:
  """vision_transformer / big_vision ViT npz arrays -> vdit ViT params.

  A leading "params/" or "opt/target/" (older checkpoints) is stripped. The conv embedding
  [p, p, C, D] becomes the Dense kernel [p·p·C, D] of (ph, pw, C) patch vectors.
  """
  arrays = {re.sub(r"^(params/|opt/target/)", "", k): v for k, v in arrays.items()}
  if "pre_logits/kernel" in arrays:
    raise ValueError("ViT checkpoint has a pre_logits layer (an ImageNet-21k head), unsupported")
  depth = len({m.group(0) for k in arrays if (m := re.search(r"encoderblock_\d+", k))})
  src = _Source(arrays, layout)
  # Build the vdit names from the reference names present (inverse of _vit_names).
  ours_to_ref = _vit_names(layout, depth, _vit_param_names(arrays, layout, depth))
  flat: Arrays = {}
  for ours, ref in ours_to_ref.items():
    value = src.pop(ref)
    if ours == "embedding/kernel":
      value = value.reshape(-1, value.shape[-1])
    flat[ours] = value
  src.done()
  return _params(flat, depth, scan_layers)


def _vit_param_names(arrays: Mapping, layout: str, depth: int) -> list[str]:
  """The vdit flat names a reference ViT holds (which optional parts it has decides)."""
  j = VIT_LAYOUTS.index(layout)
  dense = ("kernel", "bias")
  norm = ("scale", "bias")
  names = ["embedding/kernel", "embedding/bias", "encoder/norm/scale", "encoder/norm/bias"]
  names += ["head/kernel", "head/bias"] if "head/kernel" in arrays else []
  names += ["cls"] if "cls" in arrays else []
  names += ["pos_embedding"] if _VIT_POS[j] in arrays else []
  attn = [f"{n}/{s}" for n in ("query", "key", "value", "out") for s in dense]
  block = [f"norm1/{s}" for s in norm] + [f"norm2/{s}" for s in norm] + [f"attn/{a}" for a in attn]
  block += [f"mlp/{fc}/{s}" for fc in ("fc1", "fc2") for s in dense]
  names += [f"encoder/blocks_{i}/{b}" for i in range(depth) for b in block]
  if "MAPHead_0/probe" in arrays:
    names += ["map_head/probe"] + [f"map_head/attn/{a}" for a in attn]
    names += [f"map_head/norm/{s}" for s in norm]
    names += [f"map_head/mlp/{fc}/{s}" for fc in ("fc1", "fc2") for s in dense]
  return names


def vit_to_reference(
  params: Mapping, patch_size: int, layout: str = "vision_transformer"
) -> Arrays:
  """vdit ViT params (scanned or unrolled) -> vision_transformer / big_vision npz arrays."""
  flat, depth = _unrolled(params)
  out = {}
  for ours, ref in _vit_names(layout, depth, flat).items():
    value = flat[ours]
    if ours == "embedding/kernel":
      value = value.reshape(patch_size, patch_size, -1, value.shape[-1])
    out[ref] = np.ascontiguousarray(value)
  return out
