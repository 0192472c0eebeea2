"""Fixed-size batches for the models that need one grid: ViT, ViViT, DiT and the autoencoder.

  the same example stream as `pipeline` (mixture, shuffle, repeat, host split)
    -> SampleClip (input.frame_stride, `input.size[0]` frames; random start in training)
    -> ToFloat -> FixedSize: centre crop to the target aspect ratio (`input.fit="crop"`; or
       keep the whole frame, "squash"; or the box around the frame's ink as an ink map, "ink",
       `vdit.data.ink_crop`), area resize to H × W, a short clip repeats its last frame up to T
    -> batch B rows (host-local) -> prefetch

Every batch is a dict of numpy arrays:

  video [B, T, H, W, 3] float32 in [-1, 1]  (T = 1 for images)
  label [B] int32                            -1 = no label (and the padding rows of evaluation)
  valid [B] bool                             False for the padding rows of the last eval batch

`input.size = (T, H, W)`. With fit="ink" the examples a dataset marks as holding two objects (a
`digits` field with a second digit ≥ 0: `moving_digits`; `num_objects` > 1: `shapes`) are
skipped, in training and evaluation: one box would hold both objects and the label names only
the first. The iterator is checkpointable like `pipeline.make_iterator`'s.
"""

import grain
import ml_collections
import numpy as np

from vdit.data import ink_crop, pipeline
from vdit.data import packing as packing_lib
from vdit.data import transforms as transforms_lib

FITS = ("crop", "squash", "ink")


class FixedSize(grain.transforms.Map):
  """Centre-crops to the aspect of (H, W) (or not: "squash"; or the ink box: "ink"), area-resizes
  to (H, W), pads T by the last frame."""

  def __init__(self, size, fit: str = "crop"):
    self.frames, self.height, self.width = (int(s) for s in size)
    self.fit = fit

  def map(self, element: dict) -> dict:
    video = element["video"]  # [t, h, w, C] float
    t, h, w, _ = video.shape
    target = self.width / self.height
    if self.fit == "ink":  # the ink map of the box around the ink, already H × W
      video = ink_crop.ink_crops(video, self.height, self.width)
    else:
      if self.fit == "crop" and w / h > target:  # too wide: crop the width
        cw = max(1, round(h * target))
        video = video[:, :, (w - cw) // 2 : (w - cw) // 2 + cw]
      elif self.fit == "crop":
        ch = max(1, round(w / target))
        video = video[:, (h - ch) // 2 : (h - ch) // 2 + ch]
      video = transforms_lib.area_resize(video, self.height, self.width)
    if t < self.frames:
      video = np.concatenate([video, np.repeat(video[-1:], self.frames - t, axis=0)])
    return {
      "video": video[: self.frames].astype(np.float32),
      "label": np.int32(element.get("label", -1)),
      "valid": np.bool_(True),
    }


def one_object(element: dict) -> bool:
  """False for an example with a second object (`digits[1] >= 0`, `num_objects > 1`), which
  fit="ink" skips."""
  digits = element.get("digits")
  if digits is not None and int(np.sum(np.asarray(digits) >= 0)) > 1:
    return False
  return int(element.get("num_objects", 1)) <= 1


class _PadBatch(grain.transforms.Map):
  """Pads a short last batch of evaluation to `rows` rows (label -1, valid False)."""

  def __init__(self, rows: int):
    self.rows = rows

  def map(self, batch: dict) -> dict:
    n = batch["label"].shape[0]
    if n == self.rows:
      return batch
    pad = lambda x: np.concatenate([x, np.zeros((self.rows - n, *x.shape[1:]), x.dtype)])
    out = {k: pad(v) for k, v in batch.items()}
    out["label"][n:] = -1
    return out


def check_size(c: ml_collections.ConfigDict) -> tuple[int, int, int]:
  size = c.get("size")
  if size is None or len(tuple(size)) != 3 or any(int(s) <= 0 for s in size):
    raise ValueError(f"input.size={size!r} must be (frames, height, width), positive ints")
  return tuple(int(s) for s in size)


def make_dataset(
  input_config: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  train: bool = True,
) -> grain.IterDataset:
  """Host-local fixed-size batches; infinite and shuffled if `train`, else one padded pass."""
  c = pipeline.resolve_input_config(input_config)
  size = check_size(c)
  packing_lib.single_threaded_blas()
  packing_lib.check_process(process_index, process_count)
  ds = pipeline.example_stream(c, seed=seed, train=train)
  if c.fit == "ink":
    ds = ds.filter(one_object)
  clip = transforms_lib.SampleClip(
    (1, 1, 1),
    size[0],
    c.frame_stride,
    random_start=train,
    min_frames=size[0],
    max_frame_stride=c.max_frame_stride if train else c.frame_stride,
  )
  ds = ds.random_map(clip).map(transforms_lib.ToFloat()).map(FixedSize(size, c.fit))
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=c.read_threads, prefetch_buffer_size=c.read_buffer)
  ds = ds.to_iter_dataset(read).batch(c.rows_per_batch, drop_remainder=train)
  if not train:
    ds = ds.map(_PadBatch(c.rows_per_batch))
  if c.prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=c.prefetch_batches)
  return ds


def make_iterator(input_config, **kwargs) -> grain.DatasetIterator:
  """A checkpointable iterator over `make_dataset(...)`."""
  return iter(make_dataset(input_config, **kwargs))
