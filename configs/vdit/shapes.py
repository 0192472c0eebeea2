r"""Text-to-video VideoDiT on the bundled `shapes` dataset, in pixel space.

CPU demo (minutes):
  python -m vdit.main --config=configs/vdit/shapes.py:tiny --workdir=runs/shapes
Override anything:
  ... --config.total_steps=1000 --config.input.rows_per_batch=8
TPU pod (every host runs the same command):
  python -m vdit.main --distributed --config=configs/vdit/shapes.py:variant=B \
      --workdir=gs://BUCKET/runs/shapes

Videos keep their native size, aspect ratio and duration: each is cut into (2, 4, 4) spacetime
patches and many are packed into rows of `tokens_per_row` tokens (NaViT "Patch n' Pack").

Latent space (docs/models.md "Latent space"): `:tiny,latent=runs/vae,latents=runs/vae/latents/
shapes` trains on latents the VAE in runs/vae wrote with `python -m vdit.tools.encode_latents`
(input.dataset="latents", input.channels = its Z, (1, 2, 2) patches of latent cells) and samples
through its decoder. `sample` and `evals.samples` sizes are then in latent units (T', H', W'):
T' latent frames decode to 1 + ft·(T' − 1) frames, H'×W' cells to fs·H' × fs·W' pixels.
"""

import os

import ml_collections

from vdit import config_lib
from vdit.data import pipeline

# (width D, depth, heads) per variant; the patch size is part of `input.patch_size`.
VARIANTS = {"tiny": (128, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(
    arg,
    variant="S",
    tiny=False,
    small=False,
    latent="",
    latents="",
    vae="auto",  # configs/vae/video.py's variant: auto = "tiny,frames" (tiny/small) or "frames"
    captions="",
    caption_dim=0,
    distill="",  # a trained run of this config: progressive distillation from it
    distill_steps=0,  # the student's steps
    distill_substeps=2,  # the teacher's steps per student step (2: progressive distillation)
  )
  if arg.tiny and arg.small:
    raise ValueError("choose one of tiny and small, not both")
  tiny = arg.tiny or arg.small  # small: the tiny model for a ~1-hour budget (docs/recipe.md)
  config_lib.check_choice("variant", arg.variant, set(VARIANTS) - {"tiny"})
  width, depth, heads = VARIANTS["tiny" if tiny else arg.variant]
  # Run length, logging, checkpoints, optimizer (tiny: docs/recipe.md rows D, H2, I), mesh.
  c = config_lib.trainer_config(
    tiny=tiny,
    total_steps=400 if tiny else 400_000,  # tiny: minutes on 2 CPU cores
    lr=2e-3 if tiny else 1e-4,
    warmup_steps=50 if tiny else 5_000,
  )
  # Progressive distillation (`distillation` below, docs/sampling.md "Few steps"): a student of
  # `steps` Euler steps learns two guided steps of `teacher` (a run of the same model) in one.
  c.distill = dict(teacher="", steps=0, substeps=2)
  # Workdir of a trained autoencoder (configs/vae/video.py): the model works in its latent space
  # and samples are decoded with it. None = pixel space.
  c.autoencoder = ml_collections.config_dict.placeholder(str)
  # (ft, fs) of that autoencoder, which the latent sizes below were converted with; checked
  # against the run in `autoencoder` before any compute.
  c.latent_compression = ml_collections.config_dict.placeholder(tuple)

  # The input pipeline's defaults (`vdit.data.pipeline.default_input_config`: every key, its
  # type and meaning), with what this recipe sets.
  c.input = pipeline.default_input_config()
  c.input.update(
    dataset="shapes",
    dataset_config="tiny" if tiny else "default",
    patch_size=(2, 4, 4),  # (pt, ph, pw) in pixels
    tokens_per_row=512 if tiny else 4096,  # L
    rows_per_batch=8 if tiny else 256,  # B, global (all hosts)
    max_examples_per_row=8 if tiny else 32,  # K
    text_tokens_per_row=96 if tiny else 512,  # M
    max_caption_tokens=16 if tiny else 64,
    max_frames=16 if tiny else 32,
    min_frames=4,  # clip duration uniform in [min_frames, max_frames]
    max_frame_stride=1 if tiny else 2,  # stride uniform in [frame_stride, max_frame_stride]
    max_tokens_per_example=384 if tiny else 4096,
    min_tokens_per_example=48 if tiny else 256,  # NaViT resolution sampling: budget per example
    num_packing_bins=16 if tiny else 64,  # open rows of the packer's pool (best fit, packing.py)
    shrink_to_fill=0.5,  # an example may lose ≤ half its tokens (keeping aspect) to fill a row
  )

  c.model = dict(
    name="video_dit",
    width=width,
    depth=depth,
    num_heads=heads,
    mlp_ratio=4.0,
    text_width=width,
    # tiny: no encoder blocks, each caption token is its word's embedding + position code (two
    # blocks learnt to broadcast the colour and erase the shape and direction words:
    # docs/recipe.md, "The text encoder erased every word but the colour").
    text_depth=0 if tiny else 4,
    text_heads=heads,
    text_embed_dim=0,  # E of precomputed caption embeddings (the `captions=` option); 0 = tokens
    # The tiny recipe (docs/recipe.md); the large variants keep the settings their AOT plans
    # in docs/scale.md were made with.
    text_embed_std=1.0 if tiny else 0.02,  # init std of the text id table (1: its position code's)
    rope=tiny,  # 3-D rotary positions in self-attention (besides the sin-cos code)
    rope_max_period=100.0 if tiny else 10_000.0,  # in patches
    locality=0.0,  # > 0: a 3-D ALiBi bias in self-attention, largest slope (docs/recipe.md)
    pooled_text=tiny,  # the mean encoded caption also enters the adaLN conditioning
    temporal_attention=False,  # every block also attends along time at each place
    position_conditioning=False,  # the adaLN conditioning also reads each token's position
    # The sin-cos code's (h, w): "absolute" (patches from the example's corner) or "fractional"
    # (fractions of the example's grid, NaViT): "the middle" has one code on every canvas.
    position_code="absolute",
    patch_skip=0,  # > 0: a learned per-t linear map of the own noisy patch joins the output
    # (kt, kh, kw): embed each token from its neighbours' patches too (a convolutional patch
    # embedding; tiny: docs/recipe.md rows H, H2, I).
    patch_context=(3, 3, 3) if tiny else (),
    center_input=False,  # centre each example on its mean input per channel (docs/recipe.md)
    mlp_context=(),  # (kt, kh, kw): a depthwise convolution before every block's MLP
    output_context=(),  # (kt, kh, kw): the output projection reads the neighbours too
    # Time/caption conditioning and adaLN computed per example, not per token (same result).
    shared_conditioning=True,
    patch_bottleneck=0,  # > 0: low-rank patch embedding P → this → width (JiT)
    # REPA (Yu et al. 2024; with diffusion.repa_encoder): the output of block `repa_depth`
    # (1-based) is projected to the encoder's width `repa_dim`; 0 = off.
    repa_depth=0,
    repa_dim=0,
    # > 0: a convolutional head of this many 3×3 blocks over the cells of each frame, added to
    # the final projection (`video_dit.CellHead`; docs/recipe.md, row CH); 0 = off.
    cell_head=0,
    cell_head_width=32,
    num_classes=0,
    attention_backend="xla",
    # tiny: the 4 blocks unrolled. On CPU a scanned stack stacks each block's activations for
    # the backward into fresh buffers every step: 1.13–1.17× slower (BENCHMARKS.md).
    scan_layers=not tiny,
    remat_policy="none" if tiny else "dots_saveable",
    dtype="float32" if tiny else "bfloat16",
  )

  c.diffusion = dict(
    objective="rectified_flow",  # or "gaussian" (DDPM / DiT)
    # Rectified flow: "uniform" | "logit_normal". Uniform (in the unshifted time) gives every
    # step of the sampler's grid its share of training times (docs/recipe.md).
    time_sampling="uniform" if tiny else "logit_normal",
    logit_mean=0.0,
    logit_std=1.0,
    # Rectified flow: each example's time is shifted by sqrt(its tokens / base) (SD3, Sec. 5.3.2)
    # in training and sampling; 0 = no shift.
    shift_base_tokens=24 if tiny else 1024,
    # Rectified flow: the model predicts "velocity" (ε − x0) or "x0" (converted to a velocity;
    # needed in pixel space, where a narrow model cannot reproduce the patch noise), or
    # "x0_gated" (x0 and a per-token gate to its own input) or "preconditioned" (EDM).
    flow_prediction="x0" if tiny else "velocity",
    flow_t_min=0.3 if tiny else 0.05,  # x0: loss weight 1/max(t, t_min)²
    flow_sigma_data=0.5,  # "preconditioned": the data std of EDM's c_skip / c_out
    flow_eta=1.0,  # the "stochastic" sampler's η (0 = Euler)
    # Rate of self-conditioned training batches: the model also reads its previous x̂0 (Chen
    # et al. 2023); the sampler feeds it at every step. 0 = off.
    self_condition=0.0,
    # Share of each token's noise common to its place in every patch-frame (PYoCo mixed noise,
    # `flow.mixed_noise`), in training and sampling; 0 = independent noise.
    noise_correlation=0.0,
    # γ of input perturbation (Ning et al. 2023): the model reads x_t built from noise + γ·ξ, the
    # target stays the unperturbed one, against the sampler's exposure bias; 0 = off.
    input_perturbation=0.0,
    # Blurred inputs (docs/recipe.md, rows BL): with probability `input_blur_rate` an example's
    # clean input is blurred in space by σ ~ U(0, input_blur) cells before it is noised, the
    # target staying the sharp x0, so the words must restore what the blur took (as they must
    # from the sampler's own blurred mid-path objects); 0 = off.
    input_blur=0.0,
    input_blur_rate=0.5,
    text_dropout=0.1,  # classifier-free guidance: rate of null captions (and labels) in training
    # REPA: a captioning run (configs/caption/video.py, on this run's tokens) whose frozen
    # encoder's features of the clean video the hidden states of model.repa_depth are pulled
    # towards, with weight `repa_weight` (minus their cosine similarity); "" = off.
    repa_encoder="",
    repa_weight=0.5,
    # Conditioning tasks drawn per example in training (relative weights; the later ones —
    # keyframes, retake, inpaint, outpaint, forcing (diffusion forcing: a noise level per
    # patch-frame; needs model.shared_conditioning=False) — at 0 draw nothing, so the others'
    # draws are as before they existed: docs/sampling.md).
    cond_probs=dict(
      none=0.5,
      image_to_video=0.2,
      extend_forward=0.1,
      extend_backward=0.1,
      interpolate=0.1,
      keyframes=0.0,
      retake=0.0,
      inpaint=0.0,
      outpaint=0.0,
      forcing=0.0,
    ),
    schedule="linear",  # gaussian: "linear" | "cosine"
    num_timesteps=1000,  # gaussian: N
    prediction="eps",  # gaussian: "eps" | "v" | "x0"
    learn_sigma=False,  # gaussian: hybrid loss with learned variance (needs 2P model outputs)
    sampler="",  # "" = the objective's default: euler (flow) / ddim (gaussian)
    ddim_eta=0.0,  # DDIM: 0 deterministic, 1 DDPM-like
    guidance_interval=(0.0, 1.0),  # apply guidance only for noise levels lo <= t <= hi
  )

  c.sample = dict(
    prompts=(
      "a red circle moving right",
      "a blue square moving left",
      "a green triangle moving up",
      "a yellow circle moving down",
    ),
    num_frames=8,
    height=32,
    width=48,
    steps=32,
    guidance=3.0,
    seed=0,
    display_scale=4,  # nearest-neighbour upscaling of GIF/MP4 for viewing
    # Devices the samples (vdit.sample, the evals) are drawn on, e.g. "sequence:8": one video's
    # tokens over 8 devices (docs/sampling.md, "One video on many devices"); "" = none.
    mesh="",
  )

  # Evaluators (vdit/evaluators, docs/evaluation.md): run every `every_steps` and at the end;
  # `python -m vdit.evaluate --config=... --workdir=...` runs them on a checkpoint.
  every = c.total_steps if tiny else 20_000
  generated = dict(every_steps=every, steps=16 if tiny else 32)  # the evals that sample
  square = (8, 32, 32) if tiny else (16, 64, 64)
  c.evals = dict(
    loss=dict(type="loss", every_steps=every, num_batches=2 if tiny else 16, num_buckets=5),
    samples=dict(
      type="samples",
      prompts=c.sample.prompts[:2] if tiny else c.sample.prompts,
      sizes=((8, 32, 48),) if tiny else ((16, 64, 96), (16, 96, 64)),
      **generated,
    ),
    # tiny: all 48 colour × shape × direction prompts, square, landscape and portrait.
    adherence=dict(
      type="adherence",
      num_prompts=48 if tiny else 96,
      size=square,
      sizes=((8, 32, 32), (8, 32, 48), (8, 48, 24)) if tiny else (),
      **generated,
    ),
    # Every frame-conditioning mode on real validation clips (docs/sampling.md, "Measured"); the
    # opt-in "long" (a video 4× the longest training clip, window by window) is not among them:
    # `--config.evals.modes.modes="('long',)"` (docs/sampling.md, "Any length").
    modes=dict(
      type="modes",
      num_videos=24 if tiny else 48,
      size=square,
      modes=("i2v", "extend_fwd", "extend_bwd", "interpolate", "loop", "edit")
      + ("retake", "inpaint", "outpaint", "keyframes"),
      **generated,
    ),
    prompts=dict(type="prompts"),  # `sample.prompts` → workdir/samples/<step>/, at the end
  )
  if arg.small:
    small_budget(c)
  if arg.latent or arg.latents:
    latent_space(c, arg.latent, arg.latents, arg.vae, tiny, arg.small)
  if arg.captions or arg.caption_dim:
    precomputed_captions(c, arg.captions, arg.caption_dim)
  if arg.distill or arg.distill_steps:
    distillation(c, arg.distill, arg.distill_steps, arg.distill_substeps)
  return c


def distillation(c: ml_collections.ConfigDict, teacher: str, steps: int, substeps: int = 2):
  """One round of progressive distillation (Salimans & Ho 2022): a student of `steps` Euler
  steps, started from the EMA params of `teacher` (a run of this same config), learns where
  `substeps` (2) of the teacher's guided Euler steps land (`vdit.diffusion.distillation`), and
  samples without guidance (one model call a step). The next round's teacher is this run
  (launch/distill.sh: 16 → 8 → 4 → 2 → 1). `substeps=1` is guidance distillation (Meng et al.
  2023, stage one): the student learns the guided teacher's velocity at every time of its
  `steps`-step grid and samples at any divisor of `steps` (STEPS=32 SUBSTEPS=1)."""
  if not (teacher and steps >= 1):
    raise ValueError(
      f"distill={teacher!r},distill_steps={steps}: a distillation needs the teacher's workdir "
      "and the student's steps (>= 1)"
    )
  c.distill = dict(teacher=config_lib.absolute_path(teacher), steps=steps, substeps=substeps)
  c.init_from = c.distill.teacher
  # Short rounds from a trained model: a fresh Adam at a tenth of the recipe's peak (the
  # teacher's own last learning rate), the EMA as in training.
  c.total_steps = 2_000
  c.optimizer.lr = c.optimizer.lr / 10
  c.optimizer.warmup_steps = 100
  c.checkpoint_every_steps = 1_000
  c.diffusion.sampler = "euler"  # the path the student learnt; guidance is inside it
  c.sample.guidance = 1.0
  c.sample.steps = steps
  for ev in c.evals.values():
    if "steps" in ev:
      ev.steps = steps
    ev.every_steps = c.total_steps


def small_budget(c: ml_collections.ConfigDict):
  """`:small`: the tiny recipe trained 7× longer (about an hour on 2 CPU cores), with the loss
  curve every 350 steps and adherence at the half and at the end."""
  c.total_steps = 2_800
  c.checkpoint_every_steps = 350
  c.evals.loss.every_steps = 350
  c.evals.samples.every_steps = c.evals.adherence.every_steps = 1_400
  c.evals.modes.every_steps = c.total_steps


def precomputed_captions(c: ml_collections.ConfigDict, table: str, dim: int):
  """Conditions on the caption embeddings of `table`
  (`python -m vdit.tools.embed_captions --out=…`, which prints its `caption_dim`): the model
  projects them (E → text_width) and its text blocks refine them. The table is not read here
  (config files read no files); the run checks that it holds E-channel embeddings before any
  compute."""
  if not (table and dim > 0):
    raise ValueError(
      f"captions={table!r},caption_dim={dim}: precomputed captions need both the table "
      "(captions=DIR) and its embedding width (caption_dim=E, the table's meta.json 'dim')"
    )
  c.input.text_embeddings = config_lib.absolute_path(table)
  c.model.text_embed_dim = dim


def latent_space(
  c: ml_collections.ConfigDict,
  vae_workdir: str,
  latents_dir: str,
  vae_arg: str,
  tiny: bool,
  small: bool,
):
  """Switches `c` to the latent space of the autoencoder trained in `vae_workdir` with
  `configs/vae/video.py:<vae_arg>`, reading the latents
  `python -m vdit.tools.encode_latents --autoencoder=<vae_workdir> --out=<latents_dir>` wrote.

  The compression and the latent channels come from that config file (code), not from the run
  (config files read no files); the run checks before any compute that the autoencoder in
  `vae_workdir` has them (`config_checks`: `latent_compression`, `input.channels`)."""
  if not (vae_workdir and latents_dir):
    raise ValueError("latent space needs both latent=<VAE workdir> and latents=<latents dir>")
  if vae_arg == "auto":  # the demo's per-frame autoencoder, at the model's scale
    vae_arg = "tiny,frames" if tiny else "frames"
  vae = config_lib.load_sibling(__file__, os.path.join("..", "vae", "video.py"), vae_arg).model
  ft, fs = int(vae.time_compression), 2 ** (len(vae.channels) - 1)

  def latent_size(size):  # (T, H, W) pixels → (T', H', W') latent units
    t, h, w = size
    return (1 + (t - 1) // ft, h // fs, w // fs)

  # Absolute paths: the run's config is read again by vdit.sample, vdit.evaluate and the tools,
  # from any working directory.
  c.autoencoder = config_lib.absolute_path(vae_workdir)
  c.latent_compression = (ft, fs)  # what the sizes below were converted with (checked)
  c.input.dataset = "latents"
  c.input.dataset_config = config_lib.absolute_path(latents_dir)
  c.input.mixture = ()
  c.input.channels = int(vae.latent_channels)
  # (pt, ph, pw) in latent frames / cells. A per-frame autoencoder (ft = 1) leaves time whole:
  # tokens of two latent frames, as the pixel model's (docs/recipe.md, rows L).
  c.input.patch_size = (2 if ft == 1 else 1, 2, 2)
  c.input.max_frames = 8 if tiny else 16  # latent frames
  c.input.min_frames = 2
  if tiny and ft == 1:
    # The demo's latents are of videos shrunk to a longer side of 48 pixels (launch/
    # latent_demo.sh): ≤ 4 × 6 × 6 = 144 tokens each. Rows of 144 tokens (1–4 examples, 98.4%
    # filled) instead of 512 (up to 16): attention over 144 instead of 512 keys, 1.6× the steps/s
    # at 12% more tokens per step (docs/recipe.md, rows R).
    c.input.max_tokens_per_example = 144
    c.input.tokens_per_row = 144
    c.input.max_examples_per_row = 4
    c.input.text_tokens_per_row = 64
    # 4 rows per step. A step's time here is mostly its rows (32 rows: 1.3 steps/s, 8: 5.4,
    # 4: 9.6 on 2 cores), so small batches buy many more steps in the same minutes, and steps
    # are what the motion and the shape need: direction at chance with 32 × 500, 52% with
    # 4 × 4,000; shape off chance only after ~12,000 steps (docs/recipe.md, rows M and N).
    # The demo: 3,600 steps (within 15 minutes); `:small`: 32,000 (58 minutes with its evals on
    # a slow day, row SM32: all three 41.7% at 16,000 steps, 61.1% at 32,000).
    c.input.rows_per_batch = 4
    c.total_steps = 32_000 if small else 3_600
    c.log_every_steps = 500 if small else 200
    c.checkpoint_every_steps = 8_000 if small else 1_200
    # Clips read at a frame stride of 1–3 (latent frames are per-frame codes): up to 3× the
    # motion within the 8 frames a sample has (direction 35% → 42% at 8 × 2,000, rows M).
    c.input.max_frame_stride = 3
    c.evals.samples.every_steps = c.evals.modes.every_steps = c.total_steps
    for name in ("loss", "adherence"):  # `:small`: the curve at 8,000, 16,000, 24,000, 32,000
      c.evals[name].every_steps = 8_000 if small else c.total_steps
  # Latents are not resized (area-averaged latents are not the latents of a smaller video):
  # a fixed budget and no shrinking to fill rows.
  c.input.min_tokens_per_example = c.input.max_tokens_per_example
  c.input.shrink_to_fill = 0.0
  c.diffusion.flow_prediction = "velocity"  # latents are smooth enough for velocity prediction
  if tiny:
    # Noise shared by each place along time (PYoCo) and fresh noise at every sampling step: the
    # patch-frames of a sample agree on one object (temporal consistency 0.10 → 0.2 with Euler,
    # ~0.45 with the stochastic sampler; docs/recipe.md, rows Y).
    c.diffusion.noise_correlation = 0.8
    c.diffusion.sampler = "stochastic"
    # Canvas-relative positions: one compact object that persists (temporal 0.59 → 0.77;
    # docs/recipe.md, rows D).
    c.model.position_code = "fractional"
    # 80% plain text-to-video (was half): temporal 0.77 → 0.87 (docs/recipe.md, row D6).
    c.diffusion.cond_probs = dict(
      none=0.8,
      image_to_video=0.05,
      extend_forward=0.05,
      extend_backward=0.05,
      interpolate=0.05,
      keyframes=0.0,
      retake=0.0,
      inpaint=0.0,
      outpaint=0.0,
      forcing=0.0,
    )
    if small:
      # Guidance 6 while t ≥ 0.3 (the CLI's and the evals' default): all three 25.7% → 41.7% at
      # 16,000 steps; over the whole path it breaks objects up late (temporal 0.84 → 0.73). The
      # demo keeps guidance 3: at 3,600 steps there is little to multiply (all three 18.5% →
      # 18.3% over three seeds, colour 100% → 98%; docs/recipe.md, rows CFG).
      c.sample.guidance = 6.0
      c.diffusion.guidance_interval = (0.3, 1.0)
  # Sizes stay given in pixels above and are converted here (T' latent frames decode to
  # 1 + ft·(T' − 1) frames, H'×W' cells to fs·H' × fs·W' pixels).
  c.sample.num_frames, c.sample.height, c.sample.width = latent_size(
    (c.sample.num_frames, c.sample.height, c.sample.width)
  )
  c.sample.display_scale = 2 if tiny else 1
  c.evals.samples.sizes = tuple(latent_size(s) for s in c.evals.samples.sizes)
  # The scorer reads the decoded pixels; its words come from the pixel dataset's variant.
  c.evals.adherence.size = latent_size(c.evals.adherence.size)
  c.evals.adherence.sizes = tuple(latent_size(s) for s in c.evals.adherence.sizes)
  c.evals.adherence.dataset_config = "tiny" if tiny else "default"
  c.evals.modes.size = latent_size(c.evals.modes.size)
