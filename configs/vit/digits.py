r"""ViT digit classifier on fixed-size `moving_digits` frames (the baseline NaViT is compared to).

  python -m vdit.main --config=configs/vit/digits.py:tiny --workdir=runs/vit_digits

Frames are squashed to 32×32 (ViT needs one grid), cut into 4×4 patches (64 tokens).
"""

import ml_collections

from vdit import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, variant="B/16")
  tiny = arg.tiny
  c = config_lib.classifier_config(
    tiny=tiny,
    total_steps=600 if tiny else 100_000,
    lr=1e-3 if tiny else 3e-4,
    warmup_steps=50 if tiny else 10_000,
  )
  c.input = dict(
    dataset="moving_digits",
    dataset_config="tiny" if tiny else "default",
    size=(1, 32, 32) if tiny else (1, 224, 224),
    fit="squash",  # the whole canvas (a crop could cut the digit out)
    rows_per_batch=32 if tiny else 1024,
  )
  c.model = dict(
    name="vit",
    variant="" if tiny else arg.variant,  # "" = the explicit sizes below
    num_classes=10,
    patch_size=4 if tiny else 16,
    width=64 if tiny else 768,
    depth=4 if tiny else 12,
    num_heads=4 if tiny else 12,
    pool="gap" if tiny else "token",
    **config_lib.RUNTIME,
  )
  return c
