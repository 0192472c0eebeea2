"""Fixed position encodings: 1-D/2-D/3-D sin-cos and 3-D rotary embeddings (pure functions).

All are computed from integer (or fractional) coordinates on the fly, so every grid size works
without a table (NaViT, Sec. 3.1). Learned encodings live with their models: the ViT table in
`vit.py`, NaViT's factorized (absolute or fractional) embeddings in `navit.py`.
`layers` re-exports `sincos_1d` and `sincos_3d`.
"""

import jax
import jax.numpy as jnp

from vdit import segments


def sincos_1d(positions: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Transformer sin-cos encoding of (float) positions [...] -> [..., dim] (Vaswani, Sec. 3.5).

  Layout [sin(p·ω), cos(p·ω)] with ω_i = max_period^(−i / (dim/2)), as in MAE/DiT.
  """
  if dim % 2:
    raise ValueError(f"sin-cos dim={dim} must be even")
  omega = max_period ** (-jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  angles = positions.astype(jnp.float32)[..., None] * omega  # [..., dim/2]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


# What an additive sin-cos code reads (`VideoDiT.position_code`, `Captioner.position_code`).
POSITION_CODES = ("absolute", "fractional")


def coded_positions(kind: str, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """The (t, h, w) a sin-cos code of kind `kind` (one of POSITION_CODES) reads for packed
  positions [B, L, 3]: as given ("absolute", patches from the example's corner) or with h and w
  as fractions of each token's own example grid ("fractional")."""
  if kind == "fractional":
    return fractional(positions, segments.extents(segment_ids, positions))
  if kind != "absolute":
    raise ValueError(f"position_code={kind!r}: expected one of {POSITION_CODES}")
  return positions


def fractional(positions: jax.Array, extents: jax.Array, scale: float = 16.0) -> jax.Array:
  """(t, h, w) positions [..., 3] with h and w as fractions of their example's grid, times
  `scale` (NaViT's fractional coordinates, Sec. 3.1): a place is the same fraction of the way
  across every canvas, whatever its size and aspect. Time stays absolute (patch-frames)."""
  centre = (positions[..., 1:].astype(jnp.float32) + 0.5) / extents[..., 1:].astype(jnp.float32)
  return jnp.concatenate([positions[..., :1].astype(jnp.float32), scale * centre], axis=-1)


def sincos_2d(positions: jax.Array, dim: int) -> jax.Array:
  """2-D sin-cos encoding of (h, w) positions: [..., 2] -> [..., dim] (MAE/DiT).

  As MAE's and DiT's `get_2d_sincos_pos_embed`, whose meshgrid puts the *w* coordinate in the
  first half and h in the second: [sincos_1d(w, dim/2), sincos_1d(h, dim/2)]. Kept bit-exact
  so that imported DiT weights see the position code they were trained with.
  """
  if dim % 4:
    raise ValueError(f"sincos_2d dim={dim} must be a multiple of 4")
  return jnp.concatenate(
    [sincos_1d(positions[..., 1], dim // 2), sincos_1d(positions[..., 0], dim // 2)], axis=-1
  )


def sincos_3d(positions: jax.Array, dim: int) -> jax.Array:
  """3-D sin-cos position encoding of integer (t, h, w) positions: [B, L, 3] -> [B, L, dim].

  The 2-D encoding of MAE/DiT extended to time: `dim` is split into three even chunks (h and
  w get 2·⌊dim/6⌋ each, t the rest), each a 1-D encoding of its coordinate. Computed from the
  positions on the fly, so every grid size works without a table (NaViT, Sec. 3.1).
  """
  if dim % 2 or dim < 6:
    raise ValueError(f"sincos_3d dim={dim} must be even and >= 6")
  d_hw = 2 * (dim // 6)
  d_t = dim - 2 * d_hw
  return jnp.concatenate(
    [
      sincos_1d(positions[..., 0], d_t),
      sincos_1d(positions[..., 1], d_hw),
      sincos_1d(positions[..., 2], d_hw),
    ],
    axis=-1,
  )


def rope_split(head_dim: int, num_axes: int = 3) -> tuple[int, ...]:
  """How RoPE splits a head of `head_dim` over (t, h, w): even chunks, t gets the rest."""
  if head_dim % 2 or head_dim < 2 * num_axes:
    raise ValueError(f"RoPE head_dim={head_dim} must be even and >= {2 * num_axes}")
  d = 2 * (head_dim // (2 * num_axes))
  return (head_dim - (num_axes - 1) * d,) + (d,) * (num_axes - 1)


def rope(x: jax.Array, positions: jax.Array, max_period: float = 10_000.0) -> jax.Array:
  """Multi-axis rotary position embedding (Su et al. 2021 "RoFormer", Sec. 3.4.2).

  x: [B, L, H, Dh]; positions: [B, L, A] (A = 3 for (t, h, w), as in 3-D RoPE of video
  transformers). The head dim is split into A even chunks (`rope_split`); in each chunk the
  halves (x₁, x₂) are rotated by angles p·ω_i, ω_i = max_period^(−i/(d/2)) ("rotate half"
  layout). q·k then depends only on the position difference per axis. Returns x's shape/dtype.
  """
  chunks = rope_split(x.shape[-1], positions.shape[-1])
  outs, start = [], 0
  for axis, d in enumerate(chunks):
    part = x[..., start : start + d].astype(jnp.float32)
    start += d
    omega = max_period ** (-jnp.arange(d // 2, dtype=jnp.float32) / (d // 2))
    angle = positions[..., axis].astype(jnp.float32)[..., None, None] * omega  # [B, L, 1, d/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = part[..., : d // 2], part[..., d // 2 :]
    outs.append(jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1))
  return jnp.concatenate(outs, axis=-1).astype(x.dtype)
