r"""DiT class-conditional diffusion on `moving_digits` frames (Peebles & Xie 2023, in pixels).

  python -m vdit.main --config=configs/dit/digits.py:tiny --workdir=runs/dit_digits

DiT with adaLN-Zero, learned σ (hybrid loss), linear schedule, N = 1000, label dropout 0.1 for
classifier-free guidance, as the paper; `:variant=XL/2` gives the paper's model (ε-prediction,
on frames squashed to 32×32 here, on 32×32 latents of a 256 px autoencoder in the paper).
`:tiny` draws each frame's digit as the classifier of the `digits` evaluator reads it: the 16×16
ink map of the box around the ink (`input.fit="ink"`, `vdit.data.ink_crop`), in (2, 2) patches,
predicting x0 (not ε: a narrow model does not reproduce the noise of its input well, and x0 at
high noise levels is ε's error × 1/√ᾱ), 8 rows × 4,000 steps (docs/recipe.md, rows G: 93% of
its samples read as their class, as many as of real frames).
The run ends with a PNG grid of generated digits, one row per class; with
`:tiny,classifier=runs/vit_digit_crops` (a `configs/vit/digit_crops.py:tiny` run) the `digits`
evaluator also classifies 10 samples of each class.
"""

import ml_collections

from vdit import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, variant="S/2", classifier="")
  tiny = arg.tiny
  c = config_lib.trainer_config(
    tiny=tiny,
    total_steps=4_000 if tiny else 400_000,
    lr=1e-3 if tiny else 1e-4,
    warmup_steps=50 if tiny else 0,
    ema_decay=0.995 if tiny else 0.9999,
  )
  if tiny:
    c.log_every_steps = 250
  c.task = "image_diffusion"
  c.input = dict(
    dataset="moving_digits",
    dataset_config="tiny" if tiny else "default",
    # tiny: the digit's ink map (docs/recipe.md, rows G: the whole canvas squashed to 32×32
    # distorts it, and the classifier reads real squashed frames at 68%); else the whole canvas.
    size=(1, 16, 16) if tiny else (1, 32, 32),
    fit="ink" if tiny else "squash",
    rows_per_batch=8 if tiny else 256,  # tiny: small batches, many steps (rows G)
  )
  c.model = dict(
    name="dit",
    variant="" if tiny else arg.variant,  # "" = the explicit sizes below
    patch_size=2,
    width=128 if tiny else 384,
    depth=4 if tiny else 12,
    num_heads=4 if tiny else 6,
    in_channels=3,  # pixels (the autoencoder's latents: its channels)
    num_classes=10,
    class_dropout_prob=0.1,  # adds the null-class embedding row (dropout is done by the task)
    learn_sigma=True,
    **config_lib.RUNTIME,
  )
  c.diffusion = dict(
    objective="gaussian",
    schedule="linear",
    num_timesteps=1000,
    prediction="x0" if tiny else "eps",  # tiny: rows G (ε: 34% at 4,000 steps, x0: 93%)
    learn_sigma=True,
    text_dropout=0.1,  # label dropout for classifier-free guidance
    sampler="ddim",
    ddim_eta=0.0,
    time_sampling="uniform",
    logit_mean=0.0,
    logit_std=1.0,
    shift_base_tokens=0,
    cond_probs=dict(none=1.0),
    guidance_interval=(0.0, 1.0),
  )
  c.sample = dict(per_class=8, steps=50, guidance=2.0, seed=0, display_scale=2)
  # Evaluators (vdit/evaluators, docs/evaluation.md): the `sample` class grid at the end.
  c.evals = dict(class_samples=dict(type="class_samples"))
  if arg.classifier:
    # `classifier=<workdir>` of a `configs/vit/digit_crops.py` run: the `digits` evaluator scores
    # `videos_per_digit` samples of each class (docs/evaluation.md).
    c.evals.digits = dict(
      type="digits",
      classifier_workdir=config_lib.absolute_path(arg.classifier),
      videos_per_digit=10,
      steps=c.sample.steps,
      guidance=c.sample.guidance,
    )
  return c
