"""Memory benchmark: per-device memory of the compiled tiny train step vs the mesh shape.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m vdit.tools.bench memory_mesh --json [--set meshes='((8,1,1,1),(1,8,1,1))']
      [--set png='"docs/images/memory_mesh.png"']

For each (data, fsdp, sequence, tensor) mesh over 8 simulated CPU devices, compiles
`vdit.train.jit_train_step` of configs/vdit/shapes.py:tiny (the same lowering as
`vdit.tools.aot`, abstract state and batch: nothing is allocated or run) and reads
`compiled.memory_analysis()` — the per-device program of the SPMD partitioned step: arguments
(the state shard + the batch shard), outputs, aliased (donated state), temporaries, total =
arguments + outputs − aliased + temporaries. With fewer than 8 devices in this process, reruns
itself in a subprocess with the flag set. With `png`, writes a stacked bar of the total per mesh
there.
"""

import json
import os
import subprocess
import sys
import time

import jax

from vdit import sharding
from vdit.tools import aot
from vdit.tools.bench import loader, plots

MESHES = ((8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 1, 2), (1, 2, 2, 2), (2, 1, 2, 2))
MiB = 2**20


def per_device(config, mesh_shape) -> dict:
  config.mesh = dict(zip(sharding.MESH_AXES, mesh_shape))
  mesh = sharding.make_mesh(config.mesh)
  start = time.perf_counter()
  lowered, params = aot.lower_train_step(config, mesh)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  mib = lambda x: round(x / MiB, 2)
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  return {
    "mesh": dict(config.mesh),
    "compile_s": round(seconds, 1),
    "params": params,
    "arguments_mib": mib(m.argument_size_in_bytes),
    "outputs_mib": mib(m.output_size_in_bytes),
    "aliased_mib": mib(m.alias_size_in_bytes),
    "temps_mib": mib(m.temp_size_in_bytes),
    "total_mib": mib(total),
  }


def write_png(path: str, results: dict) -> str:
  """One stacked bar per mesh: arguments (state shard + batch shard), outputs not aliased to a
  donated argument, temporaries; the stack is the total per device."""
  rows = results["per_mesh"]
  names = ["(" + ", ".join(str(r["mesh"][a]) for a in sharding.MESH_AXES) + ")" for r in rows]
  parts = (
    ("arguments (state + batch shard)", [r["arguments_mib"] for r in rows]),
    ("outputs not aliased", [r["outputs_mib"] - r["aliased_mib"] for r in rows]),
    ("temporaries", [r["temps_mib"] for r in rows]),
  )
  fig, (ax,) = plots.subplots(
    1, f"compiled tiny train step, memory per device ({results['devices']} devices)", width=8
  )
  bottom = [0.0] * len(rows)
  for label, values in parts:
    ax.bar(names, values, bottom=bottom, label=label)
    bottom = [b + v for b, v in zip(bottom, values)]
  for x, r in enumerate(rows):
    ax.annotate(f"{r['total_mib']:.1f}", (x, r["total_mib"]), ha="center", va="bottom", fontsize=8)
  axes = ", ".join(sharding.MESH_AXES)
  ax.set(xlabel=f"mesh ({axes})", ylabel="MiB per device")
  ax.margins(y=0.1)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
  return plots.save(fig, path)


def _in_subprocess(options: dict) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  args = [sys.executable, "-m", "vdit.tools.bench", "memory_mesh", "--json"]
  for key, value in options.items():
    if key != "quick" or value:
      args += ["--quick"] if key == "quick" else ["--set", f"{key}={value!r}"]
  out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout)["results"]


def run(options: dict) -> dict:
  if jax.device_count() < 8:
    return _in_subprocess(options)
  meshes = MESHES[:2] if options.get("quick") else tuple(options.get("meshes", MESHES))
  config = loader.configs(options)["tiny"]
  out = {
    "config": "configs/vdit/shapes.py:tiny (B=8 rows × L=512, D=128, 4 blocks, float32)",
    "devices": jax.device_count(),
    "per_mesh": [per_device(config, tuple(shape)) for shape in meshes],
  }
  if options.get("png"):
    out["png"] = write_png(options["png"], out)
  return out
