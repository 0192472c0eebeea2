"""Config checks every run shares: a bad value fails with a clear message, before any compute.

`vdit.train.validate` runs them in order with the task's own checks (`Task.check_config`, which
build on the section checks here) and the evaluators' (`vdit.evaluators.check_config`).
"""

import math
import os

import jax
import ml_collections

from vdit import checkpointing, datasets, models, sharding, train_state
from vdit.data import caption_table, pipeline
from vdit.data import dense as dense_lib
from vdit.datasets import latents
from vdit.diffusion import flow, gaussian, objectives
from vdit.models import layers, posemb

MODELS = ("video_dit",)
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and what's expected."""


def choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"{name}={value!r} is not supported; expected one of {choices}")


def positive(name: str, value) -> None:
  if not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{name}={value!r} must be a positive integer")


def diffusion_spec(d: ml_collections.ConfigDict) -> objectives.Spec:
  """`config.diffusion` as its typed spec; a bad key or type is a ConfigError."""
  try:
    return objectives.Spec.from_config(d)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_diffusion(section: ml_collections.ConfigDict) -> None:
  """The `config.diffusion` keys (`vdit.diffusion.objectives.Spec`: keys, types, defaults)."""
  d = diffusion_spec(section)
  choice("diffusion.objective", d.objective, objectives.OBJECTIVES)
  choice("diffusion.time_sampling", d.time_sampling, flow.TIME_SAMPLINGS)
  if not 0.0 <= d.text_dropout < 1.0:
    raise ConfigError(f"diffusion.text_dropout={d.text_dropout} must be in [0, 1)")
  if d.logit_std <= 0:
    raise ConfigError(f"diffusion.logit_std={d.logit_std} must be > 0")
  if d.shift_base_tokens < 0:
    raise ConfigError(
      f"diffusion.shift_base_tokens={d.shift_base_tokens!r} must be an integer >= 0 (0 = off)"
    )
  forcing = section.get("cond_probs", {}).get("forcing", 0.0)  # as written (the spec normalises)
  if forcing and d.objective != "rectified_flow":
    raise ConfigError(
      f"diffusion.cond_probs.forcing={forcing} (diffusion forcing) needs "
      f"diffusion.objective='rectified_flow', not {d.objective!r}"
    )
  choice("diffusion.schedule", d.schedule, gaussian.SCHEDULES)
  choice("diffusion.prediction", d.prediction, gaussian.PREDICTIONS)
  choice("diffusion.flow_prediction", d.flow_prediction, flow.FLOW_PREDICTIONS)
  if not 0.0 < d.flow_t_min < 1.0:
    raise ConfigError(f"diffusion.flow_t_min={d.flow_t_min} must be in (0, 1)")
  if d.num_timesteps < 2:
    raise ConfigError(f"diffusion.num_timesteps={d.num_timesteps!r} must be an integer >= 2")
  if d.learn_sigma and d.objective != "gaussian":
    raise ConfigError(
      f"diffusion.learn_sigma=True needs diffusion.objective='gaussian', not {d.objective!r}"
    )
  if d.sampler:
    choice(
      f"diffusion.sampler (objective {d.objective!r})", d.sampler, objectives.SAMPLERS[d.objective]
    )
  if not 0.0 <= d.ddim_eta <= 1.0:
    raise ConfigError(f"diffusion.ddim_eta={d.ddim_eta} must be in [0, 1]")
  if not 0.0 <= d.flow_eta <= 1.0:
    raise ConfigError(f"diffusion.flow_eta={d.flow_eta} must be in [0, 1]")
  if not 0.0 <= d.self_condition <= 1.0:
    raise ConfigError(f"diffusion.self_condition={d.self_condition} must be a rate in [0, 1]")
  if not 0.0 <= d.noise_correlation < 1.0:
    raise ConfigError(f"diffusion.noise_correlation={d.noise_correlation} must be in [0, 1)")
  if not d.input_perturbation >= 0.0:
    raise ConfigError(f"diffusion.input_perturbation={d.input_perturbation} must be >= 0")
  if not d.input_blur >= 0.0 or not 0.0 <= d.input_blur_rate <= 1.0:
    raise ConfigError(
      f"diffusion.input_blur={d.input_blur} must be >= 0 (cells) and "
      f"diffusion.input_blur_rate={d.input_blur_rate} a rate in [0, 1]"
    )
  for name in ("self_condition", "noise_correlation", "input_perturbation", "input_blur"):
    if getattr(d, name) and d.objective != "rectified_flow":
      raise ConfigError(
        f"diffusion.{name}={getattr(d, name)} needs diffusion.objective='rectified_flow', "
        f"not {d.objective!r}"
      )
  if not d.flow_sigma_data > 0.0:
    raise ConfigError(f"diffusion.flow_sigma_data={d.flow_sigma_data} must be > 0")
  lo, hi = d.guidance_interval
  if not 0.0 <= lo <= hi <= 1.0:
    raise ConfigError(
      f"diffusion.guidance_interval={d.guidance_interval!r} must be (lo, hi) with "
      "0 <= lo <= hi <= 1"
    )


def _wrap(check, *args) -> None:
  """Runs a check that raises ValueError, re-raised as a ConfigError (one message)."""
  try:
    check(*args)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_input(config: ml_collections.ConfigDict, *, dense: bool = False) -> None:
  """The `input` section: the pipeline's own checks (one place), plus `size` for fixed-size
  batches (`vdit.data.dense`)."""
  inp = config.input
  patch = tuple(inp.get("patch_size", (1, 1, 1)))
  if len(patch) != 3 or any(not isinstance(p, int) or p <= 0 for p in patch):
    raise ConfigError(f"input.patch_size={patch!r} must be three positive ints (pt, ph, pw)")

  def check():
    resolved = pipeline.resolve_input_config(inp)
    pipeline.check_input_config(resolved)
    for name, _, _ in pipeline.components(resolved):
      choice("input dataset", name, tuple(datasets.SOURCES))
    if dense:
      dense_lib.check_size(resolved)
      choice("input.fit", resolved.fit, dense_lib.FITS)

  _wrap(check)


def check_model_common(model: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  """Keys every transformer config has: backend, remat, dtype, heads vs the tensor axis."""
  choice("model.attention_backend", model.attention_backend, layers.ATTENTION_BACKENDS)
  choice("model.remat_policy", model.remat_policy, layers.REMAT_NAMES)
  choice("model.dtype", model.dtype, DTYPES)
  if model.get("width") and model.get("num_heads") and model.width % model.num_heads:
    raise ConfigError(
      f"model.width={model.width} is not divisible by model.num_heads={model.num_heads}"
    )
  if model.get("num_heads") and model.num_heads % shape["tensor"]:
    raise ConfigError(
      f"model.num_heads={model.num_heads} is not divisible by tensor={shape['tensor']}"
    )


def check_video_diffusion(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  """The `video_diffusion` task: packed input, VideoDiT, diffusion and sample settings."""
  inp, model = config.input, config.model
  check_input(config)
  for name in ("text_tokens_per_row", "max_caption_tokens", "vocab_size"):
    positive(f"input.{name}", inp[name])
  if inp.max_caption_tokens > inp.text_tokens_per_row:
    raise ConfigError(
      f"input.max_caption_tokens={inp.max_caption_tokens} exceeds "
      f"input.text_tokens_per_row={inp.text_tokens_per_row}"
    )
  choice("model.name (task video_diffusion)", model.name, MODELS)
  check_diffusion(config.diffusion)
  try:  # the module's fields: the config's values, its defaults for absent keys
    dit = models.build_video_dit(config)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from None
  forcing = config.diffusion.get("cond_probs", {}).get("forcing", 0.0)
  if forcing and dit.shared_conditioning:
    raise ConfigError(
      f"diffusion.cond_probs.forcing={forcing} (a noise level per "
      "patch-frame) needs model.shared_conditioning=False: a shared-conditioning model holds "
      "one time per example"
    )
  check_model_common(model, shape)
  if dit.text_width % dit.text_heads:
    raise ConfigError(
      f"model.text_width={dit.text_width} is not divisible by model.text_heads={dit.text_heads}"
    )
  if dit.text_heads % shape["tensor"]:
    raise ConfigError(
      f"model.text_heads={dit.text_heads} is not divisible by tensor={shape['tensor']}"
    )
  for key in ("patch_context", "mlp_context", "output_context"):
    context = tuple(getattr(dit, key))
    if context and (len(context) != 3 or any(int(k) != k or k < 1 or k % 2 == 0 for k in context)):
      raise ConfigError(
        f"model.{key}={context} must be () or three odd sizes (kt, kh, kw), e.g. (3, 3, 3)"
      )
  if not dit.locality >= 0:  # also NaN
    raise ConfigError(f"model.locality={dit.locality} must be ≥ 0 (0 = no locality bias)")
  if dit.locality and dit.attention_backend != "xla":
    raise ConfigError(
      f"model.locality={dit.locality} needs model.attention_backend='xla', not "
      f"{dit.attention_backend!r} (the bias is added to dense attention logits)"
    )
  choice("model.position_code", dit.position_code, posemb.POSITION_CODES)
  if int(dit.patch_skip) != dit.patch_skip or dit.patch_skip < 0:
    raise ConfigError(
      f"model.patch_skip={dit.patch_skip} must be an integer ≥ 0: the number of time bumps "
      "(0 = off)"
    )
  if inp.tokens_per_row % shape["sequence"]:
    raise ConfigError(
      f"input.tokens_per_row={inp.tokens_per_row} is not divisible by sequence={shape['sequence']}"
    )
  _check_latent_space(config)
  _check_text_embeddings(config, dit.text_embed_dim)


def _check_text_embeddings(config: ml_collections.ConfigDict, dim: int) -> None:
  """input.text_embeddings (a caption-embedding table) and model.text_embed_dim (`dim`) agree."""
  table = config.input.get("text_embeddings")
  if not table:
    if dim:
      raise ConfigError(
        f"model.text_embed_dim={dim} needs input.text_embeddings = a caption-embedding table"
      )
    return
  try:
    meta = caption_table.read_meta(table)
  except FileNotFoundError as e:
    raise ConfigError(f"input.text_embeddings={table!r}: {e}") from e
  if meta["dim"] != dim:
    raise ConfigError(
      f"model.text_embed_dim={dim} but the caption embeddings in {table!r} have {meta['dim']} "
      "channels"
    )


def _check_latent_space(config: ml_collections.ConfigDict) -> None:
  """config.autoencoder, the latents datasets and input.channels agree (before any compute)."""
  inp, vae_dir = config.input, config.get("autoencoder")
  if vae_dir:
    try:
      vae = checkpointing.read_config(vae_dir)
    except checkpointing.NoCheckpointError as e:
      raise ConfigError(f"config.autoencoder={vae_dir!r} is not a run directory: {e}") from e
    if vae.get("task") != "autoencoder":
      raise ConfigError(f"config.autoencoder={vae_dir!r} holds a task={vae.get('task')!r} run")
    if vae.model.latent_channels != inp.channels:
      raise ConfigError(
        f"input.channels={inp.channels} but the autoencoder {vae_dir!r} has "
        f"{vae.model.latent_channels} latent channels (configs/vdit/shapes.py: pass "
        "vae=<the configs/vae/video.py variant it was trained with>)"
      )
    expected = config.get("latent_compression")
    actual = (int(vae.model.time_compression), 2 ** (len(vae.model.channels) - 1))
    if expected is not None and tuple(expected) != actual:
      raise ConfigError(
        f"latent_compression={tuple(expected)} (time, space) but the autoencoder {vae_dir!r} "
        f"compresses by {actual}: the config's latent sizes are for another autoencoder "
        "(configs/vdit/shapes.py: pass vae=<the configs/vae/video.py variant it was trained "
        "with>)"
      )
  sources = [(inp.dataset, inp.get("dataset_config"))] if inp.dataset else []
  sources += [(m[0], m[1]) for m in inp.get("mixture") or ()]
  for name, path in sources:
    if name != "latents":
      continue
    try:
      meta = latents.meta(path or "")
    except FileNotFoundError as e:
      raise ConfigError(f"input latents {path!r}: {e}") from e
    if meta["channels"] != inp.channels:
      raise ConfigError(
        f"input.channels={inp.channels} but the latents in {path!r} have {meta['channels']}"
      )
    if not vae_dir:
      raise ConfigError(
        f"latents {path!r} need config.autoencoder (their VAE: {meta['autoencoder']!r}) to "
        "decode samples"
      )
    if os.path.realpath(meta["autoencoder"]) != os.path.realpath(vae_dir):  # links resolved
      raise ConfigError(
        f"the latents in {path!r} were encoded by {meta['autoencoder']!r}, not by "
        f"config.autoencoder={vae_dir!r}"
      )


def check_steps(config: ml_collections.ConfigDict) -> None:
  """The run length and the logging and checkpoint intervals."""
  for name in ("total_steps", "log_every_steps", "checkpoint_every_steps", "max_checkpoints"):
    positive(name, config[name])


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """`init_from`: a run with a checkpoint (its params are matched to this model when loaded)."""
  source = config.get("init_from", "")
  if source and checkpointing.latest_step(source) is None:
    raise ConfigError(
      f"init_from={source!r} holds no checkpoint; expected the workdir of a trained run of "
      "this model"
    )


def check_optimizer(section: ml_collections.ConfigDict) -> None:
  """The `optimizer` section (`vdit.train_state.Optimizer`: keys, types, defaults)."""
  try:
    opt = train_state.optimizer_spec(section)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not (math.isfinite(opt.lr) and opt.lr > 0):
    raise ConfigError(f"optimizer.lr={opt.lr} must be a finite number > 0")
  choice("optimizer.name", opt.name, train_state.OPTIMIZERS)
  if opt.name == "muon" and opt.weight_decay:
    # optax's muon decays every parameter of its AdamW part: biases and norms too.
    raise ConfigError(f"optimizer.name='muon' takes no weight_decay (got {opt.weight_decay})")
  for key in ("b1", "b2"):
    if not 0.0 <= getattr(opt, key) < 1.0:
      raise ConfigError(f"optimizer.{key}={getattr(opt, key)} must be in [0, 1)")
  if not (math.isfinite(opt.grad_clip) and opt.grad_clip > 0):
    raise ConfigError(f"optimizer.grad_clip={opt.grad_clip} must be a finite number > 0")
  for key in ("weight_decay", "warmup_steps", "schedule_steps"):
    if not (math.isfinite(getattr(opt, key)) and getattr(opt, key) >= 0):
      raise ConfigError(f"optimizer.{key}={getattr(opt, key)} must be a finite number >= 0")
  if not 0.0 <= opt.final_lr_fraction <= 1.0:
    raise ConfigError(f"optimizer.final_lr_fraction={opt.final_lr_fraction} must be in [0, 1]")
  if not 0.0 <= opt.ema_decay < 1.0:
    raise ConfigError(f"optimizer.ema_decay={opt.ema_decay} must be in [0, 1)")
  positive("optimizer.grad_accum_steps", opt.grad_accum_steps)


def check_mesh(
  config: ml_collections.ConfigDict,
  *,
  num_devices: int | None = None,
  num_processes: int | None = None,
) -> dict[str, int]:
  """{mesh axis: size} of `config.mesh` over `num_devices` devices and `num_processes` hosts
  (default: this run's; the AOT tool passes a TPU topology's), the batch rows split over both."""
  inp = config.input
  try:
    sizes = sharding.mesh_shape(config.mesh, num_devices or jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  shape = dict(zip(sharding.MESH_AXES, sizes))
  batch_shards = shape["data"] * shape["fsdp"]
  if inp.rows_per_batch % batch_shards:
    raise ConfigError(
      f"input.rows_per_batch={inp.rows_per_batch} is not divisible by data×fsdp={batch_shards} "
      f"of mesh {shape}"
    )
  hosts = num_processes or jax.process_count()
  if batch_shards % hosts:
    # Each host loads its own rows: the row axis must split over the hosts, not be replicated.
    raise ConfigError(
      f"data×fsdp={batch_shards} of mesh {shape} is not a multiple of the {hosts} processes; "
      "each process loads its own rows, so the rows must be sharded over all of them"
    )
  return shape
