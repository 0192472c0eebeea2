"""Compile-time benchmark: a DiT training step at two depths, scanned vs unrolled.

  python -m vdit.tools.bench compile_time [--quick] [--set variant='"XL/2"'] --json

Lowers and compiles (XLA on this host's backend) `jit(value_and_grad(mean-squared output))` of
`DiT.from_variant(variant)` on a 32×32×4 latent batch, with abstract parameters (nothing is
allocated or run), for `depths` (default 4 and 28) with `nn.scan` over the blocks and, unless
`--quick`, unrolled. DESIGN.md's goal: with scan, depth 28 compiles in ≤ 1.3× the time of
depth 4 (`ratio`; `cpu_ratio` from process CPU time). Times are the median of `repeats` fresh
compilations (jit cache cleared).
"""

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.models import dit


def compile_seconds(
  variant: str, depth: int, scan: bool, remat: str, batch: int = 8
) -> tuple[float, float]:
  """(wall, CPU) seconds to lower and compile the step; CPU time (all threads of this
  process) is the steadier number on a shared machine."""
  model = dit.DiT.from_variant(variant, depth=depth, scan_layers=scan, remat_policy=remat)
  x = jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(t.shape),
                                jnp.zeros(y.shape, jnp.int32)))
  )  # fmt: skip

  def loss(p, x, t, y):
    return jnp.mean(jnp.square(model.apply(p, x, t, y)))

  step = jax.jit(jax.value_and_grad(loss))
  start, cpu = time.perf_counter(), time.process_time()
  step.lower(params, x, t, y).compile()
  return time.perf_counter() - start, time.process_time() - cpu


def run(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  variant = options.get("variant", "XL/2")
  depths = tuple(options.get("depths", (4, 28)))
  remat = options.get("remat", "none")
  repeats = int(options.get("repeats", 1 if quick else 3))
  results = {}
  for scan in (True,) if quick else (True, False):
    wall, cpu = {}, {}
    for depth in depths:
      samples = []
      for _ in range(repeats):
        jax.clear_caches()
        samples.append(compile_seconds(variant, depth, scan, remat))
      wall[depth] = round(statistics.median(s[0] for s in samples), 2)
      cpu[depth] = round(statistics.median(s[1] for s in samples), 2)
    results["scan" if scan else "unrolled"] = {
      "seconds": {str(d): s for d, s in wall.items()},
      "cpu_seconds": {str(d): s for d, s in cpu.items()},
      "ratio": round(wall[depths[-1]] / wall[depths[0]], 3),
      "cpu_ratio": round(cpu[depths[-1]] / cpu[depths[0]], 3),
    }
  return {"variant": variant, "remat": remat, "backend": jax.default_backend(), **results}
