r"""ViViT video classifier on fixed-size clips of a bundled dataset.

  python -m vdit.main --config=configs/vivit/video.py:tiny --workdir=runs/vivit_photos
  ... :tiny,variant=spatio_temporal   (or factorised_self_attention, factorised_dot_product)
  ... :tiny,dataset=shapes            (label: the first object's shape; the `frechet` features)

Default `photo_pans`: the label is which of the 18 photographs a pan / zoom / still is cut from.
Clips are 8 frames resized (squashed) to 32×32, cut into 2×4×4 tubelets (256 tokens).

`shapes` reads the box around the object instead (`input.fit="ink"`, `vdit.data.ink_crop`, as
`configs/vit/digit_crops.py`): per frame, the object's opacity map, colour-, position- and
scale-free, at 16×16 (tiny; the objects of the tiny canvases are about that size). On the whole
squashed 32×32 RGB frame the tiny model stayed at chance (36-38% top-1 at 300-1,080 steps, train
loss at ln 3 throughout): which pixels are object depends on the colour pair, which varies. On
the ink crop it reaches 100% top-1 in 300 steps (docs/recipe.md). The features therefore see the
object's silhouette over time, not its colour, position or the background.
"""

import ml_collections

from vdit import config_lib, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, variant="factorised_encoder", dataset="photo_pans")
  tiny = arg.tiny
  ink = arg.dataset == "shapes"
  c = config_lib.classifier_config(
    tiny=tiny,
    total_steps=400 if tiny else 30_000,
    lr=1e-3 if tiny else 1e-4,
    warmup_steps=50 if tiny else 2_500,
  )
  c.input = dict(
    dataset=arg.dataset,
    dataset_config="tiny" if tiny else "default",
    size=((8, 16, 16) if ink else (8, 32, 32)) if tiny else (32, 224, 224),
    frame_stride=1,
    # The whole frame (clips are 1:3 to 3:1; a centre crop can lose the object), or the object.
    fit="ink" if ink else "squash",
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
