"""What every bundled TFDS builder shares: features, an inter-process build lock, idempotent
`build`, random-access `data_source`.

A builder module (shapes.py, moving_digits.py, ...) defines a `Builder` (a TFDS
`GeneratorBasedBuilder`) with `BUILDER_CONFIGS` (a procedural one: a `ProceduralBuilder` over its
`generate` function) and its module interface from these helpers: `CONFIG_NAMES, build,
data_source = interface(Builder)`. Examples are written once as ArrayRecord under `data_dir` and
read with random access (`as_data_source`, what `tfds.data_source` returns): no TensorFlow in the
reader.

Every dataset stores at least `video` uint8 [T, H, W, 3] (an image is a 1-frame video), `caption`
(text) and `label` (int, -1 = none), so a pipeline can mix them.
"""

import contextlib
import fcntl
import functools
import inspect
import os
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
import threadpoolctl
from etils import epath

from vdit import datasets

# The eight compass motions of the procedural datasets: name -> unit (dx, dy) in image coordinates
# (y grows downwards). Generators draw from this order and store indices into it: append only.
DIRECTIONS = {
  "left": (-1, 0),
  "right": (1, 0),
  "up": (0, -1),
  "down": (0, 1),
  "up-left": (-1, -1),
  "up-right": (1, -1),
  "down-left": (-1, 1),
  "down-right": (1, 1),
}


def video_feature() -> tfds.features.Tensor:
  """uint8 [T, H, W, 3], zlib-compressed (procedural videos compress 10-50x)."""
  return tfds.features.Tensor(
    shape=(None, None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
  )


def int_feature() -> tfds.features.Scalar:
  return tfds.features.Scalar(dtype=np.int32)


def info(builder, description: str, label, **features) -> tfds.core.DatasetInfo:
  """The DatasetInfo of a bundled builder: `video`, `caption`, `label` (its feature) and the
  builder's own `features`, in that order."""
  return tfds.core.DatasetInfo(
    builder=builder,
    description=description,
    features=tfds.features.FeaturesDict(
      {"video": video_feature(), "caption": tfds.features.Text(), "label": label, **features}
    ),
  )


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A bundled builder: its `code_path` is its own file."""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # TFDS derives `code_path` from package resources, which needs the `importlib_resources`
    # backport for packages installed in development mode; the builder's own file is all it is
    # used for.
    cls.code_path = epath.Path(inspect.getfile(cls))


class ProceduralBuilder(Builder, skip_registration=True):
  """A builder whose examples are made from (config, split, index) alone, nothing downloaded:
  the subclass's `generate(config, split, index)` (the module's function, set as
  `generate = staticmethod(generate)`), for `index` below its config's `train_size` /
  `validation_size`, keyed by index."""

  generate: Callable[..., dict]  # (builder config, split, index) -> the example as stored
  DEFAULT_CONFIG_NAME = "tiny"

  def _split_generators(self, dl_manager):
    del dl_manager  # procedural: nothing to download
    cfg = self.builder_config
    return {
      "train": self._generate_examples("train", cfg.train_size),
      "validation": self._generate_examples("validation", cfg.validation_size),
    }

  def _generate_examples(self, split: str, size: int):
    for index in range(size):
      yield index, self.generate(self.builder_config, split, index)


def config_names(builder_cls) -> tuple[str, ...]:
  """The names of `builder_cls.BUILDER_CONFIGS`: a dataset module's valid `dataset_config`s."""
  return tuple(c.name for c in builder_cls.BUILDER_CONFIGS)


def make_builder(builder_cls, data_dir: str | None, config):
  """`builder_cls` for `config` (a name in BUILDER_CONFIGS, or a BuilderConfig instance)."""
  if isinstance(config, str):
    names = list(config_names(builder_cls))
    if config not in names:
      raise ValueError(f"{builder_cls.name} config={config!r} is unknown; expected one of {names}")
  data_dir = data_dir or datasets.default_data_dir()
  return builder_cls(config=config, data_dir=data_dir, file_format="array_record")


@contextlib.contextmanager
def lock(data_dir: str, name: str):
  """Inter-process lock so parallel test workers / processes build a dataset once."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build(builder_cls, data_dir: str | None = None, config="tiny") -> None:
  """Generates and writes the dataset unless it is already there (cheap to call again)."""
  data_dir = data_dir or datasets.default_data_dir()
  if make_builder(builder_cls, data_dir, config).is_prepared():
    return
  with lock(data_dir, builder_cls.name):
    builder = make_builder(builder_cls, data_dir, config)  # re-check: another process built it?
    if not builder.is_prepared():
      # Rendering is many small matmuls: OpenBLAS threads fighting for cores make them ~6× slower.
      with threadpoolctl.threadpool_limits(1, user_api="blas"):
        builder.download_and_prepare()


def data_source(builder_cls, split: str, data_dir: str | None = None, config="tiny"):
  """Random-access source of one split (built first if needed); `len()` and `[i]` work."""
  splits = ("train", "validation")
  if split not in splits:
    raise ValueError(f"split={split!r} is unknown; expected one of {splits}")
  build(builder_cls, data_dir, config)
  return make_builder(builder_cls, data_dir, config).as_data_source(split)


def interface(builder_cls) -> tuple[tuple[str, ...], Callable[..., None], Callable]:
  """What `vdit.datasets` looks up in a builder module: the valid `dataset_config`s,
  `build(data_dir=None, config="tiny")` (idempotent) and `data_source(split, data_dir=None,
  config="tiny")` (built first if needed)."""
  return (
    config_names(builder_cls),
    functools.partial(build, builder_cls),
    functools.partial(data_source, builder_cls),
  )


def canvas_size(rng: np.random.Generator, config) -> tuple[int, int]:
  """(height, width) in px: sides from `config.min_size` to `max_size` in steps of
  `size_multiple`, aspect ratio within [1/max_aspect, max_aspect]."""
  sides = np.arange(config.min_size, config.max_size + 1, config.size_multiple)
  while True:  # rejection sampling keeps the aspect distribution symmetric
    height, width = (int(s) for s in rng.choice(sides, size=2))
    if max(height / width, width / height) <= config.max_aspect:
      return height, width


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split`: independent of every other example."""
  return np.random.default_rng((seed, ("train", "validation").index(split), index))
