r"""Plan a TPU run from a laptop: compile the real train step for a TPU topology, report as JSON.

  python -m vdit.tools.aot --config=configs/vdit/sora.py:size=8B --topology=v6e:16x16
  python -m vdit.tools.aot --config=configs/vdit/sora.py:size=1B      # the config's aot_topology
  python -m vdit.tools.aot --config=configs/vdit/shapes.py:tiny --topology=v5e:2x2 --nosampler
  python -m vdit.tools.aot --config=configs/vdit/sora.py:size=3B --topology=v5p:4x4x8 --notrain \
      --sampler_mesh=sequence:64,tensor:2 --sampler_video=240x1080x1920   # one 10 s 1080p video

Needs the `libtpu` wheel (`pip install -c constraints.txt -e '.[tpu]'`), but no TPU: XLA's TPU
compiler runs on this CPU against compile-only devices of the topology
(`jax.experimental.topologies`). The train step is `vdit.train.jit_train_step` — the same
jitted, sharded, donated step as a real run, with the config's mesh, logical rules, dtype,
remat policy and gradient accumulation; the sampler step is one classifier-free-guided
velocity evaluation (model on the conditional + null rows) of the config's sample size, or of
`--sampler_video`, on the train mesh or on `--sampler_mesh` (one video's tokens over `sequence`,
placed as `vdit.sampling_mesh` places them).

Reported per device (a chip, or a TensorCore where a chip has two devices):
  memory   XLA's buffer assignment: arguments (state + batch), outputs, aliased (donated
           state reused in place), temps (activations, gradients, collectives' buffers),
           program; total = arguments + outputs − aliased + temps + program, vs HBM capacity.
  flops, bytes_accessed
           XLA's cost analysis of the compiled program. XLA counts a loop body once, so both
           are measured on unrolled 1- and 2-layer versions of the same config (same mesh, same
           remat) and extrapolated linearly in depth and text depth — exact for identical layers.
           XLA cannot see inside Pallas kernels (splash attention): their FLOPs are added from
           the model (`kernel_flops`, dense over the row: exact for a row holding one example,
           an upper bound for packed rows) × the kernels' passes (`kernel_passes`).
  collectives
           GiB spanned by each kind of collective (all-gather, reduce-scatter, all-reduce, ...)
           in the compiled program, extrapolated the same way: what the mesh costs in traffic.
  roofline step time ≥ max(flops / peak FLOP/s, bytes / HBM bandwidth) from published chip
           peaks (CHIPS); the MFU bound is the model FLOPs (3 × the forward's matrix products,
           `model_flops`) over peak × that time. Communication is
           not in the bound (only a rough collectives / ICI bandwidth figure beside it): a
           bound, not a forecast.
"""

import functools
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

# Before JAX starts: plan on CPU (the TPU plugin only provides the topology), and do not take
# libtpu's single-process lock (other JAX processes on this machine may hold it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from vdit import (  # noqa: E402
  axes,
  batch_spec,
  config_lib,
  models,
  sampling,
  sampling_mesh,
  sharding,
  tasks,
  train,
  train_state,
)
from vdit.diffusion import objectives  # noqa: E402
from vdit.models import flops  # noqa: E402
from vdit.tools import roofline  # noqa: E402
from vdit.tools.roofline import CHIPS, COLLECTIVES, Chip, GiB  # noqa: E402

LIBTPU_HELP = (
  "libtpu is not installed; it provides XLA's TPU compiler (no TPU needed). Install it with\n"
  "  pip install -e '.[tpu]'\n"
  "(pinned: pip install -c constraints.txt -e '.[tpu]', libtpu==0.0.42.1 for jax 0.10.2)"
)


# ---------------------------------------------------------------------------------------------
# Topology, config, abstract inputs.
# ---------------------------------------------------------------------------------------------
def topology_devices(topology: str) -> tuple[Chip, list, int]:
  """Compile-only devices of `topology` ("v5p:4x4x4"), its chip, and the number of chips."""
  generation = topology.split(":")[0]
  if generation not in CHIPS or ":" not in topology:
    raise ValueError(
      f"topology={topology!r} is not GENERATION:AxBxC with GENERATION in {sorted(CHIPS)}"
    )
  if importlib.util.find_spec("libtpu") is None:
    raise ModuleNotFoundError(LIBTPU_HELP)
  from jax.experimental import topologies  # noqa: PLC0415

  devices = topologies.get_topology_desc(topology, "tpu").devices
  chips = len({tuple(d.coords) for d in devices})
  return CHIPS[generation], list(devices), chips


def abstract_batch(config: ml_collections.ConfigDict, mesh, rules) -> dict[str, Any]:
  """Shape/dtype/sharding of one global packed batch (DESIGN.md "The packed batch")."""
  inp = config.input
  sizes = {
    "B": inp.rows_per_batch,
    "L": inp.tokens_per_row,
    "M": inp.text_tokens_per_row,
    "K": inp.max_examples_per_row,
    "P": models.patch_dim(config),
  }
  shapes = {
    key: (batch_spec.shape(key, sizes), field.dtype) for key, field in batch_spec.PACKED.items()
  }
  shardings = sharding.batch_shardings(mesh, rules, shapes)
  return {
    key: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[key])
    for key, (shape, dtype) in shapes.items()
  }


# ---------------------------------------------------------------------------------------------
# The two programs.
# ---------------------------------------------------------------------------------------------
def lower_train_step(config: ml_collections.ConfigDict, mesh):
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  with sharding.activate(mesh, rules):
    lowered = step_fn.lower(builder.abstract, abstract_batch(config, mesh, rules))
  return lowered, train_state.num_params(builder.abstract.params)


def sampler_tokens(
  config: ml_collections.ConfigDict, size: tuple[int, int, int] | None = None
) -> int:
  """Tokens of one video of `size` (frames, height, width; default: the config's `sample` size)
  on the canvas of whole patches the sampler generates it on (`Sampler.canvas`)."""
  s = sampling.settings(config)
  size = size or (s.num_frames, s.height, s.width)
  return math.prod(-(-int(n) // p) for n, p in zip(size, config.input.patch_size))


def lower_sampler_step(
  config: ml_collections.ConfigDict, mesh, size: tuple[int, int, int] | None = None
):
  """One Euler step of guided sampling, as the sampler takes it: the guided model call of
  `objectives.guided_model` on the conditional and null rows (one call on both halves, the
  captions encoded once before the loop and read by every step), the run's prediction turned
  into a velocity, x ← x − Δt·v.

  Videos of `size` (default: the config's `sample` size), one per row shard of `mesh`
  (data × fsdp), each as a conditional and a null row; placed as `vdit.sampling_mesh` places
  them: tokens over `sequence`, padded to its shards, params as the rules say. Returns the
  lowered step, the videos, the tokens per video and the padded length.
  """
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  spec = objectives.Spec.from_config(config.diffusion)
  length = sampler_tokens(config, size)
  n, m = sampling_mesh.shards(mesh, rules, axes.BATCH), config.input.max_caption_tokens
  padded = sampling_mesh.padded_length(length, mesh, rules)
  rows = {
    "positions": ((2 * n, padded, 3), jnp.int32),
    "segment_ids": ((2 * n, padded), jnp.int32),
    "text_tokens": ((2 * n, m), jnp.int32),
    "text_segment_ids": ((2 * n, m), jnp.int32),
    "labels": ((2 * n, 1), jnp.int32),
  }
  row_shardings = sharding.batch_shardings(mesh, rules, rows)
  x_sharding = sharding.logical_sharding(mesh, rules, sharding.BATCH_AXES["patches"])
  t_sharding = sharding.logical_sharding(mesh, rules, sharding.BATCH_AXES["segment_ids"])
  abstract_rows = {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=row_shardings[k])
    for k, (shape, dtype) in rows.items()
  }
  # The captions as the loop reads them (encoded once per sampling run), replicated: [2N, M, D].
  with sharding.activate(mesh, rules):
    text = jax.eval_shape(
      lambda p, r: objectives.encode_rows(builder.model, p, r),
      builder.abstract.ema_params,
      abstract_rows,
    )
  text_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), text)

  def step(params, x, t, dt, rows, text):
    # x: [N, L, P]; t: [N, L] noise level of every token; rows: the 2N conditional+null rows.
    guided = objectives.guided_model(
      builder.model, params, rows, sampling.settings(config).guidance, spec.guidance_interval, text
    )
    v = objectives.flow_model(spec, guided, sampling=True)(x, t)
    return x - dt * v.astype(x.dtype)

  fn = jax.jit(
    step,
    in_shardings=(
      builder.shardings.ema_params,
      x_sharding,
      t_sharding,
      sharding.replicated(mesh),
      row_shardings,
      text_shardings,
    ),
    out_shardings=x_sharding,
  )
  args = (
    builder.abstract.ema_params,
    jax.ShapeDtypeStruct((n, padded, models.patch_dim(config)), jnp.float32, sharding=x_sharding),
    jax.ShapeDtypeStruct((n, padded), jnp.float32, sharding=t_sharding),
    jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh)),
    abstract_rows,
    jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), text, text_shardings
    ),
  )
  with sharding.activate(mesh, rules):
    return fn.lower(*args), n, length, padded


# ---------------------------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------------------------
def model_flops(
  config: ml_collections.ConfigDict, rows: int, length: int, text: int, *, backend: str = "xla"
) -> float:
  """Forward FLOPs of the model on `rows` packed rows of `length` video and `text` text tokens.

  `vdit.models.flops.dot_flops` of the traced forward: 2·M·N·K over every matrix product,
  elementwise work not counted. With the default `backend="xla"` attention is counted dense
  over the row (the model FLOPs, whatever kernel runs it; `splash` skips the blocks between
  examples: Σ Lᵢ² / L² of a packed row is needed); with another backend, only the products
  outside its Pallas kernels. Training is 3× the forward, not counting rematerialization.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.attention_backend = backend
  config.input.tokens_per_row, config.input.text_tokens_per_row = length, text
  model = models.build(config)
  # Shapes only (eval_shape): a Sora-size batch would not fit in this machine's memory.
  inputs = jax.eval_shape(lambda: models.dummy_inputs(config, rows))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *models.dummy_inputs(config)))
  return float(flops.dot_flops(lambda p, *x: model.apply(p, *x), params, *inputs))


def kernel_flops(config: ml_collections.ConfigDict, rows: int, length: int, text: int) -> float:
  """Forward FLOPs inside the attention backend's Pallas kernels, which XLA's cost analysis
  cannot see; dense over the row, so an upper bound for `splash`. 0 for `xla`."""
  backend = config.model.attention_backend
  if backend == "xla":
    return 0.0
  dense = model_flops(config, rows, length, text)
  return dense - model_flops(config, rows, length, text, backend=backend)


# Splash's backward (unfused, jax 0.10's default) is a dq kernel (QKᵀ, dO·Vᵀ, dS·K) and a dkv
# kernel (QKᵀ, Pᵀ·dO, dO·Vᵀ, dSᵀ·Q): 7 products against the forward's 2.
SPLASH_BACKWARD_PASSES = 3.5


def kernel_passes(config: ml_collections.ConfigDict) -> float:
  """Train-step FLOPs of the attention kernels in units of their forward: forward, backward
  and, under any remat policy, the forward again (no policy saves a Pallas call's output)."""
  return 1 + SPLASH_BACKWARD_PASSES + (config.model.remat_policy != "none")


def _log(message: str) -> None:
  print(f"[aot] {message}", file=sys.stderr, flush=True)


def _compile(name: str, lower, capacity: float):
  """Lowers and compiles one program, logging its time and memory as soon as they are known."""
  t0 = time.time()
  lowered, *extra = lower()
  compiled = lowered.compile()
  seconds = time.time() - t0
  mem = roofline.memory(compiled, capacity)
  _log(
    f"  {name} compiled in {seconds:.0f}s: {mem['total_gib']} of {mem['capacity_gib']} GiB "
    f"per device ({'fits' if mem['fits'] else 'DOES NOT FIT'})"
  )
  return {"compile_seconds": round(seconds, 1), "memory_per_device": mem}, extra


def _add_costs(
  out: dict, costs: dict, useful: float, kernel: float, chip: Chip, per_chip: int
) -> None:
  """Adds FLOPs (XLA's + `kernel`, the Pallas kernels'), bytes, collectives and the roofline."""
  gib = lambda x: round(x / GiB, 3)
  costs = dict(costs, flops=costs["flops"] + kernel)
  out["flops_per_device"] = costs["flops"]
  out["kernel_flops_per_device"] = kernel
  out["bytes_accessed_per_device"] = costs["bytes_accessed"]
  out["model_flops_per_device"] = useful
  out["collectives_gib_per_device"] = {k: gib(costs[f"{k}_bytes"]) for k in COLLECTIVES}
  out["roofline"] = roofline.roofline(costs, useful, chip, per_chip)


def report(
  config: ml_collections.ConfigDict,
  topology: str,
  *,
  train_step: bool = True,
  sampler: bool = True,
  costs: bool = True,
  sampler_mesh: sampling_mesh.MeshRequest = None,
  sampler_video: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
  """Compiles the train (and sampler) step of `config` for `topology`; returns the report.

  `costs=False` skips the FLOPs / bytes / roofline part (three extra compiles per program).
  The sampler step runs on `sampler_mesh` ("sequence:64,tensor:2"; default: the train mesh)
  and generates videos of `sampler_video` (frames, height, width; default: `config.sample`).
  """
  chip, devices, chips = topology_devices(topology)
  per_chip = len(devices) // chips
  hosts = len({d.process_index for d in devices})
  train.validate(config, num_devices=len(devices), num_processes=hosts)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  capacity = chip.hbm_bytes / per_chip
  inp = config.input
  accum = train_state.accumulation_steps(config.optimizer)

  _log(f"{topology}: {len(devices)} devices, {hosts} hosts, mesh {dict(mesh.shape)}")
  tokens = inp.rows_per_batch * inp.tokens_per_row
  if train_step:
    train_report, (n_params,) = _compile(
      "train step", lambda: lower_train_step(config, mesh), capacity
    )
  else:
    model, dummy = models.build(config), models.dummy_inputs(config)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy))["params"]
    n_params = train_state.num_params(params)
  if train_step and costs:
    _log("  FLOPs, bytes and collectives from unrolled 1-/2-layer compiles")
    shape = (inp.rows_per_batch, inp.tokens_per_row, inp.text_tokens_per_row)
    useful = 3 * model_flops(config, *shape) / len(devices)
    kernel = kernel_passes(config) * kernel_flops(config, *shape) / len(devices)
    measured = roofline.extrapolated_costs(lower_train_step, config, mesh, _log)
    _add_costs(train_report, measured, useful, kernel, chip, per_chip)
    step_s = train_report["roofline"]["step_seconds_lower_bound"]
    train_report["roofline"]["tokens_per_second_upper_bound"] = (
      round(tokens / step_s) if step_s else None
    )
    _log(f"  train step: {json.dumps(train_report)}")  # before the sampler's compiles

  out = {
    "config": {
      "model": {k: config.model[k] for k in ("width", "depth", "num_heads", "dtype")},
      "remat_policy": config.model.remat_policy,
      "parameters": n_params,
      "tokens_per_row": inp.tokens_per_row,
      "rows_per_step": inp.rows_per_batch,
      "grad_accum_steps": accum,
      "tokens_per_update": tokens * accum,
      "mesh": dict(mesh.shape),
    },
    "topology": {
      "name": topology,
      "chip": chip.name,
      "chips": chips,
      "devices": len(devices),
      "hosts": hosts,
      "peak_bf16_tflops_per_chip": chip.bf16_flops / 1e12,
      "hbm_gib_per_chip": chip.hbm_bytes / GiB,
      "hbm_gbps_per_chip": chip.hbm_bandwidth / 1e9,
      "ici_gbps_per_chip": chip.ici_bandwidth / 1e9,
    },
  }
  if train_step:
    out["train_step"] = train_report
  if sampler:
    smesh = sampling_mesh.make(sampler_mesh, devices) or mesh
    lower = functools.partial(lower_sampler_step, size=sampler_video)
    s = sampling.settings(config)
    video = sampler_video or (s.num_frames, s.height, s.width)
    _log(f"  sampler step: {'x'.join(map(str, video))} videos, mesh {dict(smesh.shape)}")
    sampler_report, (n, length, padded) = _compile(
      "sampler step", lambda: lower(config, smesh), capacity
    )
    out["sampler_step"] = {
      "videos": n,
      "video": "x".join(map(str, video)),
      "tokens_per_video": length,
      "padded_tokens_per_video": padded,
      "mesh": dict(smesh.shape),
      **sampler_report,
    }
    if costs:
      # With splash the padding's blocks are skipped; counted dense over the padded row here.
      shape = (2 * n, padded, config.input.max_caption_tokens)
      useful = model_flops(config, *shape) / len(devices)
      kernel = kernel_flops(config, *shape) / len(devices)
      measured = roofline.extrapolated_costs(lower, config, smesh, _log)
      _add_costs(out["sampler_step"], measured, useful, kernel, chip, per_chip)
  return out


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="path.py[:arg]")
  parser.add_argument("--topology", default=None, help="e.g. v5p:4x4x4; default: aot_topology")
  parser.add_argument("--nosampler", action="store_true", help="skip the sampler step")
  parser.add_argument("--notrain", action="store_true", help="skip the train step")
  parser.add_argument(
    "--sampler_mesh",
    default=None,
    help="the sampler step's mesh, e.g. sequence:64,tensor:2 (default: the train mesh)",
  )
  parser.add_argument(
    "--sampler_video",
    default=None,
    help="FRAMESxHEIGHTxWIDTH of the sampled videos (default: the config's sample size)",
  )
  parser.add_argument(
    "--memory_only", action="store_true", help="skip FLOPs/roofline (3 compiles per program)"
  )
  parser.add_argument("--out", default=None, help="also write the JSON report here")
  parser.add_argument(
    "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (JSON value)"
  )
  opts = parser.parse_args(argv)
  try:
    config = config_lib.load(opts.config)
    for item in opts.set:
      key, _, value = item.partition("=")
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = json.loads(value)
    topology = opts.topology or config.get("aot_topology")
    if not topology:
      parser.error(f"--topology is required: {opts.config} has no aot_topology")
    video = opts.sampler_video and tuple(int(n) for n in opts.sampler_video.split("x"))
    if video is not None and len(video) != 3:
      raise ValueError(f"--sampler_video={opts.sampler_video!r} is not FRAMESxHEIGHTxWIDTH")
    result = report(
      config,
      topology,
      train_step=not opts.notrain,
      sampler=not opts.nosampler,
      costs=not opts.memory_only,
      sampler_mesh=opts.sampler_mesh,
      sampler_video=video,
    )
  except ModuleNotFoundError as e:
    if "libtpu" in str(e):
      print(f"error: {e}", file=sys.stderr)
      return 2
    raise
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  text = json.dumps(result, indent=2)
  print(text)
  if opts.out:
    with open(opts.out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
