"""The input pipeline: datasets -> per-example transforms -> packing -> host-local packed batches.

  sources (tfds.data_source, random access; one per `input.mixture` entry)
    -> per source: shuffle (reshuffled every epoch) -> repeat           [train only]
    -> weighted mix (grain MapDataset.mix; labels offset per dataset)   [eval: concatenation]
    -> per-example transforms (transforms.py; randomness seeded by the global example index)
    -> this host's share (examples process_index + process_count·k), packed into rows of L
       tokens, ≤ K examples each by the pool best-fit packer (packing.py)
    -> batch B rows -> the packed-batch contract (DESIGN.md "The packed batch")
    -> prefetch: a thread (workers = 0) or grain multiprocessing workers (workers > 0)

Every batch is a dict of numpy arrays (P = pt·ph·pw·C, C = input.channels):

  patches [B, L, P] float32 in [-1, 1] (0 = padding)
  positions [B, L, 3] int32         (t, h, w) of the token in its own example's patch grid
  segment_ids [B, L] int32          1..K = example of the row, 0 = padding
  shapes [B, K, 3] int32            example k+1's full patch grid (T', H', W'); 0 = empty slot
  text_tokens, text_segment_ids [B, M] int32
  labels [B, K] int32               -1 = empty slot / no label
  cond_mask [B, L] bool             all False here (frame conditioning is set downstream)
  loss_mask [B, L] bool             segment_ids > 0 and not cond_mask

With token dropping an example has fewer tokens than T'·H'·W'; its positions are the kept ones.
The per-example transforms run before the host split, so example i of the global stream gets
the same clip whatever the number of hosts (the transforms are lazy: each host only computes its
own examples). The iterator of `make_iterator` is checkpointable: `get_state()` / `set_state()`
round-trip exactly. Its state is the packer's (batching and prefetching add nothing to it), so
`packing.remap_state` turns the states of a run on n hosts into those of m hosts (docs/data.md,
"Changing the number of hosts"; with `workers > 0` the state is grain's, per worker, and is not
remapped).
"""

import grain
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_dict

from vdit import datasets
from vdit.data import packing as packing_lib
from vdit.data import tokenizer
from vdit.data import transforms as transforms_lib

# Keys the input config no longer has -> the value that meant what vdit does now. Configs saved
# with that value (old workdirs' config.json) still resolve; any other value is an error.
REMOVED_KEYS = {"packing": "best_fit"}  # one packer since issue 17: the pool (packing.py)


def default_input_config() -> ml_collections.ConfigDict:
  """Input-pipeline defaults (the `input` section of a training config)."""
  return ml_collections.ConfigDict(
    dict(
      dataset="shapes",  # a name in vdit.datasets.SOURCES (used when `mixture` is empty)
      dataset_config="tiny",  # TFDS builder config (for folder datasets: the folder's path)
      mixture=(),  # ((dataset, dataset_config, weight), ...); () = just `dataset`
      data_dir=config_dict.placeholder(str),  # None -> vdit.datasets.default_data_dir()
      split="train",
      patch_size=(2, 4, 4),  # (pt, ph, pw) in frames / pixels (latent units for latents)
      channels=3,  # C of the video: 3 for pixels, the autoencoder's Z for latents
      tokens_per_row=1024,  # L
      rows_per_batch=4,  # B, on this host
      max_examples_per_row=8,  # K
      text_tokens_per_row=64,  # M
      max_caption_tokens=16,  # per example, including BOS
      vocab_size=1024,
      text_embeddings="",  # a caption-embedding table (vdit.data.caption_table); "": token ids
      max_frames=16,  # per clip, after the stride
      min_frames=config_dict.placeholder(int),  # duration in [min, max_frames]; None = max
      frame_stride=1,
      max_frame_stride=config_dict.placeholder(int),  # stride in [frame_stride, this]; None = same
      # Each clip is up to max_frames frames spread evenly over the whole video (video
      # captioners' sampling: a clip's speed over its duration is visible), not a window of it.
      whole_clip=False,
      max_tokens_per_example=512,  # larger examples are resized down (keeping aspect)
      min_tokens_per_example=config_dict.placeholder(int),  # budget in [min, max]; None = max
      token_drop=(0.0, 0.0),  # (min, max) fraction of tokens dropped per example in training
      num_packing_bins=16,  # open rows of the packer's pool; more -> less padding
      shrink_to_fill=0.0,  # shrink an example by ≤ this fraction to fill a row's gap
      read_threads=2,  # threads running the per-example transforms
      read_buffer=32,  # examples prefetched by those threads
      prefetch_batches=2,  # batches prepared ahead in a background thread (workers = 0)
      workers=0,  # > 0: run the whole pipeline in this many processes (grain mp_prefetch)
      size=config_dict.placeholder(tuple),  # (T, H, W) of fixed-size batches (`dense.py`)
      # Fixed-size batches: "crop" (centre, keep aspect) | "squash" (whole frame) | "ink" (the
      # box around the frame's ink as an ink map, `vdit.data.ink_crop`; the digits classifier).
      fit="crop",
    )
  )


def resolve_input_config(input_config) -> ml_collections.ConfigDict:
  """The defaults overridden by `input_config`; keys the pipeline does not know are errors."""
  c = default_input_config()
  given = input_config.to_dict() if hasattr(input_config, "to_dict") else dict(input_config)
  for key, meant in REMOVED_KEYS.items():
    if key in given and given.pop(key) != meant:
      raise ValueError(
        f"input.{key}={input_config[key]!r} was removed: vdit packs with the pool best fit "
        f"only (what {key}={meant!r} meant); delete the key"
      )
  unknown = sorted(set(given) - set(c))
  if unknown:
    raise ValueError(f"unknown input config keys {unknown}; expected a subset of {sorted(c)}")
  for key, value in given.items():
    try:
      c[key] = tuple(value) if isinstance(value, list) else value
    except TypeError:
      raise ValueError(
        f"input.{key}={value!r} must be of type {c.get_type(key).__name__}"
      ) from None
  # Absent (None) range ends follow the other end: an older config keeps its fixed behaviour.
  for free, fixed in (
    ("min_tokens_per_example", "max_tokens_per_example"),
    ("min_frames", "max_frames"),
    ("max_frame_stride", "frame_stride"),
  ):
    if c[free] is None:
      c[free] = c[fixed]
  return c


def components(c: ml_collections.ConfigDict) -> list[tuple[str, str | None, float]]:
  """(dataset, dataset_config, weight) of every dataset the pipeline reads."""
  if not c.mixture:
    return [(c.dataset, c.dataset_config, 1.0)]
  out = []
  for entry in c.mixture:
    if len(entry) != 3 or not isinstance(entry[0], str) or not float(entry[2]) > 0:
      raise ValueError(
        f"input.mixture entry {entry!r} must be (dataset, dataset_config, weight > 0)"
      )
    out.append((entry[0], entry[1], float(entry[2])))
  return out


def check_input_config(c: ml_collections.ConfigDict) -> None:
  """Rejects configs the pipeline could not honour, naming the bad value and the bound."""
  if len(c.patch_size) != 3 or min(c.patch_size) < 1:
    raise ValueError(f"input.patch_size={tuple(c.patch_size)} must be three positive ints")
  if c.channels < 1:
    raise ValueError(f"input.channels={c.channels} must be >= 1")
  for key in ("tokens_per_row", "rows_per_batch", "max_examples_per_row", "num_packing_bins"):
    if c[key] < 1:
      raise ValueError(f"input.{key}={c[key]} must be >= 1")
  if c.max_tokens_per_example > c.tokens_per_row:
    raise ValueError(
      f"input.max_tokens_per_example={c.max_tokens_per_example} exceeds "
      f"input.tokens_per_row={c.tokens_per_row}: an example must fit in one row"
    )
  temporal = max(1, c.max_frames // c.patch_size[0])
  for key in ("max_tokens_per_example", "min_tokens_per_example"):
    if c[key] < temporal:
      raise ValueError(
        f"input.{key}={c[key]} is below the {temporal} temporal patches of a "
        f"{c.max_frames}-frame clip; expected >= {temporal}"
      )
  if c.min_tokens_per_example > c.max_tokens_per_example:
    raise ValueError(
      f"input.min_tokens_per_example={c.min_tokens_per_example} exceeds "
      f"input.max_tokens_per_example={c.max_tokens_per_example}"
    )
  if not 1 <= c.max_caption_tokens <= c.text_tokens_per_row:
    raise ValueError(
      f"input.max_caption_tokens={c.max_caption_tokens} must be in "
      f"[1, input.text_tokens_per_row={c.text_tokens_per_row}]"
    )
  if c.vocab_size <= tokenizer.NUM_FIXED_IDS:
    raise ValueError(f"input.vocab_size={c.vocab_size} must be > {tokenizer.NUM_FIXED_IDS}")
  if c.frame_stride < 1 or c.max_frames < 1:
    raise ValueError(f"input.frame_stride={c.frame_stride}, max_frames={c.max_frames} must be >= 1")
  if not 1 <= c.min_frames <= c.max_frames:
    raise ValueError(f"input.min_frames={c.min_frames} must be in [1, max_frames={c.max_frames}]")
  if c.max_frame_stride < c.frame_stride:
    raise ValueError(
      f"input.max_frame_stride={c.max_frame_stride} is below frame_stride={c.frame_stride}"
    )
  drop = tuple(c.token_drop)
  if len(drop) != 2 or not 0.0 <= drop[0] <= drop[1] < 1.0:
    raise ValueError(f"input.token_drop={drop} must be (min, max) with 0 <= min <= max < 1")
  if not 0.0 <= c.shrink_to_fill < 1.0:
    raise ValueError(f"input.shrink_to_fill={c.shrink_to_fill} must be in [0, 1)")
  for key in ("read_threads", "read_buffer", "prefetch_batches", "workers"):
    if c[key] < 0:
      raise ValueError(f"input.{key}={c[key]} must be >= 0")
  if c.max_frames < c.patch_size[0]:
    raise ValueError(
      f"input.max_frames={c.max_frames} is below the temporal patch pt={c.patch_size[0]}: every "
      f"clip would be a still; expected max_frames >= {c.patch_size[0]}"
    )
  for name, dataset_config, _ in components(c):
    if name not in datasets.SOURCES:
      raise ValueError(f"dataset={name!r} is unknown; expected one of {sorted(datasets.SOURCES)}")
    datasets.check_config(name, dataset_config)


class FinalizeBatch(grain.transforms.Map):
  """Stacked rows -> the packed-batch contract: pads a short last batch (evaluation) to B rows,
  adds `cond_mask` / `loss_mask`, and checks that every example has text and ≤ T'·H'·W' tokens.
  """

  def __init__(self, rows: int):
    self.rows = rows

  def map(self, rows: dict) -> dict:
    batch = dict(rows)
    _check_segments(batch)
    missing = self.rows - batch["segment_ids"].shape[0]
    if missing > 0:
      batch = {
        k: np.concatenate(
          [v, np.full((missing, *v.shape[1:]), -1 if k == "labels" else 0, v.dtype)]
        )
        for k, v in batch.items()
      }
    batch["cond_mask"] = np.zeros(batch["segment_ids"].shape, bool)
    batch["loss_mask"] = (batch["segment_ids"] > 0) & ~batch["cond_mask"]
    return batch


def _check_segments(batch: dict) -> None:
  seg, text_seg, shapes = batch["segment_ids"], batch["text_segment_ids"], batch["shapes"]
  k = shapes.shape[1]
  for row in range(seg.shape[0]):
    used = shapes[row, :, 0] > 0  # [K]
    counts = np.bincount(seg[row], minlength=k + 1)[1:]
    has_text = np.bincount(text_seg[row], minlength=k + 1)[1:] > 0
    grid = np.prod(shapes[row], axis=-1)
    if not (
      np.array_equal(counts > 0, used) and np.array_equal(has_text, used) and (counts <= grid).all()
    ):
      raise RuntimeError(
        f"packed row {row} is inconsistent: video tokens per segment {counts.tolist()}, "
        f"grid sizes {grid.tolist()}, segments with text {has_text.tolist()}"
      )


class _OffsetLabel(grain.transforms.Map):
  """Shifts labels ≥ 0 by `offset` (datasets of a mixture get disjoint label ranges)."""

  def __init__(self, offset: int):
    self.offset = offset

  def map(self, element: dict) -> dict:
    label = int(element.get("label", -1))
    return {**element, "label": np.int32(label + self.offset if label >= 0 else -1)}


def _examples(c, *, seed: int, train: bool) -> grain.MapDataset:
  """The global stream of raw examples: the (weighted) mixture of the datasets."""
  parts, weights, offset = [], [], 0
  for i, (name, config, weight) in enumerate(components(c)):
    source = datasets.data_source(name, c.split, data_dir=c.data_dir, config=config)
    ds = grain.MapDataset.source(source)
    if len(components(c)) > 1:
      ds = ds.map(_OffsetLabel(offset))
      offset += datasets.num_classes(name)
    if train:
      ds = ds.seed(seed + 1000 * i).shuffle().repeat()  # each epoch gets its own permutation
    parts.append(ds)
    weights.append(weight)
  if len(parts) == 1:
    return parts[0]
  if train:
    return grain.MapDataset.mix(parts, weights)
  return grain.MapDataset.concatenate(parts)


def example_stream(c: ml_collections.ConfigDict, *, seed: int, train: bool) -> grain.MapDataset:
  """The global stream of raw examples, seeded for per-example randomness (also `dense.py`)."""
  return _examples(c, seed=seed, train=train).seed(seed)


def packable_examples(c: ml_collections.ConfigDict, *, seed: int, train: bool) -> grain.MapDataset:
  """The global stream of packable examples (before the host split and packing)."""
  ds = example_stream(c, seed=seed, train=train)
  for transform in transforms_lib.example_transforms(c, train=train):
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform)
    else:
      ds = ds.map(transform)
  return ds


def make_dataset(
  input_config: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  train: bool = True,
) -> grain.IterDataset:
  """Host-local packed batches; infinite and shuffled if `train`, else one ordered pass.

  In the single pass (`train=False`) every example of this host's share appears exactly once and
  a short last batch is padded to `rows_per_batch` rows of padding. Hosts may then see different
  numbers of batches; multi-host evaluation has to agree on a count.
  """
  c = resolve_input_config(input_config)
  check_input_config(c)
  packing_lib.single_threaded_blas()
  packing_lib.check_process(process_index, process_count)
  ds = packing_lib.PoolPackIterDataset(  # reads this host's share: every process_count-th
    packable_examples(c, seed=seed, train=train),
    patch_size=c.patch_size,
    tokens_per_row=c.tokens_per_row,
    text_tokens_per_row=c.text_tokens_per_row,
    max_examples_per_row=c.max_examples_per_row,
    num_bins=c.num_packing_bins,
    shrink_to_fill=c.shrink_to_fill if train else 0.0,
    read_threads=c.read_threads,
    read_buffer=c.read_buffer,
    shard=(process_index, process_count),
  )
  ds = ds.batch(c.rows_per_batch, drop_remainder=train)
  ds = ds.map(FinalizeBatch(c.rows_per_batch))
  if c.workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside `absl.app` use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.workers))
  elif c.prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=c.prefetch_batches)
  return ds


def make_iterator(input_config: ml_collections.ConfigDict, **kwargs) -> grain.DatasetIterator:
  """A checkpointable iterator over `make_dataset(input_config, **kwargs)` (see `get_state` /
  `set_state`)."""
  return iter(make_dataset(input_config, **kwargs))
