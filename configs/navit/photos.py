r"""NaViT photo classifier on `photo_pans` frames at their native size and aspect ratio.

  python -m vdit.main --config=configs/navit/photos.py:tiny --workdir=runs/navit_photos

The label is which of the 18 bundled scikit-image photographs a frame is cut from (pans and
zooms at many scales and aspect ratios: 16–96 px, 1:3 to 3:1). Everything else is
configs/navit/digits.py.
"""

import importlib.util
import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")
  spec = importlib.util.spec_from_file_location("vdit_config_navit_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.input.dataset = "photo_pans"
  c.model.num_classes = 18
  return c
