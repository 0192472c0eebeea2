"""The input pipeline: dataset -> per-example transforms -> packing -> host-local packed batches.

  source (tfds.data_source, random access)
    -> shuffle (global, reshuffled every epoch) -> repeat            [train only]
    -> per-example transforms (transforms.py; randomness seeded by the global example index)
    -> this host's share: ds[process_index::process_count]
    -> IterDataset -> first-fit / best-fit packing into rows of L tokens, ≤ K examples each
    -> batch B rows -> the packed-batch contract (DESIGN.md "The packed batch")

Every batch is a dict of numpy arrays (P = pt·ph·pw·3):

  patches [B, L, P] float32 in [-1, 1] (0 = padding)
  positions [B, L, 3] int32         (t, h, w) of the token in its own example's patch grid
  segment_ids [B, L] int32          1..K = example of the row, 0 = padding
  shapes [B, K, 3] int32            example k+1's patch grid (T', H', W'); 0 = empty slot
  text_tokens, text_segment_ids [B, M] int32
  labels [B, K] int32               -1 = empty slot / no label
  cond_mask [B, L] bool             all False here (frame conditioning is set downstream)
  loss_mask [B, L] bool             segment_ids > 0 and not cond_mask

The per-example transforms run before the host split, so example i of the global stream gets
the same clip whatever the number of hosts (the transforms are lazy: each host only computes
its own examples). The iterator of `make_iterator` is checkpointable: `get_state()` /
`set_state()` round-trip exactly.
"""

import grain
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_dict

from vdit import datasets
from vdit.data import tokenizer
from vdit.data import transforms as transforms_lib

PACKERS = {
  "first_fit": grain.experimental.FirstFitPackIterDataset,
  "best_fit": grain.experimental.BestFitPackIterDataset,
}


def default_input_config() -> ml_collections.ConfigDict:
  """Input-pipeline defaults (the `input` section of a training config)."""
  return ml_collections.ConfigDict(
    dict(
      dataset="shapes",  # a name in vdit.datasets.MODULES
      dataset_config="tiny",  # TFDS builder config
      data_dir=config_dict.placeholder(str),  # None -> vdit.datasets.default_data_dir()
      split="train",
      patch_size=(2, 4, 4),  # (pt, ph, pw) in frames / pixels
      tokens_per_row=1024,  # L
      rows_per_batch=4,  # B, on this host
      max_examples_per_row=8,  # K
      text_tokens_per_row=64,  # M
      max_caption_tokens=16,  # per example, including BOS
      vocab_size=1024,
      max_frames=16,  # per clip, after the stride
      frame_stride=1,
      max_tokens_per_example=512,  # larger examples are resized down (keeping aspect)
      packing="first_fit",  # "first_fit" | "best_fit"
      num_packing_bins=8,  # rows packed at once; more bins -> less padding, more latency
      read_threads=2,  # threads running the per-example transforms
      read_buffer=32,  # examples prefetched by those threads
      workers=0,  # > 0: run the whole pipeline in this many processes (grain mp_prefetch)
    )
  )


def check_input_config(c: ml_collections.ConfigDict) -> None:
  """Rejects configs the packer could not honour, naming the bad value and the bound."""
  if len(c.patch_size) != 3 or min(c.patch_size) < 1:
    raise ValueError(f"input.patch_size={tuple(c.patch_size)} must be three positive ints")
  if c.packing not in PACKERS:
    raise ValueError(f"input.packing={c.packing!r} is unknown; expected one of {list(PACKERS)}")
  for key in ("tokens_per_row", "rows_per_batch", "max_examples_per_row", "num_packing_bins"):
    if c[key] < 1:
      raise ValueError(f"input.{key}={c[key]} must be >= 1")
  if c.max_tokens_per_example > c.tokens_per_row:
    raise ValueError(
      f"input.max_tokens_per_example={c.max_tokens_per_example} exceeds "
      f"input.tokens_per_row={c.tokens_per_row}: an example must fit in one row"
    )
  temporal = max(1, c.max_frames // c.patch_size[0])
  if c.max_tokens_per_example < temporal:
    raise ValueError(
      f"input.max_tokens_per_example={c.max_tokens_per_example} is below the {temporal} "
      f"temporal patches of a {c.max_frames}-frame clip; expected >= {temporal}"
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


class PackedToBatch(grain.transforms.Map):
  """grain's packed features (`x`, `x_segment_ids`, ...) -> exactly the packed-batch contract.

  Also checks that the segment numbering agrees between video tokens, text tokens and the
  per-example slots, and pads a short last batch (evaluation) to B rows of padding.
  """

  def __init__(self, rows: int):
    self.rows = rows

  def map(self, packed: dict) -> dict:
    seg = packed["patches_segment_ids"]  # [b, L]
    batch = {
      "patches": packed["patches"].astype(np.float32),
      "positions": packed["positions"].astype(np.int32),
      "segment_ids": seg.astype(np.int32),
      "shapes": packed["shapes"].astype(np.int32),
      "text_tokens": packed["text_tokens"].astype(np.int32),
      "text_segment_ids": packed["text_tokens_segment_ids"].astype(np.int32),
      "labels": packed["labels"].astype(np.int32),
    }
    _check_segments(packed)
    missing = self.rows - seg.shape[0]
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


def _check_segments(packed: dict) -> None:
  """Every example k of a row has video tokens, text tokens, slot k-1, and N = T'·H'·W'."""
  seg = packed["patches_segment_ids"]  # [b, L]
  slots = packed["shapes_segment_ids"]  # [b, K]
  k = slots.shape[1]
  if not (
    np.array_equal(seg, packed["positions_segment_ids"])
    and np.array_equal(slots, np.where(slots > 0, np.arange(1, k + 1), 0))
    and np.array_equal(slots, packed["labels_segment_ids"])
  ):
    raise RuntimeError("packing numbered positions, shapes or labels unlike the patches")
  for row in range(seg.shape[0]):
    video_counts = np.bincount(seg[row], minlength=k + 1)[1:]
    has_text = np.bincount(packed["text_tokens_segment_ids"][row], minlength=k + 1)[1:] > 0
    grid_sizes = np.prod(packed["shapes"][row], axis=-1) * (slots[row] > 0)
    if not (np.array_equal(video_counts, grid_sizes) and np.array_equal(has_text, slots[row] > 0)):
      raise RuntimeError(
        f"packed row {row} is inconsistent: video tokens per segment {video_counts.tolist()}, "
        f"grid sizes {grid_sizes.tolist()}, segments with text {has_text.tolist()}"
      )


def _pack(ds: grain.IterDataset, c: ml_collections.ConfigDict, *, seed: int, train: bool):
  length, text, k = c.tokens_per_row, c.text_tokens_per_row, c.max_examples_per_row
  return PACKERS[c.packing](
    ds,
    length_struct={
      "patches": length,
      "positions": length,
      "text_tokens": text,
      "shapes": k,
      "labels": k,
    },
    padding_struct={
      "patches": 0.0,
      "positions": 0,
      "text_tokens": tokenizer.PAD_ID,
      "shapes": 0,
      "labels": -1,
    },
    num_packing_bins=c.num_packing_bins,
    max_sequences_per_bin=k,
    shuffle_bins=train,
    seed=seed,
  )


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
  c = input_config
  check_input_config(c)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  source = datasets.data_source(c.dataset, c.split, data_dir=c.data_dir, config=c.dataset_config)
  ds = grain.MapDataset.source(source).seed(seed)
  if train:
    ds = ds.shuffle().repeat()  # shuffle first: each epoch gets its own permutation
  for transform in transforms_lib.example_transforms(c, train=train):
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform)
    else:
      ds = ds.map(transform)
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=c.read_threads, prefetch_buffer_size=c.read_buffer)
  ds = ds.to_iter_dataset(read)
  ds = _pack(ds, c, seed=seed, train=train)
  ds = ds.batch(c.rows_per_batch, drop_remainder=train)
  ds = ds.map(PackedToBatch(c.rows_per_batch))
  if c.workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside `absl.app` use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.workers))
  return ds


def make_iterator(
  input_config: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  train: bool = True,
) -> grain.DatasetIterator:
  """A checkpointable iterator over `make_dataset(...)` (see `get_state` / `set_state`)."""
  ds = make_dataset(
    input_config, seed=seed, process_index=process_index, process_count=process_count, train=train
  )
  return iter(ds)
