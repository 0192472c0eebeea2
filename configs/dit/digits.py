r"""DiT class-conditional diffusion on `moving_digits` frames (Peebles & Xie 2023, in pixels).

  python -m vdit.main --config=configs/dit/digits.py:tiny --workdir=runs/dit_digits

Frames squashed to 32×32 RGB; DiT with adaLN-Zero, ε-prediction with learned σ (hybrid loss),
linear schedule, N = 1000, label dropout 0.1 for classifier-free guidance, exactly the paper's
recipe; `:variant=XL/2` gives the paper's model (on 32×32 latents of a 256 px autoencoder).
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
    total_steps=800 if tiny else 400_000,
    lr=1e-3 if tiny else 1e-4,
    warmup_steps=50 if tiny else 0,
    ema_decay=0.995 if tiny else 0.9999,
  )
  c.task = "image_diffusion"
  c.input = dict(
    dataset="moving_digits",
    dataset_config="tiny" if tiny else "default",
    size=(1, 32, 32),
    fit="squash",  # the whole canvas (a crop could cut the digit out)
    rows_per_batch=32 if tiny else 256,
  )
  c.model = dict(
    name="dit",
    variant="" if tiny else arg.variant,  # "" = the explicit sizes below
    patch_size=4 if tiny else 2,
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
    prediction="eps",
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
