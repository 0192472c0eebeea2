"""Compile-time benchmark: a DiT training step at two depths, scanned vs unrolled.

  python -m vdit.tools.bench compile_time [--quick] [--set variant='"XL/2"'] --json
      [--set depths='(4,8,16,28)'] [--set png='"docs/images/compile_time.png"']

Lowers and compiles (XLA on this host's backend) `jit(value_and_grad(mean-squared output))` of
`DiT.from_variant(variant)` on a 32×32×4 latent batch, with abstract parameters (nothing is
allocated or run), for `depths` (default 4 and 28) with `nn.scan` over the blocks and, unless
`--quick`, unrolled. DESIGN.md's goal: with scan, depth 28 compiles in ≤ 1.3× the time of
depth 4 (`ratio`; `cpu_ratio` from process CPU time). Times are the median of `repeats` fresh
compilations (jit cache cleared). With `png`, writes compile time vs depth there (process CPU
and wall clock, scan vs unrolled).
"""

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.models import dit
from vdit.tools.bench import plots


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


def write_png(path: str, results: dict) -> str:
  """Compile seconds vs depth, one line per mode measured (scan, unrolled); process CPU time
  (the steadier number on a shared machine) and wall clock side by side."""
  modes = [m for m in ("scan", "unrolled") if m in results]
  fig, panels = plots.subplots(
    2,
    f"DiT-{results['variant']} train step (jit(value_and_grad)), compile time on "
    f"{results['backend']}, 2-core CPU (loaded)",
  )
  for ax, key, label in zip(
    panels, ("cpu_seconds", "seconds"), ("process CPU seconds", "wall-clock seconds")
  ):
    for mode in modes:
      depths = sorted(int(d) for d in results[mode][key])
      ax.plot(depths, [results[mode][key][str(d)] for d in depths], "o-", label=mode)
      ratio = results[mode]["cpu_ratio" if key == "cpu_seconds" else "ratio"]
      ax.annotate(
        f"×{ratio:.2f}", (depths[-1], results[mode][key][str(depths[-1])]), fontsize=8,
        xytext=(4, 0), textcoords="offset points", va="center",
      )  # fmt: skip
    ax.set(xlabel="depth (blocks)", ylabel=label, title=label.split(" seconds")[0])
    ax.set_ylim(bottom=0)
    ax.margins(x=0.2)  # room for the ratio labels
    ax.legend(fontsize=8, title="×: last / first depth", title_fontsize=7)
  return plots.save(fig, path)


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
  out = {"variant": variant, "remat": remat, "backend": jax.default_backend(), **results}
  if options.get("png"):
    out["png"] = write_png(options["png"], out)
  return out
