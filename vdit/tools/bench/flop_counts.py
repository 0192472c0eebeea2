"""FLOPs benchmark: the DiT table against the paper, and the analytic formulas against XLA.

  python -m vdit.tools.bench flop_counts [--quick] --json

`dit_table`: for the twelve DiT variants at 256² (a 32×32×4 latent), trainable parameters
(+ the fixed pos_embed buffer the official state dict also counts) and the analytic Gflops in
the paper's unit (multiply-adds, `vdit.models.flops.dit / 2`) next to Table 4 of Peebles & Xie.
`xla`: analytic FLOPs vs XLA's `cost_analysis()` of the compiled *unrolled* forward (XLA counts
a scanned body once) for DiT-XL/2, the four ViViT-B/16×2 variants and NaViT-B on packed rows
(`--quick`: smaller models). XLA also counts elementwise work, which the formulas leave out.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.models import dit, flops, navit, vivit

PAPER_GFLOPS = flops.DIT_PAPER_GFLOPS


def _abstract_params(model, *args):
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args)))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def dit_table() -> list[dict]:
  rows = []
  args = (jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  for variant, paper in PAPER_GFLOPS.items():
    sizes = dit.decode_variant(variant)
    params = _count(_abstract_params(dit.DiT.from_variant(variant), *args))
    n = (32 // sizes["patch_size"]) ** 2
    gflops = flops.dit(1, 32, sizes["patch_size"], sizes["width"], sizes["depth"]) / 2e9
    rows.append(
      dict(
        variant=variant,
        params=params,
        params_with_pos_embed=params + n * sizes["width"],
        gflops=round(gflops, 3),
        paper_gflops=paper,
        rel_error=round(gflops / paper - 1, 5),
      )
    )
  return rows


def _xla_flops(model, args) -> float:
  params = _abstract_params(model, *args)
  abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  compiled = jax.jit(lambda p, *a: model.apply(p, *a)).lower(params, *abstract).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost["flops"])


def _packed_row(length: int, examples: int, patch_dim: int):
  """One packed NaViT row of `examples` square-ish images and padding."""
  sizes = np.linspace(1.0, 2.0, examples)
  sizes = (sizes / sizes.sum() * 0.95 * length).astype(int)
  ids = np.zeros((1, length), np.int32)
  pos = np.zeros((1, length, 3), np.int32)
  shapes = np.zeros((1, examples, 3), np.int32)
  start = 0
  for k, n in enumerate(sizes):
    w = max(1, int(np.sqrt(n)))
    h = n // w
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ids[0, start : start + h * w] = k + 1
    pos[0, start : start + h * w, 1:] = np.stack([hh.ravel(), ww.ravel()], -1)
    shapes[0, k] = (1, h, w)
    start += h * w
  return (
    jnp.zeros((1, length, patch_dim)),
    jnp.asarray(pos),
    jnp.asarray(ids),
    jnp.asarray(shapes),
  )


def xla_agreement(quick: bool = False) -> list[dict]:
  rows = []

  def add(name, model, analytic, *args):
    xla = _xla_flops(model, args)
    rows.append(dict(model=name, analytic=analytic, xla=xla, ratio=round(xla / analytic, 5)))

  variant = "S/2" if quick else "XL/2"
  s = dit.decode_variant(variant)
  model = dit.DiT.from_variant(variant, scan_layers=False)
  args = (jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  add(f"DiT-{variant}", model, flops.dit(1, 32, s["patch_size"], s["width"], s["depth"]), *args)

  size, frames, image = ("S", 8, 112) if quick else ("B", 32, 224)
  for v in vivit.VIVIT_VARIANTS:
    model = vivit.ViViT.from_variant(size, v, 400, tubelet=(2, 16, 16), scan_layers=False)
    f = flops.vivit(
      1, v, frames, image, (2, 16, 16), model.width, model.depth, 400, model.temporal_depth
    )
    add(
      f"ViViT-{size}/16x2 {v} {frames}x{image}²", model, f, jnp.zeros((1, frames, image, image, 3))
    )

  size, length, k = ("S", 512, 4) if quick else ("B", 1024, 6)
  model = navit.NaViT.from_variant(size, 1000, scan_layers=False)
  f = flops.navit_packed(1, length, k, 768, model.width, model.depth, 1000)
  add(f"NaViT-{size}/16 packed L={length} K={k}", model, f, *_packed_row(length, k, 768))
  return rows


def run(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  return {"dit_table": dit_table(), "xla": xla_agreement(quick)}
