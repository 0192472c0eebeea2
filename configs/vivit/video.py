r"""ViViT video classifier on fixed-size clips of a bundled dataset.

  python -m vdit.main --config=configs/vivit/video.py:tiny --workdir=runs/vivit_photos
  ... :tiny,variant=spatio_temporal   (or factorised_self_attention, factorised_dot_product)
  ... :tiny,dataset=shapes            (label: the first object's shape)

Default `photo_pans`: the label is which of the 18 photographs a pan / zoom / still is cut from.

Clips are 8 frames resized (squashed) to 32×32, cut into 2×4×4 tubelets (256 tokens).
"""

import ml_collections

from vdit import config_lib, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, variant="factorised_encoder", dataset="photo_pans")
  tiny = arg.tiny
  c = config_lib.classifier_config(
    tiny=tiny,
    total_steps=400 if tiny else 30_000,
    lr=1e-3 if tiny else 1e-4,
    warmup_steps=50 if tiny else 2_500,
  )
  c.input = dict(
    dataset=arg.dataset,
    dataset_config="tiny" if tiny else "default",
    size=(8, 32, 32) if tiny else (32, 224, 224),
    frame_stride=1,
    fit="squash",  # the whole frame (clips are 1:3 to 3:1; a centre crop can lose the object)
    rows_per_batch=16 if tiny else 256,
  )
  c.model = dict(
    name="vivit",
    variant=arg.variant,  # spatio_temporal | factorised_encoder | ... (vivit.VIVIT_VARIANTS)
    num_classes=datasets.num_classes(arg.dataset),
    tubelet=(2, 4, 4) if tiny else (2, 16, 16),
    width=64 if tiny else 768,
    depth=3 if tiny else 12,  # the spatial depth for factorised_encoder
    temporal_depth=1 if tiny else 4,
    num_heads=4 if tiny else 12,
    **config_lib.RUNTIME,
  )
  return c
