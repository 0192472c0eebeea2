"""Analytic forward FLOPs of the model zoo, and a counter of the FLOPs a traced function does.

Convention: FLOPs = 2 × multiply-adds of the matrix products (dense layers and the two
attention products QKᵀ and AV); elementwise work (norms, softmax, GELU) is not counted — it is
~1% at real sizes, which is what the 2% agreement with XLA's `cost_analysis` measures
(`python -m vdit.tools.bench flop_counts`). DiT's paper reports "Gflops" as multiply-adds
(Peebles & Xie 2023, Table 4: DiT-XL/2 = 118.6 at 256² → a 32×32×4 latent), i.e. FLOPs / 2:
`dit(...) / 2`.

`dot_flops(fn, *args)` counts 2·M·N·K over every `dot_general` of `fn`'s jaxpr (scans × their
length); the tests hold the formulas below to it exactly.
"""

import math
from collections.abc import Callable, Sequence

import jax

# Peebles & Xie 2023, Table 4: Gflops (multiply-adds) of the DiT variants at 256² (32×32×4).
DIT_PAPER_GFLOPS = {
  "S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
  "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
}  # fmt: skip


def dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def attention_core(sequences: int, lq: int, lk: int, width: int) -> int:
  """QKᵀ and AV of `sequences` independent sequences, all heads (H·Dh = width)."""
  return 2 * 2 * sequences * lq * lk * width


def mha(sequences: int, lq: int, lk: int, width: int) -> int:
  """Self-/cross-attention: q, k, v, out projections and the core."""
  proj = dense(sequences * lq, width, width) * 2 + dense(sequences * lk, width, width) * 2
  return proj + attention_core(sequences, lq, lk, width)


def mlp(tokens: int, width: int, mlp_ratio: float) -> int:
  return 2 * dense(tokens, width, int(width * mlp_ratio))


def encoder_block(sequences: int, length: int, width: int, mlp_ratio: float = 4.0) -> int:
  """Pre-LN block over `sequences` rows of `length` tokens (dense attention within a row)."""
  return mha(sequences, length, length, width) + mlp(sequences * length, width, mlp_ratio)


def map_head(rows: int, queries: int, length: int, width: int, mlp_ratio: float = 4.0) -> int:
  """Attention-pooling head: `queries` probes per row over `length` tokens, then an MLP."""
  return mha(rows, queries, length, width) + mlp(rows * queries, width, mlp_ratio)


def vit(
  batch: int,
  image_size: int,
  patch_size: int,
  width: int,
  depth: int,
  num_classes: int,
  pool: str = "token",
  mlp_ratio: float = 4.0,
  channels: int = 3,
) -> int:
  n = (image_size // patch_size) ** 2
  length = n + (pool == "token")
  total = dense(batch * n, patch_size * patch_size * channels, width)
  total += depth * encoder_block(batch, length, width, mlp_ratio)
  if pool == "map":
    total += map_head(batch, 1, length, width, mlp_ratio)
  return total + dense(batch, width, num_classes)


def navit_packed(
  batch: int,
  length: int,
  examples: int,
  patch_dim: int,
  width: int,
  depth: int,
  num_classes: int,
  mlp_ratio: float = 4.0,
) -> int:
  """NaViT on packed rows [B, L], K examples per row, dense (`xla`) attention over each row."""
  total = dense(batch * length, patch_dim, width)
  total += depth * encoder_block(batch, length, width, mlp_ratio)
  total += map_head(batch, examples, length, width, mlp_ratio)
  return total + dense(batch * examples, width, num_classes)


def vivit(
  batch: int,
  variant: str,
  frames: int,
  image_size: int,
  tubelet: Sequence[int],
  width: int,
  depth: int,
  num_classes: int,
  temporal_depth: int = 4,
  mlp_ratio: float = 4.0,
  channels: int = 3,
) -> int:
  """The four ViViT variants (Arnab et al. 2021, Sec. 3.3)."""
  pt, ph, pw = tubelet
  nt, ns = frames // pt, (image_size // ph) * (image_size // pw)
  n = nt * ns
  total = dense(batch * n, pt * ph * pw * channels, width) + dense(batch, width, num_classes)
  block_mlp = mlp(batch * n, width, mlp_ratio)
  if variant == "spatio_temporal":
    return total + depth * encoder_block(batch, n + 1, width, mlp_ratio)
  if variant == "factorised_encoder":
    total += depth * encoder_block(batch * nt, ns + 1, width, mlp_ratio)
    return total + temporal_depth * encoder_block(batch, nt + 1, width, mlp_ratio)
  if variant == "factorised_self_attention":
    per = mha(batch * nt, ns, ns, width) + mha(batch * ns, nt, nt, width) + block_mlp
    return total + depth * per
  if variant == "factorised_dot_product":
    proj = 4 * dense(batch * n, width, width)
    core = attention_core(batch * nt, ns, ns, width // 2)
    core += attention_core(batch * ns, nt, nt, width // 2)
    return total + depth * (proj + core + block_mlp)
  raise ValueError(f"ViViT variant={variant!r} is unknown")


def dit(
  batch: int,
  input_size: int,
  patch_size: int,
  width: int,
  depth: int,
  in_channels: int = 4,
  learn_sigma: bool = True,
  mlp_ratio: float = 4.0,
  frequency_dim: int = 256,
) -> int:
  """DiT forward FLOPs (2 × multiply-adds; the paper's Gflops are half of this)."""
  n = (input_size // patch_size) ** 2
  p_in = patch_size * patch_size * in_channels
  p_out = p_in * (2 if learn_sigma else 1)
  total = dense(batch * n, p_in, width)  # patch embedding
  total += dense(batch, frequency_dim, width) + dense(batch, width, width)  # time MLP
  block = dense(batch, width, 6 * width) + encoder_block(batch, n, width, mlp_ratio)
  total += depth * block
  return total + dense(batch, width, 2 * width) + dense(batch * n, width, p_out)


# ------------------------------------------------------------------------------------------
# Counting the matrix products of a traced function.
# ------------------------------------------------------------------------------------------


def _dot_general_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs[i] for i in lc)
  batch = math.prod(lhs[i] for i in lb)
  lhs_free = math.prod(s for i, s in enumerate(lhs) if i not in lc and i not in lb)
  rhs_free = math.prod(s for i, s in enumerate(rhs) if i not in rc and i not in rb)
  return 2 * batch * lhs_free * rhs_free * contract


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, tuple | list):
    for v in value:
      yield from _sub_jaxprs(v)


def _jaxpr_dot_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      total += _dot_general_flops(eqn)
      continue
    inner = sum(_jaxpr_dot_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
    if eqn.primitive.name == "scan":
      inner *= eqn.params["length"]
    total += inner
  return total


def dot_flops(fn: Callable, *args, **kwargs) -> int:
  """2·M·N·K summed over the `dot_general`s `fn(*args)` traces to (scan bodies × length)."""
  return _jaxpr_dot_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
