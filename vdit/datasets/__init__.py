"""Dataset builders and random-access sources (by name); `vdit.data` is the pipeline reading them.

TFDS builders of the bundled datasets (procedural or from files shipped with packages).

Each dataset module defines `build(data_dir, config)` (idempotent) and
`data_source(split, data_dir, config)` (random access, ArrayRecord); `building.py` holds what
they share. `data_source` below looks a dataset up by name, so the input pipeline stays
independent of the datasets. Every source yields at least `video` uint8 [T, H, W, 3],
`caption` and `label` (-1 = none); `latents` yields float32 autoencoder latents [T', H', W', Z]
as its `video` instead.
"""

import importlib
import os

# Dataset name -> "module:function" returning the random-access source of a split; the module is
# imported only when the dataset is used (TFDS is heavy). `num_classes` of a dataset is the
# module's NUM_CLASSES (0 if it has no labels).
SOURCES = {
  "shapes": "vdit.datasets.shapes:data_source",
  "moving_digits": "vdit.datasets.moving_digits:data_source",
  "photo_pans": "vdit.datasets.photo_pans:data_source",
  "folder": "vdit.datasets.folder:data_source",  # dataset_config = the folder's path
  "folder_raw": "vdit.datasets.folder:raw_source",  # same, decoded on the fly (no TFDS)
  "latents": "vdit.datasets.latents:data_source",  # dataset_config = encode_latents' --out
}
DEFAULT_CONFIGS = {"folder": None, "folder_raw": None, "latents": None}  # others: "tiny"


def default_data_dir() -> str:
  """`$VDIT_DATA_DIR`, else `~/.cache/vdit/tensorflow_datasets`."""
  return os.environ.get(
    "VDIT_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vdit", "tensorflow_datasets")
  )


def _resolve(name: str):
  if name not in SOURCES:
    raise ValueError(f"dataset={name!r} is unknown; expected one of {sorted(SOURCES)}")
  module, function = SOURCES[name].split(":")
  return importlib.import_module(module), function


def data_source(name: str, split: str, *, data_dir: str | None = None, config: str | None = None):
  """Builds dataset `name` if needed and returns the random-access source of `split`."""
  module, function = _resolve(name)
  if config is None and name in DEFAULT_CONFIGS:
    raise ValueError(f"dataset={name!r} needs dataset_config=<path of the folder>")
  kwargs = {} if config is None else {"config": config}
  return getattr(module, function)(split, data_dir or default_data_dir(), **kwargs)


def check_config(name: str, config: str | None) -> None:
  """ValueError naming a `dataset_config` that dataset `name` cannot read, before any compute:
  a variant it does not have, or (folder, latents) a directory that does not exist."""
  module, _ = _resolve(name)
  if name in DEFAULT_CONFIGS:
    if not config:
      raise ValueError(f"dataset={name!r} needs dataset_config=<path of the directory>")
    from etils import epath  # noqa: PLC0415 (only for path datasets)

    if not epath.Path(config).is_dir():
      raise ValueError(f"dataset={name!r} dataset_config={config!r} is not a directory")
    return
  names = getattr(module, "CONFIG_NAMES", None)
  if config is not None and names is not None and config not in names:
    raise ValueError(
      f"dataset={name!r} dataset_config={config!r} is unknown; expected one of {list(names)}"
    )


def num_classes(name: str) -> int:
  """How many label values dataset `name` uses (0: no labels)."""
  module, _ = _resolve(name)
  return int(getattr(module, "NUM_CLASSES", 0))
