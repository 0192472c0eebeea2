r"""ViT digit classifier on the ink crops of `moving_digits` frames (the `digits` evaluator's).

  python -m vdit.main --config=configs/vit/digit_crops.py:tiny --workdir=runs/vit_digit_crops

Each frame is reduced to the box around its ink, as a colour-free ink map of 16×16
(`input.fit="ink"`, `vdit.data.ink_crop`); the evaluator crops generated frames the same way.
Examples with two digits are skipped (one box would hold both; the label names only the first),
so training and validation top-1 are over single-digit examples. Unlike the whole squashed frame
(`configs/vit/digits.py`, ≈ 15-18% top-1), the digit fills the input.
"""

import ml_collections

from vdit import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False)
  tiny = arg.tiny
  c = config_lib.classifier_config(
    tiny=tiny,
    total_steps=1500 if tiny else 20_000,
    lr=1e-3,
    warmup_steps=100 if tiny else 1_000,
  )
  c.input = dict(
    dataset="moving_digits",
    dataset_config="tiny" if tiny else "default",
    size=(1, 16, 16),  # the scans are 8×8: 16×16 keeps all their detail
    fit="ink",
    rows_per_batch=32 if tiny else 256,
  )
  c.model = dict(
    name="vit",
    variant="",  # the explicit sizes below (the named variants have patches ≥ 8)
    num_classes=10,
    patch_size=2,  # 8×8 = 64 tokens
    width=64 if tiny else 192,
    depth=4 if tiny else 6,
    num_heads=4 if tiny else 3,
    pool="gap",
    **config_lib.RUNTIME,
  )
  return c
