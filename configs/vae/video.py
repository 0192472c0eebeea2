r"""The causal video VAE (the latent space): photo pans (real textures) + shapes (sharp edges).

CPU (≈ minutes):  python -m vdit.main --config=configs/vae/video.py:tiny --workdir=runs/vae
TPU pod:          launch/tpu_vm.sh run configs/vae/video.py gs://BUCKET/runs/vae

Full: 4× time, 8× space, 16 latent channels (the compression of the Sora-era video VAEs:
CogVideoX, Cosmos CV4×8×8, Wan), 17-frame 256² clips. `:tiny`: 2× time, 4× space, 8 channels,
9-frame 32² clips at frame stride 2 (the first frame + 8 → 5 latent frames of 8×8; ≈ 11 min on
2 CPU cores). On 5 consecutive frames the tiny VAE learned to ignore its later latents (objects
barely move, so repeating frame 0 is almost as good: +0.2 dB over that copy at 1,500 steps); 9
frames at stride 2 make it encode the motion (+4.1 dB; `psnr_later_frames` vs
`psnr_copy_first_frame` in the evaluation). Images are 1-frame clips of
the same model (`input.size=(1, H, W)`). `:tiny,frames` is the demo's per-frame variant
(`per_frame` below). The run ends with PSNR/SSIM over the validation split
and the latent statistics (workdir/latent_stats.json) that latent diffusion configs read.
"""

import ml_collections

from vdit import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, frames=False)
  tiny = arg.tiny
  c = config_lib.trainer_config(
    tiny=tiny,
    total_steps=1_500 if tiny else 200_000,
    lr=2e-3 if tiny else 1e-4,
    warmup_steps=20 if tiny else 1_000,
    ema_decay=0.99 if tiny else 0.999,
  )
  c.task = "autoencoder"
  c.input = dict(
    mixture=(("photo_pans", "tiny", 1.0), ("shapes", "tiny", 1.0)),
    size=(9, 32, 32) if tiny else (17, 256, 256),  # T = 1 + ft·n frames
    fit="crop",
    frame_stride=2 if tiny else 1,  # tiny clips are short: a stride puts motion in them
    rows_per_batch=8 if tiny else 64,
  )
  c.model = dict(
    name="vae",
    channels=(16, 32, 64) if tiny else (128, 256, 512, 512),  # fs = 2^(levels − 1)
    time_compression=2 if tiny else 4,
    latent_channels=8 if tiny else 16,
    num_res_blocks=1 if tiny else 2,
    temporal_kernel=3,
    norm=True,
    # VA-VAE alignment (with loss.align_encoder): a linear map of each block of align_frames
    # latent frames × 1 cell to the encoder's width align_dim; 0 = off.
    align_dim=0,
    align_frames=2,
  )
  c.loss = dict(
    recon="l1",
    kl_weight=1e-4 if tiny else 1e-6,  # β; the KL is a mean per latent element
    # A captioning run (configs/caption/video.py) whose frozen encoder's features of the clip
    # the latents are aligned to (Yao et al. 2025: cosine and distance-matrix margins), with
    # this weight; "" = off. Its patches must be one latent block (align_frames·ft, fs, fs).
    align_encoder="",
    align_weight=0.1,
    align_margins=(0.5, 0.25),  # (m1, m2): cosine and distance-matrix margins (VA-VAE's)
  )
  # Evaluators (vdit/evaluators, docs/evaluation.md): at the end, PSNR/SSIM over the validation
  # split and the latent statistics (workdir/latent_stats.json) that latent configs read.
  c.evals = dict(autoencoder=dict(type="reconstruction"))
  if arg.frames:
    per_frame(c, tiny)
  return c


def per_frame(c: ml_collections.ConfigDict, tiny: bool) -> None:
  """`:tiny,frames`: the latent space of the text-to-video demo (launch/latent_demo.sh). A 2-D
  autoencoder applied to every frame alone (4× space, no time compression, 8 channels), on
  `shapes` only: no temporal convolutions and no per-position norms, which made it learn ~10 dB
  faster than the causal 3-D VAE at the demo's budget (docs/recipe.md, "The latent demo").
  Tiny: clips of 4 frames for 800 steps and no KL term (row A2: at the same frames seen as 8-frame
  clips for 400 steps, 32.4 dB instead of 29.4, and its reconstructions keep 88% of the shapes
  instead of 67%)."""
  c.input.mixture = (("shapes", "tiny" if tiny else "default", 1.0),)
  c.input.size = (4, 32, 32) if tiny else (8, 256, 256)
  c.input.frame_stride = 1
  c.model.time_compression = 1
  c.model.temporal_kernel = 1
  c.model.norm = False
  c.model.channels = (32, 64, 64) if tiny else (128, 256, 512, 512)
  if tiny:
    c.total_steps = 800
    c.checkpoint_every_steps = 400
    c.loss.kl_weight = 0.0  # the latents are normalised by their statistics anyway
