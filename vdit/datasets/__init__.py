"""TFDS builders of the bundled datasets (procedural or from files shipped with packages).

Each dataset module defines `build(data_dir, config)` (idempotent) and
`data_source(split, data_dir, config)` (random access, ArrayRecord). `data_source` below looks
a module up by dataset name, so the input pipeline stays independent of the datasets.
"""

import importlib
import os

# Dataset name -> module; the module is imported only when the dataset is used (TFDS is heavy).
MODULES = {"shapes": "vdit.datasets.shapes"}


def default_data_dir() -> str:
  """`$VDIT_DATA_DIR`, else `~/.cache/vdit/tensorflow_datasets`."""
  return os.environ.get(
    "VDIT_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vdit", "tensorflow_datasets")
  )


def data_source(name: str, split: str, *, data_dir: str | None = None, config: str | None = None):
  """Builds dataset `name` if needed and returns the random-access source of `split`."""
  if name not in MODULES:
    raise ValueError(f"dataset={name!r} is unknown; expected one of {sorted(MODULES)}")
  module = importlib.import_module(MODULES[name])
  kwargs = {} if config is None else {"config": config}
  return module.data_source(split, data_dir or default_data_dir(), **kwargs)
