"""The batch contract: every batch key's shape, dtype and logical axes, written once.

The packed batch is DESIGN.md's one data contract (`vdit.data.pipeline` builds it); the dense
keys are the fixed-size batches of `vdit.data.dense`. `sharding` places batches by these axes,
the tasks name their keys from here, and `tools/aot` builds abstract batches from the shapes.
Shapes use STYLE.md's letters: B rows, L packed length, K examples per row, M text length,
P patch vector size, D caption-embedding width, T/H/W/C a dense video's frames, height,
width and channels; numbers are fixed sizes.
"""

import dataclasses

import numpy as np

from vdit.axes import BATCH, LENGTH, TEXT_LENGTH
from vdit.data import tokenizer


@dataclasses.dataclass(frozen=True)
class Field:
  shape: tuple[str | int, ...]  # shape letters (above) or fixed sizes
  dtype: type  # numpy dtype of the host arrays
  axes: tuple[str | None, ...]  # logical axes, one per dimension
  pad: int = 0  # the value of padding (rows, slots, tokens): 0 / False, −1 for a "no label"


PACKED: dict[str, Field] = {
  "patches": Field(("B", "L", "P"), np.float32, (BATCH, LENGTH, None)),
  "positions": Field(("B", "L", 3), np.int32, (BATCH, LENGTH, None)),
  "segment_ids": Field(("B", "L"), np.int32, (BATCH, LENGTH)),
  "shapes": Field(("B", "K", 3), np.int32, (BATCH, None, None)),
  "text_tokens": Field(("B", "M"), np.int32, (BATCH, TEXT_LENGTH), pad=tokenizer.PAD_ID),
  "text_segment_ids": Field(("B", "M"), np.int32, (BATCH, TEXT_LENGTH)),
  "labels": Field(("B", "K"), np.int32, (BATCH, None), pad=-1),
  "cond_mask": Field(("B", "L"), np.bool_, (BATCH, LENGTH)),
  "loss_mask": Field(("B", "L"), np.bool_, (BATCH, LENGTH)),
}
PACKED_KEYS = tuple(PACKED)

# Precomputed caption embeddings (`input.text_embeddings`), aligned with `text_tokens`.
TEXT_EMBEDDINGS = Field(("B", "M", "D"), np.float32, (BATCH, TEXT_LENGTH, None))

# Fixed-size batches (`vdit.data.dense`): video [B, T, H, W, C].
DENSE: dict[str, Field] = {
  "video": Field(("B", "T", "H", "W", "C"), np.float32, (BATCH, None, None, None, None)),
  "label": Field(("B",), np.int32, (BATCH,), pad=-1),
  "valid": Field(("B",), np.bool_, (BATCH,)),
}
DENSE_KEYS = tuple(DENSE)

FIELDS: dict[str, Field] = {**PACKED, **DENSE, "text_embeddings": TEXT_EMBEDDINGS}


def shape(key: str, sizes: dict[str, int]) -> tuple[int, ...]:
  """The concrete shape of `key`, its letters looked up in `sizes` (e.g. {"B": 8, "L": 1024})."""
  return tuple(d if isinstance(d, int) else sizes[d] for d in FIELDS[key].shape)


def padding(keys, sizes: dict[str, int], rows: int | None = None) -> dict[str, np.ndarray]:
  """Arrays of `keys` that are all padding (each field's `pad`), their letters looked up in
  `sizes`; `rows=None`: one row (the "B" dimension dropped), as the packer fills it."""
  out = {}
  for key in keys:
    dims = shape(key, {**sizes, "B": rows or 1})
    out[key] = np.full(dims[1:] if rows is None else dims, FIELDS[key].pad, FIELDS[key].dtype)
  return out


def padding_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A batch of `batch`'s shapes that is all padding: no example, no label, no loss token."""
  return {k: np.full_like(v, FIELDS[k].pad) for k, v in batch.items()}
