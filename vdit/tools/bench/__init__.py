"""Benchmarks: `python -m vdit.tools.bench NAME [--json] [--quick] [--set key=value ...]`.

Each benchmark is a function `run(options: dict) -> dict` (JSON-able results) registered in
`BENCHMARKS` by name as "module:function", imported only when run. To add one, write a module
here and add a line below; record its latest numbers in BENCHMARKS.md with the command and the
machine.
"""

import importlib
from collections.abc import Callable

BENCHMARKS: dict[str, str] = {
  "packing": "vdit.tools.bench.packing:run",  # real-token fraction, attention work, strategies
  "packing_png": "vdit.tools.bench.packing:write_png",  # docs/images/packing.png
  "loader": "vdit.tools.bench.loader:run",  # loader tokens/s vs train-step tokens/s
  "flop_counts": "vdit.tools.bench.flop_counts:run",  # analytic FLOPs vs the DiT paper and XLA
  "compile_time": "vdit.tools.bench.compile_time:run",  # scan vs unrolled, depth 4 vs 28
  "attention": "vdit.tools.bench.attention:run",  # splash block-sparse fraction vs ideal
  "autoencoder": "vdit.tools.bench.autoencoder:run",  # VAE throughput/memory, whole vs tiled
  "train_step": "vdit.tools.bench.train_step:run",  # tiny step tokens/s, FLOP/s vs matmul peak
  "sampling": "vdit.tools.bench.sampling_speed:run",  # seconds per video vs steps and vs size
  "sampling_text": "vdit.tools.bench.sampling_speed:text_once",  # prompts encoded once vs per step
  "sampling_guidance": "vdit.tools.bench.sampling_speed:guidance_one",  # guidance 3 vs 1
  "memory_mesh": "vdit.tools.bench.memory_mesh:run",  # compiled step memory per device vs mesh
  "long_memory": "vdit.tools.bench.long_memory:run",  # long videos: memory flat in the length
}


def get(name: str) -> Callable[[dict], dict]:
  """The benchmark function registered as `name`."""
  if name not in BENCHMARKS:
    raise ValueError(f"benchmark {name!r} is unknown; expected one of {sorted(BENCHMARKS)}")
  module, function = BENCHMARKS[name].split(":")
  return getattr(importlib.import_module(module), function)
