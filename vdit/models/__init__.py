"""Models looked up by name (`config.model.name`), built from the config.

video_dit                  VideoDiT (the text-to-video model): its dataclass fields, the rest
                           derived from the data and the objective (`build_video_dit`)
vit, navit, vivit, dit,    the zoo: `config.model` holds the module's fields (width, depth,
                           num_heads, patch_size, ...), or a `variant` name ("B/16", "S/2";
                           each module's table; ViViT: `size`, as its `variant` field is the
                           kind) whose sizes the explicit fields override.
vae                        VideoAutoencoder (its fields: channels, time_compression, ...).
"""

import dataclasses
import importlib

import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit import batch_spec
from vdit.diffusion import objectives
from vdit.models.video_dit import VideoDiT

CHANNELS = 3  # RGB pixels; `input.channels` overrides it (latents: the autoencoder's Z)


def channels(config: ml_collections.ConfigDict) -> int:
  """C of the model's input: `input.channels` (latent space) or RGB."""
  return int(config.input.get("channels", None) or CHANNELS)


def patch_dim(config: ml_collections.ConfigDict) -> int:
  """P = pt·ph·pw·C of the packed patches."""
  return int(np.prod(config.input.patch_size)) * channels(config)


def build(config: ml_collections.ConfigDict):
  """The Flax module named by `config.model.name`."""
  m = config.model
  if m.name == "video_dit":
    return build_video_dit(config)
  if m.name in ZOO:
    return build_zoo(m)
  raise ValueError(
    f"model.name={m.name!r} is not a known model; expected one of {['video_dit', *ZOO]}"
  )


# VideoDiT fields the rest of the config decides (sizes of the data, the objective).
DERIVED = ("patch_dim", "out_dim", "vocab_size", "self_condition", "channels", "patch_size")


def build_video_dit(config: ml_collections.ConfigDict) -> VideoDiT:
  """VideoDiT from `config.model`: its dataclass fields (absent ones keep the module's
  defaults), with `DERIVED` taken from the input and diffusion sections and
  `shared_conditioning` a switch (on: one conditioning slot per example of a row)."""
  given = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  unknown = sorted(set(given) - _fields(VideoDiT) | set(given) & set(DERIVED))
  if unknown:
    raise ValueError(
      f"model keys {unknown} are not settable fields of VideoDiT; expected one of "
      f"{sorted(_fields(VideoDiT) - set(DERIVED))}"
    )
  kwargs = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in given.items()}
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  if "shared_conditioning" in kwargs:  # a switch in the config, K slots in the module
    kwargs["shared_conditioning"] = (
      config.input.max_examples_per_row if kwargs["shared_conditioning"] else 0
    )
  spec = objectives.Spec.from_config(config.diffusion)
  return VideoDiT(
    patch_dim=patch_dim(config),
    out_dim=spec.output_dim(patch_dim(config)),
    vocab_size=config.input.vocab_size,
    self_condition=spec.self_condition > 0,
    channels=channels(config),
    patch_size=tuple(int(p) for p in config.input.patch_size),
    **kwargs,
  )


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


# name -> (module path, class name).
ZOO = {
  "vit": ("vdit.models.vit", "ViT"),
  "navit": ("vdit.models.navit", "NaViT"),
  "vivit": ("vdit.models.vivit", "ViViT"),
  "dit": ("vdit.models.dit", "DiT"),
  "vae": ("vdit.models.autoencoder", "VideoAutoencoder"),  # the causal video VAE
}


def build_zoo(m: ml_collections.ConfigDict):
  """A zoo module from `config.model`: its dataclass fields, over its `variant` if one is named."""
  module, name = ZOO[m.name]
  cls = getattr(importlib.import_module(module), name)
  fields = _fields(cls)
  given = m.to_dict()
  # ViViT's `variant` field is its kind ("factorised_encoder", ...); its size table is `size`.
  table_key = "size" if m.name == "vivit" else "variant"
  unknown = sorted(set(given) - fields - {"name", table_key})
  if unknown:
    raise ValueError(f"model keys {unknown} are not fields of {name}; expected {sorted(fields)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in fields}
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  table = given.get(table_key)
  if not table:
    return cls(**kwargs)
  if m.name == "vivit":
    return cls.from_variant(table, kwargs.pop("variant"), **kwargs)
  return cls.from_variant(table, **kwargs)


def dummy_inputs(config: ml_collections.ConfigDict, rows: int = 1) -> tuple:
  """Inputs of the packed-batch shapes (`batch_spec`: padding rows) for `init` / `eval_shape`,
  in the order of VideoDiT's call: x, t, positions, segment_ids, text_tokens, text_segment_ids,
  labels (and text_embeddings with precomputed captions)."""
  inp = config.input
  embed_dim = config.model.get("text_embed_dim", 0)
  keys = ("patches", "positions", "segment_ids", "text_tokens", "text_segment_ids", "labels")
  keys += ("text_embeddings",) if embed_dim else ()
  sizes = dict(
    B=rows,
    L=inp.tokens_per_row,
    M=inp.text_tokens_per_row,
    K=inp.max_examples_per_row,
    P=patch_dim(config),
    D=embed_dim,
  )
  # jnp, not batch_spec.padding's numpy: under `jax.eval_shape` (aot) nothing is allocated.
  pad = lambda k: jnp.full(
    batch_spec.shape(k, sizes), batch_spec.FIELDS[k].pad, batch_spec.FIELDS[k].dtype
  )
  x, *rest = (pad(k) for k in keys)
  return (x, jnp.zeros((rows, inp.tokens_per_row), jnp.float32), *rest)
