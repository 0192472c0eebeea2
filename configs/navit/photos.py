r"""NaViT photo classifier on `photo_pans` frames at their native size and aspect ratio.

  python -m vdit.main --config=configs/navit/photos.py:tiny --workdir=runs/navit_photos

The label is which of the 18 bundled scikit-image photographs a frame is cut from (pans and
zooms at many scales and aspect ratios: 16–96 px, 1:3 to 3:1). Everything else is
configs/navit/digits.py.
"""

import ml_collections

from vdit import config_lib, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_lib.load_sibling(__file__, "digits.py", arg)
  c.input.dataset = "photo_pans"
  c.model.num_classes = datasets.num_classes("photo_pans")
  return c
