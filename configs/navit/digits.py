r"""NaViT digit classifier on `moving_digits` frames at their native size and aspect ratio.

  python -m vdit.main --config=configs/navit/digits.py:tiny --workdir=runs/navit_digits

Each example is one frame (`max_frames=1`) of a moving-digits canvas (24–72 px, aspect up to
2.5:1), cut into 4×4 patches and packed with others into rows (NaViT "Patch n' Pack"); token
dropping and per-example resolution sampling as in the paper. The label is the class of the
first digit (a third of the canvases show two digits, so ≈ 85% is the ceiling there).
"""

import ml_collections

from vdit import config_lib

# (width, depth, heads): tiny for CPU, else NaViT-B.
SIZES = {True: (64, 4, 4), False: (768, 12, 12)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = config_lib.parse_arg(arg, tiny=False).tiny
  width, depth, heads = SIZES[tiny]
  # The run of the ViT baseline (schedule, optimizer, top-1 evaluation), so that the two compare
  # at equal training; the input and the model are NaViT's.
  c = config_lib.load_sibling(__file__, "../vit/digits.py", "tiny" if tiny else None)
  c.input = dict(
    dataset="moving_digits",
    dataset_config="tiny" if tiny else "default",
    patch_size=(1, 4, 4) if tiny else (1, 16, 16),
    max_frames=1,  # one frame per example: an image at its native size
    tokens_per_row=256 if tiny else 1024,
    rows_per_batch=16 if tiny else 256,
    max_examples_per_row=8 if tiny else 32,
    max_tokens_per_example=144 if tiny else 256,
    min_tokens_per_example=36 if tiny else 64,  # NaViT resolution sampling
    token_drop=(0.0, 0.25),  # NaViT: a per-example rate of dropped tokens
    text_tokens_per_row=8,
    max_caption_tokens=8,
    shrink_to_fill=0.0,
    num_packing_bins=16,
  )
  c.model = dict(
    name="navit",
    num_classes=10,
    width=width,
    depth=depth,
    num_heads=heads,
    posemb_kind="fractional",
    posemb_size=32,
    **config_lib.RUNTIME,
  )
  return c
