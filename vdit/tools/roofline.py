"""Hardware numbers and what a compiled XLA program costs: memory, FLOPs, bytes, collectives.

Used by `vdit.tools.aot`; works on any `jax.stages.Compiled` (TPU topologies or this CPU).
"""

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import ml_collections

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip peaks (cloud.google.com/tpu/docs/system-architecture-tpu-vm)."""

  name: str
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bytes: float  # HBM capacity
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, all links of one chip together (bidirectional)


CHIPS = {
  "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, 2400e9 / 8),
  "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, 1600e9 / 8),
  "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, 4800e9 / 8),
  "v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GiB, 1640e9, 3584e9 / 8),
}


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4}
_BYTES.update(u32=4, f32=4, s64=8, u64=8, f64=8)


def collective_bytes(hlo_text: str) -> dict[str, float]:
  """Bytes each kind of collective produces per device, summed over the program's collectives.

  The result of each: an all-gather's gathered array, an all-reduce's reduced arrays (XLA
  combines many into one tuple; on TPU the gradients' reduce-scatter is a fused all-reduce of
  the full arrays), a reduce-scatter's shard, a permute's array. Each loop body counts once.
  """
  out = {kind: 0.0 for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    result, kind, is_async = m.groups()
    sizes = [
      _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
      for dtype, dims in _ARRAY.findall(result)
    ]
    # An async all-gather / permute returns (operand, result, ...): count the result only.
    out[kind] += max(sizes, default=0) if is_async and kind != "all-reduce" else sum(sizes)
  return out


def compiled_costs(compiled) -> dict[str, float]:
  """XLA's cost analysis (FLOPs, bytes accessed) and `collective_bytes`, per device."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  costs = {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost["bytes accessed"])}
  for kind, size in collective_bytes(compiled.as_text()).items():
    costs[f"{kind}_bytes"] = size
  return costs


def extrapolated_costs(
  lower_fn: Callable, config: ml_collections.ConfigDict, mesh, log: Callable[[str], None]
) -> dict[str, float]:
  """FLOPs, bytes and collective bytes per device at the config's depths, from unrolled
  1-/2-layer compiles (XLA's cost analysis counts a loop body once)."""
  m = config.model

  def at(depth, text_depth):
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.depth, c.model.text_depth, c.model.scan_layers = depth, text_depth, False
    t0 = time.time()
    costs = compiled_costs(lower_fn(c, mesh)[0].compile())
    log(f"  unrolled depth={depth} text_depth={text_depth}: {time.time() - t0:.0f}s")
    return costs

  base, deeper, deeper_text = at(1, 1), at(2, 1), at(1, 2)
  return {
    key: base[key]
    + (m.depth - 1) * (deeper[key] - base[key])
    + (m.text_depth - 1) * (deeper_text[key] - base[key])
    for key in base
  }


def memory(compiled, capacity: float) -> dict[str, Any]:
  mem = compiled.memory_analysis()
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  gib = lambda x: round(x / GiB, 3)
  return {
    "arguments_gib": gib(mem.argument_size_in_bytes),
    "outputs_gib": gib(mem.output_size_in_bytes),
    "aliased_gib": gib(mem.alias_size_in_bytes),
    "temps_gib": gib(mem.temp_size_in_bytes),
    "program_gib": gib(mem.generated_code_size_in_bytes),
    "total_gib": gib(total),
    "peak_gib": gib(getattr(mem, "peak_memory_in_bytes", 0) or total),
    "capacity_gib": gib(capacity),
    "fits": bool(total <= capacity),
    "used_fraction": round(total / capacity, 3),
  }


def roofline(costs: dict[str, float], useful_flops: float, chip: Chip, per_chip: int) -> dict:
  """Lower bound on step time and upper bound on MFU, per device.

  The step takes at least max(compute, HBM) time. Collectives get a separate, rough figure:
  the bytes they span over the chip's total ICI bandwidth (assumes all links busy, no
  overlap with compute); it is not in the bound.
  """
  peak, bandwidth = chip.bf16_flops / per_chip, chip.hbm_bandwidth / per_chip
  compute_s = costs["flops"] / peak
  memory_s = costs["bytes_accessed"] / bandwidth
  comm = sum(costs[f"{kind}_bytes"] for kind in COLLECTIVES)
  step_s = max(compute_s, memory_s)
  sig = lambda x: float(f"{x:.4g}")
  return {
    "compute_seconds": sig(compute_s),
    "memory_seconds": sig(memory_s),
    "step_seconds_lower_bound": sig(step_s),
    "bound_by": "compute" if compute_s >= memory_s else "memory",
    "mfu_upper_bound": round(useful_flops / (peak * step_s), 3) if step_s else None,
    "collective_seconds_estimate": sig(comm / (chip.ici_bandwidth / per_chip)),
  }
