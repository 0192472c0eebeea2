"""Autoencoder benchmark: encode/decode throughput and peak memory vs video length, whole vs
chunked+tiled (`vdit/models/tiling.py`).

  python -m vdit.tools.bench autoencoder [--quick] [--set size=64] [--set lengths='(5,9,17)'] --json
      [--set png='"docs/images/autoencoder.png"']

The tiny config's model (`configs/vae/video.py:tiny`: 2× time, 4× space, channels 16/32/64,
random weights: speed and memory do not depend on them) on one [1, T, size, size, 3] video.
`peak_mb`: XLA's compiled memory analysis of one jitted call (arguments + outputs + temporaries;
for chunked/tiled coding the per-tile call, which is all the device holds at once — results are
assembled on the host). `frames_per_s`: wall clock of the whole encode (or decode) after a
warm-up call, median of `repeats`. With `png`, writes both against the length there (one panel
for encode, one for decode).
"""

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.models import autoencoder as ae
from vdit.models import tiling
from vdit.tools.bench import plots


def _peak_mb(fn, *args) -> float:
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return round(total / 2**20, 2)


def _frames_per_s(frames: int, repeats: int, fn, *args, **kwargs) -> float:
  fn(*args, **kwargs)  # warm-up (compilation)
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args, **kwargs)
    samples.append(time.perf_counter() - start)
  return round(frames / statistics.median(samples), 1)


def write_png(path: str, results: dict) -> str:
  """Peak memory (solid, left axis) and frames/s (dashed, right axis, log) vs video length,
  whole (blue) vs chunked+tiled (orange); encode and decode side by side."""
  rows = results["rows"]
  size = rows[0]["size"]
  fig, panels = plots.subplots(
    2,
    f"causal video VAE (tiny), 1×T×{size}²×3, chunk {results['chunk_latent_frames']} latent "
    f"frames, {results['tile']}² tiles; 2-core CPU (loaded)",
    width=5,
    height=3.8,
  )
  frames = [r["frames"] for r in rows]
  for ax, op in zip(panels, ("encode", "decode")):
    fps_ax = ax.twinx()
    for mode, colour in (("whole", "C0"), ("tiled", "C1")):
      name = "whole" if mode == "whole" else "chunked+tiled"
      mb = [r[f"{mode}_{op}_peak_mb"] for r in rows]
      fps = [r[f"{mode}_{op}_frames_per_s"] for r in rows]
      ax.plot(frames, mb, "o-", color=colour, label=f"{name}: peak MB")
      fps_ax.plot(frames, fps, "s--", color=colour, label=f"{name}: frames/s")
    ax.set(xlabel="video length T (frames)", ylabel="peak device memory (MB)", title=op)
    ax.set_ylim(bottom=0)
    fps_ax.set_ylabel("frames / s (wall clock)")
    fps_ax.set_yscale("log")
  lines = ax.get_lines() + fps_ax.get_lines()
  fig.legend(lines, [line.get_label() for line in lines], loc="outside lower center", ncol=4)
  return plots.save(fig, path)


def run(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  size = int(options.get("size", 64))
  lengths = tuple(options.get("lengths", (5, 17) if quick else (5, 9, 17, 33)))
  chunk, tile, overlap = int(options.get("chunk", 2)), int(options.get("tile", 32)), 16
  repeats = int(options.get("repeats", 1 if quick else 3))
  model = ae.VideoAutoencoder(channels=(16, 32, 64), time_compression=2, latent_channels=8,
                              num_res_blocks=1)  # fmt: skip
  variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 5, 16, 16, 3))))
  ft, fs, _ = model.compression
  enc = lambda v, x: model.apply(v, x, method=model.encode)
  dec = lambda v, z: model.apply(v, z, method=model.decode)
  enc_ctx = -(-model.temporal_lookback()[0] // ft)
  dec_ctx = -(-(model.temporal_lookback()[1] - 1) // ft) + 1
  rows = []
  for t in lengths:
    video = np.random.default_rng(0).uniform(-1, 1, (1, t, size, size, 3)).astype(np.float32)
    z = np.asarray(jax.jit(enc)(variables, video)[0])
    n = z.shape[1]
    row = {"frames": t, "latent_frames": n, "size": size}
    # Whole: one call over the full video.
    row["whole_encode_peak_mb"] = _peak_mb(enc, variables, video)
    row["whole_decode_peak_mb"] = _peak_mb(dec, variables, z)
    row["whole_encode_frames_per_s"] = _frames_per_s(
      t, repeats, tiling.encode, model, variables, video
    )
    row["whole_decode_frames_per_s"] = _frames_per_s(t, repeats, tiling.decode, model, variables, z)
    # Chunked + tiled: the device holds one window (context + chunk latent frames) of one tile.
    enc_window = min(n, enc_ctx + chunk)
    dec_window = min(n, dec_ctx + chunk)
    th = min(tile, size)
    row["tiled_encode_peak_mb"] = _peak_mb(
      enc, variables, np.zeros((1, 1 + (enc_window - 1) * ft, th, th, 3), np.float32)
    )
    row["tiled_decode_peak_mb"] = _peak_mb(
      dec, variables, np.zeros((1, dec_window, th // fs, th // fs, z.shape[-1]), np.float32)
    )
    kw = dict(chunk=chunk, tile=(tile, tile), overlap=overlap)
    row["tiled_encode_frames_per_s"] = _frames_per_s(
      t, repeats, tiling.encode, model, variables, video, **kw
    )
    row["tiled_decode_frames_per_s"] = _frames_per_s(
      t, repeats, tiling.decode, model, variables, z, **kw
    )
    rows.append(row)
  out = {
    "model": "channels=(16, 32, 64), ft=2, fs=4, Z=8 (configs/vae/video.py:tiny)",
    "chunk_latent_frames": chunk,
    "context_latent_frames": {"encode": enc_ctx, "decode": dec_ctx},
    "tile": tile,
    "overlap": overlap,
    "backend": jax.default_backend(),
    "rows": rows,
  }
  if options.get("png"):
    out["png"] = write_png(options["png"], out)
  return out
