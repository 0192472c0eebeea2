r"""ViT photo classifier on fixed-size `photo_pans` frames (the baseline for NaViT's photos.py).

  python -m vdit.main --config=configs/vit/photos.py:tiny --workdir=runs/vit_photos

Frames are centre-cropped to a square and resized to 32×32 (ViT needs one grid); the label is
which of the 18 photographs the frame is cut from. Everything else is configs/vit/digits.py.
"""

import ml_collections

from vdit import config_lib, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_lib.load_sibling(__file__, "digits.py", arg)
  c.input.dataset = "photo_pans"
  c.input.fit = "crop"
  c.model.num_classes = datasets.num_classes("photo_pans")
  return c
