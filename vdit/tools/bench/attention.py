"""Attention benchmark: how much of a packed row the block-sparse splash path computes.

  python -m vdit.tools.bench attention [--quick] [--set block=256] --json

For packed rows, `block_fraction` is the share of (q-block, kv-block) pairs the splash kernel
visits (`vdit.models.splash.block_fraction`, the same metadata the kernel uses), against the
element-level ideal Σ Lᵢ²/L² (examples and padding) and against 1 (dense `xla`/`cudnn`).
Row sets:
  * `design`: DESIGN.md's check — a 1024-token row of six examples (random sizes);
  * `navit`: rows of L=4096 packed first-fit with images of 16-576 tokens (NaViT-like: side
    r ~ U(64, 384) px at patch 16, aspect log-uniform in [1:2, 2:1]);
  * `video`: rows of L=16384 with clips of 1k-8k tokens (few long examples per row).
`check`: one small row through `layers.attention` with `splash` (Pallas interpret mode off TPU)
and `xla`, max |difference|, to show the measured metadata is the one that computes correctly.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vdit.models import layers, splash


def _pack(sizes: list[int], length: int) -> list[list[int]]:
  """First-fit packing of example sizes (truncated to `length`) into rows."""
  rows: list[list[int]] = []
  for n in sizes:
    n = min(n, length)
    for row in rows:
      if sum(row) + n <= length:
        row.append(n)
        break
    else:
      rows.append([n])
  return rows


def packed_ids(rows: list[list[int]], length: int) -> np.ndarray:
  """[B, length] int32 segment ids: row b holds examples of the lengths `rows[b]`, then padding
  (0). (The attention tests use it too.)"""
  ids = np.zeros((len(rows), length), np.int32)
  for b, row in enumerate(rows):
    start = 0
    for k, n in enumerate(row):
      ids[b, start : start + n] = k + 1
      start += n
  return ids


def _summary(ids: np.ndarray, block: int) -> dict:
  frac = np.asarray(splash.block_fraction(jnp.asarray(ids), jnp.asarray(ids), block, block))
  ideal = np.array([splash.ideal_fraction(row) for row in ids])
  return {
    "rows": int(ids.shape[0]),
    "length": int(ids.shape[1]),
    "examples_per_row": round(float(np.mean([len(set(row.tolist()) - {0}) for row in ids])), 2),
    "block_fraction": round(float(frac.mean()), 4),
    "ideal_fraction": round(float(ideal.mean()), 4),
    "dense_fraction": 1.0,
  }


def row_sets(quick: bool, seed: int = 0) -> dict[str, np.ndarray]:
  r = np.random.default_rng(seed)
  n_rows = 4 if quick else 32
  design = []
  for _ in range(n_rows):
    cuts = np.sort(r.choice(np.arange(40, 1000), 5, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [r.integers(cuts[-1] + 20, 1024)]]))
    design.append(list(sizes))
  side = r.uniform(64, 384, 20 * n_rows) / 16
  aspect = np.exp(r.uniform(np.log(0.5), np.log(2.0), side.size))
  images = [max(1, int(s * np.sqrt(a))) * max(1, int(s / np.sqrt(a))) for s, a in zip(side, aspect)]
  clips = list(r.integers(1024, 8192, 3 * n_rows))
  return {
    "design": packed_ids(design, 1024),
    "navit": packed_ids(_pack(images, 4096)[:n_rows], 4096),
    "video": packed_ids(_pack(clips, 16384)[:n_rows], 16384),
  }


def run(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  block = int(options.get("block", splash.BLOCK))
  out = {name: _summary(ids, block) for name, ids in row_sets(quick).items()}
  out["block"] = block
  # Correctness of the same metadata on one row (interpret mode off TPU).
  ids = jnp.asarray(packed_ids([[300, 200, 180, 150, 100, 60]], 1024))
  r = np.random.default_rng(1)
  q, k, v = (jnp.asarray(r.normal(size=(1, 1024, 2, 64)), jnp.float32) for _ in range(3))
  got = jax.jit(lambda q, k, v: layers.attention(q, k, v, ids, ids, backend="splash"))(q, k, v)
  want = layers.attention(q, k, v, ids, ids)
  out["check"] = {"max_abs_diff_vs_xla": float(jnp.abs(got - want).max())}
  return out
