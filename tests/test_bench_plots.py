"""The benchmarks' `write_png` draw a real PNG from results shaped like the bench's JSON."""

import pytest

from vdit.tools.bench import autoencoder, compile_time, long_memory, memory_mesh, sampling_speed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _autoencoder_results() -> dict:
  rows = []
  for t, mb, fps in ((5, 13.6, 269.0), (17, 35.9, 186.0), (33, 65.5, 190.0)):
    row = {"frames": t, "latent_frames": (t + 1) // 2, "size": 64}
    for op, scale in (("encode", 1.0), ("decode", 1.2)):
      row[f"whole_{op}_peak_mb"] = mb * scale
      row[f"tiled_{op}_peak_mb"] = min(mb, 20.0) * scale / 2
      row[f"whole_{op}_frames_per_s"] = fps / scale
      row[f"tiled_{op}_frames_per_s"] = fps / scale / 20
    rows.append(row)
  return {"chunk_latent_frames": 2, "tile": 32, "overlap": 16, "backend": "cpu", "rows": rows}


def _compile_time_results() -> dict:
  mode = lambda a, b: {
    "seconds": {"4": a, "28": b},
    "cpu_seconds": {"4": a / 2, "28": b / 2},
    "ratio": round(b / a, 3),
    "cpu_ratio": round(b / a, 3),
  }
  return {
    "variant": "XL/2",
    "remat": "none",
    "backend": "cpu",
    "scan": mode(10.0, 11.0),
    "unrolled": mode(12.0, 60.0),
  }


def _memory_mesh_results() -> dict:
  per_mesh = []
  for shape, args, temps in (((8, 1, 1, 1), 32.3, 122.3), ((1, 8, 1, 1), 4.8, 114.4)):
    mesh = dict(zip(("data", "fsdp", "sequence", "tensor"), shape))
    out = args - 0.2
    per_mesh.append({
      "mesh": mesh,
      "arguments_mib": args,
      "outputs_mib": out,
      "aliased_mib": out,
      "temps_mib": temps,
      "total_mib": args + temps,
    })  # fmt: skip
  return {"devices": 8, "per_mesh": per_mesh}


def _sampling_results() -> dict:
  point = lambda size, tokens, steps, s: {
    "size": list(size),
    "tokens": tokens,
    "steps": steps,
    "seconds_per_video": s,
  }
  return {
    "vs_steps": [point((8, 32, 48), 384, n, 0.03 * n) for n in (4, 8, 16)],
    "vs_size": [point((8, 16, 16), 64, 16, 0.1), point((8, 32, 32), 256, 16, 0.3)],
  }


def _long_memory_results() -> dict:
  rows = [
    {"frames": 8 * k, "long_step_bytes": 5 * 2**20, "one_window_step_bytes": k * k * 2**20 + 4e6,
     "host_peak_rss_bytes": 900 * 2**20, "host_rss_max_window_bytes": 850 * 2**20,
     "live_device_bytes": 2**20}
    for k in (1, 2, 4, 8)
  ]  # fmt: skip
  return {"window": 8, "context": 4, "rows": rows}


@pytest.mark.parametrize(
  "name, draw",
  [
    ("autoencoder", lambda p: autoencoder.write_png(p, _autoencoder_results())),
    ("compile_time", lambda p: compile_time.write_png(p, _compile_time_results())),
    ("compile_time_scan_only", lambda p: compile_time.write_png(
      p, {k: v for k, v in _compile_time_results().items() if k != "unrolled"})),
    ("memory_mesh", lambda p: memory_mesh.write_png(p, _memory_mesh_results())),
    ("long_memory", lambda p: long_memory.write_png(p, _long_memory_results())),
    ("sampling", lambda p: sampling_speed.write_png(p, [_sampling_results()] * 2, ["a", "b"])),
  ],
)  # fmt: skip
def test_write_png(tmp_path, name, draw):
  path = str(tmp_path / "images" / f"{name}.png")  # the directory does not exist yet
  assert draw(path) == path
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC, f"{path} is not a PNG: starts with {data[:8]!r}"
  assert len(data) > 10_000, f"{path} is {len(data)} bytes: too small for a drawn figure"
