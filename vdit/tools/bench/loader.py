"""Loader benchmark: input-pipeline tokens/s on this host vs what the train step consumes.

For each config (`tiny`: configs/vdit/shapes.py:tiny as the demo runs it; `mid`: the same file's
S variant (D=384, 12 layers) in float32 over the three bundled datasets, rows of 1024 tokens),
in one process:

  1. loader alone: batches/s and tokens/s of `vdit.train.make_data_iterator(config)` after a
     warm-up (real tokens = loss_mask; slots = B·L);
  2. train step alone: `vdit.train.jit_train_step` on the loader's batches, timed after
     compilation (the same tokens per step);
  3. both together, the loader's prefetch thread racing the step for the same cores: the time
     the loop waits in `next()` per step.

Headroom = loader tokens/s ÷ train-step tokens/s (goal ≥ 2). On this CPU the step is slow, so
the same loader's headroom on an accelerator is what matters: see BENCHMARKS.md.
"""

import time

import jax
import numpy as np

from vdit import sharding, tasks, train, train_state
from vdit.tools.bench import packing as bench_packing


def configs(options: dict) -> dict:
  tiny = bench_packing.load_config("tiny")
  mid = bench_packing.load_config("variant=S")
  mid.input.update(
    dict(
      dataset_config="tiny",
      mixture=bench_packing.bundled_mixture(),
      tokens_per_row=1024,
      rows_per_batch=4,
      max_examples_per_row=16,
      text_tokens_per_row=192,
      max_tokens_per_example=768,
      min_tokens_per_example=128,
      max_frames=16,
      num_packing_bins=32,
    )
  )
  mid.model.update(dict(dtype="float32", remat_policy="none"))
  out = {"tiny": tiny, "mid": mid}
  for c in out.values():
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    if options.get("data_dir"):
      c.input.data_dir = options["data_dir"]
  return out


def _tokens(batch) -> tuple[int, int]:
  return int(batch["loss_mask"].sum()), int(batch["loss_mask"].size)


def loader_alone(config, batches: int) -> tuple[dict, list]:
  it = train.make_data_iterator(config)
  for _ in range(3):  # warm-up: pool filling, thread start
    next(it)
  start, kept, real, slots = time.perf_counter(), [], 0, 0
  for _ in range(batches):
    batch = next(it)
    kept.append(batch)
    r, s = _tokens(batch)
    real, slots = real + r, slots + s
  seconds = time.perf_counter() - start
  it.close()
  return {
    "batches_per_s": round(batches / seconds, 2),
    "real_tokens_per_s": round(real / seconds),
    "slot_tokens_per_s": round(slots / seconds),
    "real_token_fraction": round(real / slots, 4),
  }, kept


def train_alone(config, batches: list, steps: int):
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  state = builder.create()
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  with sharding.activate(mesh, rules):
    start = time.perf_counter()
    state, metrics = step_fn(state, sharding.global_batch(batches[0], mesh, rules))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times, real = [], 0
    for i in range(steps):
      batch = sharding.global_batch(batches[1 + i % (len(batches) - 1)], mesh, rules)
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      real += int(np.asarray(batch["loss_mask"]).sum())
  seconds = sum(times)
  result = {
    "compile_s": round(compile_s, 1),
    "step_s": round(seconds / steps, 3),
    "real_tokens_per_s": round(real / seconds),
    "params": train_state.num_params(state.params),
  }
  return result, (state, step_fn, mesh, rules)


def together(config, setup, steps: int) -> dict:
  """The train loop as train.py runs it: wait for a batch, run the step."""
  state, step_fn, mesh, rules = setup
  it = train.make_data_iterator(config)
  next(it)
  waits, step_times = [], []
  with sharding.activate(mesh, rules):
    for _ in range(steps):
      start = time.perf_counter()
      batch = next(it)
      waits.append(time.perf_counter() - start)
      start = time.perf_counter()
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh, rules))
      jax.block_until_ready(metrics)
      step_times.append(time.perf_counter() - start)
  it.close()
  return {
    "wait_per_step_s": round(float(np.mean(waits)), 4),
    "step_s": round(float(np.mean(step_times)), 3),
    "wait_fraction": round(sum(waits) / (sum(waits) + sum(step_times)), 4),
  }


def run(options: dict) -> dict:
  quick = options.get("quick")
  names = options.get("configs", ("tiny", "mid"))
  out = {}
  for name, config in configs(options).items():
    if name not in names:
      continue
    loader, batches = loader_alone(config, 8 if quick else int(options.get("batches", 30)))
    steps = 2 if quick or name == "mid" else int(options.get("steps", 10))
    step, setup = train_alone(config, batches, steps)
    out[name] = {
      "tokens_per_row": config.input.tokens_per_row,
      "rows_per_batch": config.input.rows_per_batch,
      "loader": loader,
      "train_step": step,
      "headroom": round(loader["real_tokens_per_s"] / step["real_tokens_per_s"], 2),
      "together": together(config, setup, steps),
    }
  return out
