"""Train-step benchmark: tokens/s of the tiny config and its FLOP/s against this CPU's peak.

  python -m vdit.tools.bench train_step --json [--quick] [--set steps=10]
  python -m vdit.tools.bench train_step --json \
      --set compare='{"per_token": {"model.shared_conditioning": False}}'   # interleaved
  python -m vdit.tools.bench train_step --json \
      --set config=tiny,latent=runs/shapes/autoencoder,latents=runs/shapes/latents  # the demo

In one process, interleaved so that both see the same machine load:

  1. matmul peak: the best of `repeats` timings of a large float32 `jnp.dot` (N×N·N×N, 2·N³
     FLOPs; N = `matmul_n`, default 2048), measured before *and* after the train steps;
  2. `vdit.train.jit_train_step` of configs/vdit/shapes.py:tiny (all this process's devices,
     `mesh.data`), on real batches of the pipeline, timed after compilation.

Model FLOPs per step: `vdit.models.flops.dot_flops` of the traced step (2·M·N·K of every matrix
product of forward + backward, scan bodies × their length; elementwise work left out) and XLA's
`cost_analysis()` of the same step compiled with the blocks unrolled (XLA counts a scanned loop
body once; it also counts elementwise work). `fraction_of_peak` = achieved FLOP/s (dot FLOPs ÷
median step time) ÷ the matmul peak.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit import sharding, tasks, train, train_state
from vdit.models import flops
from vdit.tools import roofline
from vdit.tools.bench import packing as bench_packing


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
  """Best FLOP/s of an n×n float32 matmul on the default device (the practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return {"n": n, "best_s": round(min(times), 4), "flops_per_s": 2 * n**3 / min(times)}


def _setup(config: ml_collections.ConfigDict) -> train_state.StateBuilder:
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  return train_state.build(config, mesh, rules, tasks.get(config))


def step_flops(config: ml_collections.ConfigDict, batch: dict, xla: bool) -> dict:
  """Matmul FLOPs of one train step (traced) and, if `xla`, XLA's count of the unrolled step."""
  builder = _setup(config)
  fn = functools.partial(train.train_step, model=builder.model, tx=builder.tx, config=config)
  with sharding.activate(builder.mesh, builder.rules):
    out = {"dot_flops": float(flops.dot_flops(fn, builder.abstract, batch))}
  if xla:
    unrolled = ml_collections.ConfigDict(config.to_dict())
    unrolled.model.scan_layers = False
    builder = _setup(unrolled)
    mesh, rules = builder.mesh, builder.rules
    step_fn = train.jit_train_step(
      unrolled, builder.model, builder.tx, mesh, rules, builder.shardings
    )
    with sharding.activate(mesh, rules):
      compiled = step_fn.lower(builder.abstract, batch).compile()
    out["xla_flops_unrolled"] = float(roofline.compiled_costs(compiled)["flops"])
  return out


def timed_steps(config: ml_collections.ConfigDict, batches: list, steps: int) -> dict:
  builder = _setup(config)
  mesh, rules, state = builder.mesh, builder.rules, builder.create()
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  with sharding.activate(mesh, rules):
    glob = [train.to_global(b, config, mesh, rules) for b in batches]
    start = time.perf_counter()
    state, metrics = step_fn(state, glob[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps):
      start = time.perf_counter()
      state, metrics = step_fn(state, glob[1 + i % (len(glob) - 1)])
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  return {
    "compile_s": round(compile_s, 1),
    "step_s_median": round(statistics.median(times), 4),
    "step_s_min": round(min(times), 4),
    "params": train_state.num_params(state.params),
  }


def compare_steps(configs: dict, batches: list, steps: int) -> dict:
  """Median step time of each named config, timed interleaved (one step of each in turn, so
  every variant sees the same machine load), and each one's speed relative to the first. A
  variant whose `input` differs from the first's gets batches of its own pipeline."""
  runs = {}
  first = next(iter(configs.values()))
  for name, config in configs.items():
    if config.input.to_dict() != first.input.to_dict():
      it = train.make_data_iterator(config)
      batches = [next(it) for _ in range(len(batches))]
      it.close()
    builder = _setup(config)
    mesh, rules, state = builder.mesh, builder.rules, builder.create()
    step_fn = train.jit_train_step(
      config, builder.model, builder.tx, mesh, rules, builder.shardings
    )
    with sharding.activate(mesh, rules):
      glob = [train.to_global(b, config, mesh, rules) for b in batches]
      state, metrics = step_fn(state, glob[0])  # compile
      jax.block_until_ready(metrics)
    runs[name] = dict(fn=step_fn, state=state, batches=glob, mesh=mesh, rules=rules, times=[])
  for i in range(steps):
    for r in runs.values():
      with sharding.activate(r["mesh"], r["rules"]):
        start = time.perf_counter()
        batch = r["batches"][1 + i % (len(r["batches"]) - 1)]
        r["state"], metrics = r["fn"](r["state"], batch)
        jax.block_until_ready(metrics)
        r["times"].append(time.perf_counter() - start)
  medians = {name: statistics.median(r["times"]) for name, r in runs.items()}
  base = next(iter(medians.values()))
  return {
    name: {"step_s_median": round(m, 4), "speedup_vs_first": round(base / m, 3)}
    for name, m in medians.items()
  }


def run(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  steps = int(options.get("steps", 3 if quick else 10))
  # `config`: the argument of configs/vdit/shapes.py (default "tiny", the pixel-space model);
  # the README demo's step is "tiny,latent=RUNS/autoencoder,latents=RUNS/latents".
  arg = str(options.get("config", "tiny"))
  config = bench_packing.load_config(arg)
  if options.get("data_dir"):
    config.input.data_dir = options["data_dir"]
  n = int(options.get("matmul_n", 2048))
  it = train.make_data_iterator(config)
  batches = [next(it) for _ in range(4)]
  it.close()
  if options.get("compare"):  # {name: {dotted config key: value}}: variants vs the demo step
    variants = {"tiny": config}
    for name, overrides in dict(options["compare"]).items():
      variant = ml_collections.ConfigDict(config.to_dict())
      for key, value in dict(overrides).items():
        node = variant
        *path, last = key.split(".")
        for part in path:
          node = node[part]
        node[last] = value
      variants[name] = variant
    return {
      "config": f"configs/vdit/shapes.py:{arg}",
      "compare": compare_steps(variants, batches, steps),
    }
  peak_before = matmul_peak(n)
  step = timed_steps(config, batches, steps)
  peak_after = matmul_peak(n)
  peak = max(peak_before["flops_per_s"], peak_after["flops_per_s"])
  mesh = sharding.make_mesh(config.mesh)
  batch = train.to_global(
    batches[1], config, mesh, sharding.rules_from_config(config.sharding_rules)
  )
  counted = step_flops(config, batch, xla=not quick)
  slots = int(np.prod(batches[0]["segment_ids"].shape))
  real = float(np.mean([b["loss_mask"].sum() for b in batches[1:]]))
  achieved = counted["dot_flops"] / step["step_s_median"]
  return {
    "config": f"configs/vdit/shapes.py:{arg}",
    "devices": jax.device_count(),
    "rows_x_length": list(batches[0]["segment_ids"].shape),
    **step,
    "slot_tokens_per_s": round(slots / step["step_s_median"]),
    "real_tokens_per_s": round(real / step["step_s_median"]),
    **counted,
    "achieved_flops_per_s": achieved,
    "matmul_peak_flops_per_s": {"before": peak_before, "after": peak_after, "used": peak},
    "fraction_of_peak": round(achieved / peak, 4),
  }
