"""VideoDiT text-to-video on packed spacetime patches: the Sora recipe (the default task)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from vdit import batch_spec, config_checks, latent_codec, models, sampling, sampling_mesh, tasks
from vdit.diffusion import conditioning, distillation, flow, guidance, objectives
from vdit.diffusion.given_frames import InputError
from vdit.models import layers
from vdit.segments import per_token
from vdit.tasks import base, representation, restore


def packed_apply(model, params, sown: dict | None = None):
  """VideoDiT as the diffusion losses call it: `(x_t, t per token, packed batch) -> output`.

  With a dict `sown`, the model's ("intermediates", …) of the last call are put into it (the
  REPA projection of the pass the loss trains: with self-conditioning the estimate pass runs
  first)."""

  def apply_fn(x_t, t_tok, batch, x0_prev=None):
    prev = {} if x0_prev is None else {"x0_prev": x0_prev}  # self-conditioned models only
    args = (
      x_t,
      t_tok,
      batch["positions"],
      batch["segment_ids"],
      batch["text_tokens"],
      batch["text_segment_ids"],
      batch["labels"],
      batch.get("text_embeddings"),  # precomputed caption embeddings, if the run uses them
    )
    if sown is None:
      return model.apply({"params": params}, *args, **prev)
    out, state = model.apply({"params": params}, *args, **prev, mutable=["intermediates"])
    sown.update(state["intermediates"])
    return out

  return apply_fn


def blur_patches(patches, positions, segment_ids, patch_size, sigma):
  """[B, L, P] patches → the same with every frame of each example blurred in space by a Gaussian
  of std `sigma` [B, L] (in cells, per token), reaching at most one patch into each neighbour
  (so σ ≲ patch / 2 is a Gaussian, larger ones are cut there). Off an example's grid a
  neighbour is the token itself (about an edge replicate). The degraded input of
  `diffusion.input_blur` (`flow.loss`, `DEGRADED_INPUT`)."""
  pt, ph, pw = (int(p) for p in patch_size)
  b, length, p = patches.shape
  c = p // (pt * ph * pw)
  near = layers.grid_neighbours(positions, segment_ids, (1, 3, 3))
  cells = patches.reshape(b, length, pt, ph, pw, c)
  x = layers.cell_canvas(cells, near, off_grid="self")  # each token amid its neighbours' cells

  def taps(radius):  # [B, L, 2r + 1] normalised Gaussian weights of offsets −r … r
    d = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-jnp.square(d) / (2 * jnp.square(jnp.maximum(sigma, 1e-3)))[..., None])
    return w / jnp.sum(w, axis=-1, keepdims=True)

  kh, kw = taps(ph), taps(pw)
  x = jnp.stack(  # along h: output cell i reads cells ph + i − ph … ph + i + ph
    [jnp.einsum("bltkwc,blk->bltwc", x[:, :, :, i : i + 2 * ph + 1], kh) for i in range(ph)], 3
  )  # [B, L, pt, ph, 3pw, C]
  x = jnp.stack(
    [jnp.einsum("blthkc,blk->blthc", x[:, :, :, :, j : j + 2 * pw + 1], kw) for j in range(pw)], 4
  )  # [B, L, pt, ph, pw, C]
  return x.reshape(b, length, p).astype(patches.dtype)


def degrade_input(rng, batch, patch_size, max_sigma: float, rate: float) -> dict:
  """`diffusion.input_blur`: with probability `rate` per example its clean input is blurred in
  space by σ ~ U(0, max_sigma) cells (`blur_patches`); the batch gains `flow.DEGRADED_INPUT`."""
  b, k = batch["shapes"].shape[:2]
  pick, draw = jax.random.split(rng)
  sigma = jax.random.uniform(draw, (b, k), maxval=max_sigma)
  sigma = jnp.where(jax.random.uniform(pick, (b, k)) < rate, sigma, 0.0)
  sigma = per_token(sigma, batch["segment_ids"])
  seg, positions = batch["segment_ids"], batch["positions"]
  blurred = blur_patches(batch["patches"], positions, seg, patch_size, sigma)
  degraded = jnp.where((sigma > 0)[..., None], blurred, batch["patches"])
  return dict(batch, **{flow.DEGRADED_INPUT: degraded})


def check_repa(config: ml_collections.ConfigDict) -> None:
  """`diffusion.repa_encoder` (a captioning run on the same patches) with `model.repa_depth`
  and `model.repa_dim` = its width, or none of them; checked before any compute."""
  spec = config_checks.diffusion_spec(config.diffusion)
  encoder, dit = spec.repa_encoder, models.build_video_dit(config)
  depth, dim = dit.repa_depth, dit.repa_dim
  if not encoder:
    if depth or dim:
      raise config_checks.ConfigError(
        f"model.repa_depth={depth}, model.repa_dim={dim} need diffusion.repa_encoder (a "
        "captioning run whose encoder gives the targets)"
      )
    return
  _, width, enc = representation.checked_encoder(encoder, "diffusion.repa_encoder")
  for key, mine, theirs in (
    ("patch_size", tuple(config.input.patch_size), tuple(enc.input.patch_size)),
    ("channels", models.channels(config), models.channels(enc)),
  ):
    if mine != theirs:
      raise config_checks.ConfigError(
        f"diffusion.repa_encoder={encoder!r} reads input.{key}={theirs}; this run has {mine}: "
        "the encoder must read the same tokens"
      )
  if not 1 <= depth <= config.model.depth or dim != width:
    raise config_checks.ConfigError(
      f"model.repa_depth={depth}, model.repa_dim={dim}: expected a block in [1, "
      f"model.depth={config.model.depth}] and the encoder's width {width}"
    )
  if not spec.repa_weight > 0:
    raise config_checks.ConfigError(
      f"diffusion.repa_weight={spec.repa_weight} must be > 0 with an encoder"
    )


# What a guided call reads of a packed batch: the keys of `sampling.prompt_rows`' rows
# (`objectives.apply_rows`, `encode_rows`; text embeddings when the run has them).
ROW_KEYS = (
  *("positions", "segment_ids", "shapes", "labels"),
  *("text_tokens", "text_segment_ids", "text_embeddings"),
)


@functools.cache
def teacher(workdir: str):
  """(config, model, EMA params) of the run a distillation learns from, restored once
  (replicated); the params enter the train step as constants, as an alignment encoder's."""
  config, _, params = restore.ema_params(workdir)
  return config, models.build(config), params


def check_distill(config: ml_collections.ConfigDict) -> None:
  """`distill.teacher` (a VideoDiT run of the same model and objective) and `distill.steps`,
  with `init_from` the teacher; checked before any compute (the teacher is restored here)."""
  try:
    d = distillation.settings(config.get("distill"))
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None
  workdir = d.teacher
  if not workdir:
    return
  for key, what in (("steps", "the student's number of steps"), ("substeps", "the teacher's "
                    "steps per student step")):  # fmt: skip
    if getattr(d, key) < 1:
      raise config_checks.ConfigError(
        f"distill.{key}={getattr(d, key)!r} must be an int >= 1: {what}"
      )
  spec = config_checks.diffusion_spec(config.diffusion)
  forcing = config.diffusion.get("cond_probs", {}).get("forcing", 0.0)
  if forcing:
    raise config_checks.ConfigError(
      f"diffusion.cond_probs.forcing={forcing}: diffusion "
      "forcing's per-frame times are not distilled (a student takes one time per example); "
      "set it to 0"
    )
  try:
    tconfig, _, _ = teacher(workdir)
  except (ValueError, FileNotFoundError) as e:
    raise config_checks.ConfigError(f"distill.teacher={workdir!r}: {e}") from None
  if tasks.name_of(tconfig) != "video_diffusion":
    raise config_checks.ConfigError(
      f"distill.teacher={workdir!r} is a task={tasks.name_of(tconfig)!r} run; expected a "
      "video_diffusion run"
    )
  mine, theirs = config.model.to_dict(), tconfig.model.to_dict()
  # Keys a later version added (absent from an older teacher's config) are its defaults.
  differ = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
  if differ:
    raise config_checks.ConfigError(
      f"distill.teacher={workdir!r} has another model (model.{', model.'.join(differ)} "
      "differ): the student starts from the teacher's params"
    )
  tspec = objectives.Spec.from_config(tconfig.diffusion)
  for key in ("objective", "flow_prediction", "shift_base_tokens", "noise_correlation"):
    if getattr(spec, key) != getattr(tspec, key):
      raise config_checks.ConfigError(
        f"diffusion.{key}={getattr(spec, key)!r}; the teacher {workdir!r} has "
        f"{getattr(tspec, key)!r}: a student samples on its teacher's path"
      )
  if spec.objective != "rectified_flow":
    raise config_checks.ConfigError(
      f"distill.teacher needs diffusion.objective='rectified_flow', not {spec.objective!r}"
    )
  if config.get("init_from", "") != workdir:
    raise config_checks.ConfigError(
      f"init_from={config.get('init_from', '')!r}: a distilled student starts from its teacher "
      f"(init_from={workdir!r})"
    )


def distill_loss(model, params, batch, rng, config) -> tuple[jax.Array, dict]:
  """Progressive distillation (`vdit.diffusion.distillation`): the student's step against
  `distill.substeps` guided Euler steps of `distill.teacher`, with the teacher's own guidance
  scale and interval (`sample.guidance`, `diffusion.guidance_interval`); at 1 (a distilled
  teacher) one call a step."""
  settings = distillation.settings(config.distill)
  tconfig, tmodel, tparams = teacher(settings.teacher)
  spec, tspec = (objectives.Spec.from_config(c.diffusion) for c in (config, tconfig))
  scale = sampling.settings(tconfig).guidance
  interval = tspec.guidance_interval
  # The sampler's guided call on the batch's rows: its captions encoded once for all the
  # teacher's steps, and with their null rows (every caption [NULL]) unless guidance is 1.
  rows = {k: v for k, v in batch.items() if k in ROW_KEYS}
  if scale != 1.0:
    null, _ = guidance.drop_conditions(rng, rows, 1.0)
    rows = {k: jnp.concatenate([rows[k], null[k]]) for k in rows}
  text = objectives.encode_rows(tmodel, tparams, rows)
  guided = objectives.guided_model(tmodel, tparams, rows, scale, interval, text)
  return distillation.loss(
    objectives.flow_model(spec, lambda x, t: packed_apply(model, params)(x, t, batch)),
    objectives.flow_model(tspec, guided, sampling=True),
    batch,
    jax.random.fold_in(rng, 1),
    steps=settings.steps,
    substeps=settings.substeps,
    shift=objectives.token_shift(spec, batch["shapes"], batch["segment_ids"]),
    noise_correlation=spec.noise_correlation,
  )


class VideoDiffusion(base.Task):
  """Diffusion loss (`config.diffusion`) on packed rows, some examples frame-conditioned."""

  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    config_checks.check_video_diffusion(config, mesh_shape)
    check_repa(config)
    check_distill(config)
    try:
      mesh = sampling.settings(config).mesh
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    try:
      sampling_mesh.make(mesh)
    except InputError as e:
      raise config_checks.ConfigError(f"sample.mesh={mesh!r}: {e}") from None

  def batch_keys(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    extra = ("text_embeddings",) if config.input.get("text_embeddings") else ()
    return batch_spec.PACKED_KEYS + extra

  def loss(self, model, params, batch, rng, config):
    """First some examples become conditioned tasks (image-to-video, extension, interpolation;
    `diffusion.conditioning`): their given frames are clean and carry no loss."""
    cond_rng, loss_rng = jax.random.split(rng)
    spec = objectives.Spec.from_config(config.diffusion)
    batch, cond_metrics = conditioning.condition_batch(
      cond_rng, batch, spec.cond_probs, config.input.patch_size[0]
    )

    if spec.input_blur:  # its own stream: other draws keep their numbers
      batch = degrade_input(
        jax.random.fold_in(rng, 7),
        batch,
        config.input.patch_size,
        spec.input_blur,
        spec.input_blur_rate,
      )
    if distillation.settings(config.get("distill")).teacher:
      loss, aux = distill_loss(model, params, batch, loss_rng, config)
      return loss, {"tokens": aux["num_tokens"], "cond_tokens": cond_metrics["cond_tokens"]}
    encoder = spec.repa_encoder
    sown = {} if encoder else None
    loss, aux = objectives.loss(spec, packed_apply(model, params, sown), batch, loss_rng)
    metrics = {"tokens": aux["num_tokens"], "cond_tokens": cond_metrics["cond_tokens"]}
    if encoder:  # REPA: every real token's block output towards the encoder's clean feature
      features, _, _ = representation.encoder(encoder, "diffusion.repa_encoder")
      target = features(batch["patches"], batch["positions"], batch["segment_ids"])
      align = representation.alignment_loss(sown["repa"][0], target, batch["segment_ids"] > 0)
      loss = loss + spec.repa_weight * align
      metrics["repa_similarity"] = -align
    return loss, metrics

  def predict_fns(self, config, model, mesh, rules) -> base.PredictFns:
    """Besides the base `batches`:

    `validation_loss(params, batch, rng)` → (per-example loss [B, K], its noise level t
    [B, K], loss tokens per example [B, K]) of the global batch: the training objective with
    uniform times, no caption dropout and no frame conditioning (plain text-to-video), so that
    checkpoints compared on the same rng see the same noise (the `loss` evaluator).

    `sampler(params)` → a `sampling.Sampler` of these params (their sharding kept), this model
    and the run's codec (loaded once): `samples`, `prompts`, `adherence`, `digits`, `frechet`.
    """
    spec = dataclasses.replace(
      objectives.Spec.from_config(config.diffusion), time_sampling="uniform", text_dropout=0.0
    )

    def validation_loss(params, batch, rng):
      k = batch["shapes"].shape[1]
      seg, mask = batch["segment_ids"], batch["loss_mask"] | batch["cond_mask"]
      tokens = jnp.stack([jnp.sum((seg == i + 1) & mask, axis=1) for i in range(k)], axis=1)
      batch = dict(batch, cond_mask=batch["cond_mask"] & False)
      _, aux = objectives.loss(spec, packed_apply(model, params), batch, rng)
      return aux["per_example_loss"], aux["t"], tokens

    @functools.cache
    def codec():
      return latent_codec.load(config.autoencoder) if config.get("autoencoder") else None

    def sampler(params) -> sampling.Sampler:  # on `sample.mesh` if the run names one
      mesh = sampling.configured_mesh(config) or None
      return sampling.Sampler(config=config, params=params, model=model, codec=codec(), mesh=mesh)

    keys = self.batch_keys(config)
    return super().predict_fns(config, model, mesh, rules) | {
      "validation_loss": base.on_global_batch(validation_loss, keys, mesh, rules),
      "sampler": sampler,
    }
