"""Packing: the best-fit pool packer, exact resume, mixtures, and isolation through the model."""

import collections

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit import models
from vdit.data import packing, pipeline
from vdit.data import transforms as transforms_lib
from vdit.datasets import moving_digits, photo_pans, shapes

PATCH = (2, 4, 4)


def _packable(index: int) -> dict:
  """A synthetic packable example whose label is its index and pixels encode it."""
  rng = np.random.default_rng(index)
  t = 2 * int(rng.integers(1, 5))
  h, w = (4 * int(x) for x in rng.integers(1, 9, size=2))
  video = np.full((t, h, w, 3), (index % 200) / 100 - 1, np.float32)
  video[..., 1] = rng.uniform(-1, 1, size=(t, h, w))
  return {
    "video": video,
    "text_tokens": np.arange(1, 2 + index % 5, dtype=np.int32),
    "label": np.int32(index),
    "drop_rate": np.float32(0.3 if index % 4 == 0 else 0.0),
    "seed": np.int64(index),
  }


def _pool(size=None, **kwargs):
  source = grain.MapDataset.range(size or 10**9).map(_packable)
  args = dict(
    patch_size=PATCH,
    tokens_per_row=256,
    text_tokens_per_row=24,
    max_examples_per_row=6,
    num_bins=8,
    read_threads=0,
  )
  args.update(kwargs)
  return packing.PoolPackIterDataset(source, **args)


def _row_examples(row):
  """(label, grid, number of tokens) of every example of a row, checking the row's structure."""
  out = []
  for k, label in enumerate(row["labels"]):
    if label < 0:
      assert not (row["segment_ids"] == k + 1).any() and not row["shapes"][k].any()
      continue
    tokens = row["segment_ids"] == k + 1
    assert tokens.any() and (row["text_segment_ids"] == k + 1).any()
    out.append((int(label), tuple(row["shapes"][k].tolist()), int(tokens.sum())))
  assert (row["segment_ids"][: sum(n for *_, n in out)] > 0).all()  # examples first, then padding
  return out


@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_pool_packs_every_example_once_within_bounds(shrink):
  rows = list(_pool(size=150, shrink_to_fill=shrink))
  seen = collections.Counter()
  for row in rows:
    examples = _row_examples(row)
    assert len(examples) <= 6 and (row["text_segment_ids"] > 0).sum() <= 24
    for label, grid, n in examples:
      seen[label] += 1
      native = transforms_lib.grid_of(_packable(label), PATCH)
      assert grid[0] == native[0] and grid[1] <= native[1] and grid[2] <= native[2]
      full = transforms_lib.kept_tokens(int(np.prod(native)), _packable(label)["drop_rate"])
      assert n == transforms_lib.kept_tokens(int(np.prod(grid)), _packable(label)["drop_rate"])
      assert n >= (1 - shrink) * full - 1e-9
      if shrink == 0:
        assert grid == native
      else:  # a shrunk example keeps its aspect ratio (within fit_grid's tolerance)
        assert abs(np.log(grid[1] / grid[2] * native[2] / native[1])) < 0.7
  assert seen == collections.Counter(range(150))


def test_pool_fills_rows_better_than_grain_first_fit():
  def efficiency(rows):
    return np.mean([(r["segment_ids"] > 0).mean() for r in rows])

  k = 12  # not binding: rows fill up on tokens first
  pool = [r for _, r in zip(range(200), _pool(max_examples_per_row=k, text_tokens_per_row=64))]
  pool_shrink = [
    r
    for _, r in zip(
      range(200), _pool(max_examples_per_row=k, text_tokens_per_row=64, shrink_to_fill=0.5)
    )
  ]
  c = pipeline.default_input_config()
  c.update(
    dict(tokens_per_row=256, text_tokens_per_row=64, max_examples_per_row=k, num_packing_bins=8)
  )
  examples = grain.MapDataset.range(10**9).map(_packable).map(transforms_lib.Materialize(PATCH))
  first_fit = packing.grain_packer(examples.to_iter_dataset(), "first_fit", c, seed=0, train=True)
  first = [r for _, r in zip(range(200), first_fit)]
  assert efficiency(first) + 0.02 < min(efficiency(pool), efficiency(pool_shrink))
  assert min(efficiency(pool), efficiency(pool_shrink)) > 0.98


def test_pool_rows_hold_the_materialized_examples():
  it = iter(_pool(shrink_to_fill=0.5))
  for _ in range(10):
    row = next(it)
    for k, (label, grid, _) in enumerate(_row_examples(row)):
      want = transforms_lib.materialize(_packable(label), PATCH, grid)
      tokens = row["segment_ids"] == k + 1
      np.testing.assert_array_equal(row["patches"][tokens], want["patches"])
      np.testing.assert_array_equal(row["positions"][tokens], want["positions"])
      np.testing.assert_array_equal(
        row["text_tokens"][row["text_segment_ids"] == k + 1], want["text_tokens"]
      )


def test_pool_resume_is_exact():
  grain.experimental.assert_equal_output_after_checkpoint(
    grain.experimental.LimitIterDataset(_pool(shrink_to_fill=0.5), count=25)
  )
  it = iter(_pool())
  next(it)
  state = it.get_state()
  other = iter(_pool(shard=(1, 2)))
  with pytest.raises(ValueError, match="host 0 of 1 cannot resume host 1 of 2"):
    other.set_state(state)


# ---------------------------------------------------------------------------------------------
# The full pipeline on the bundled datasets.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_data_dir(data_dir):
  for module in (shapes, moving_digits, photo_pans):
    module.build(data_dir, config="test")
  return data_dir


def _mixture_config(data_dir, **overrides):
  c = pipeline.default_input_config()
  c.update(
    dict(
      mixture=(
        ("shapes", "test", 2.0),
        ("moving_digits", "test", 1.0),
        ("photo_pans", "test", 1.0),
      ),
      data_dir=data_dir,
      tokens_per_row=384,
      rows_per_batch=2,
      max_examples_per_row=6,
      text_tokens_per_row=64,
      max_frames=12,
      min_frames=2,
      max_frame_stride=2,
      max_tokens_per_example=256,
      min_tokens_per_example=32,
      token_drop=(0.0, 0.4),
      shrink_to_fill=0.5,
      num_packing_bins=6,
      read_threads=2,
      prefetch_batches=2,
    )
  )
  c.update(overrides)
  return c


def test_pipeline_resume_matches_grain_checker(mixed_data_dir):
  ds = pipeline.make_dataset(_mixture_config(mixed_data_dir), seed=5)
  grain.experimental.assert_equal_output_after_checkpoint(
    grain.experimental.LimitIterDataset(ds, count=6)
  )


def test_mixture_follows_weights_and_mixes_images_and_videos(mixed_data_dir):
  c = _mixture_config(mixed_data_dir, token_drop=(0.0, 0.0))
  it = pipeline.make_iterator(c, seed=0)
  ranges = {"shapes": range(0, 4), "digits": range(4, 14), "photos": range(14, 32)}
  counts, mixed_rows, frames = collections.Counter(), 0, collections.Counter()
  for _ in range(25):
    batch = next(it)
    for row in range(c.rows_per_batch):
      used = batch["shapes"][row, :, 0] > 0
      labels = batch["labels"][row][used]
      for label in labels:
        counts[next(name for name, r in ranges.items() if label in r)] += 1
      t = batch["shapes"][row][used][:, 0]
      mixed_rows += bool((t == 1).any() and (t > 1).any())
      frames.update(t.tolist())
  it.close()
  total = sum(counts.values())
  assert abs(counts["shapes"] / total - 0.5) < 0.12 and counts["digits"] and counts["photos"]
  assert mixed_rows >= 2  # still photos (1 temporal patch) share rows with videos
  assert len(frames) >= 4  # durations vary
  assert sum(batch["loss_mask"].sum() for _ in [0]) > 0


def test_packed_rows_never_mix_examples_in_the_model(mixed_data_dir):
  """Perturbing one example's patches or caption changes the VideoDiT output of that segment
  only (self- and cross-attention are masked by segment ids), in a real packed batch."""
  c = _mixture_config(mixed_data_dir, token_drop=(0.0, 0.0), prefetch_batches=0)
  batch = next(pipeline.make_iterator(c, seed=1))
  config = configs.small(mixed_data_dir)
  for key in ("tokens_per_row", "text_tokens_per_row", "max_examples_per_row", "patch_size"):
    config.input[key] = c[key]
  model = models.build(config)
  params = jax.jit(model.init)(jax.random.key(0), *models.dummy_inputs(config, rows=1))
  # adaLN-Zero starts every block (and the output) at zero: randomize so everything is live.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = tree.unflatten(
    [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )
  apply = jax.jit(model.apply)

  def run(patches, text):
    t = jnp.full(batch["segment_ids"].shape, 0.5, jnp.float32)
    return np.asarray(
      apply(
        params,
        patches,
        t,
        batch["positions"],
        batch["segment_ids"],
        text,
        batch["text_segment_ids"],
        batch["labels"],
      )
    )

  base = run(batch["patches"], batch["text_tokens"])
  seg = batch["segment_ids"]
  row, target = 0, 2 if (seg[0] == 2).any() else 1
  assert (seg[row] > 0).sum() > (seg[row] == target).sum() > 0  # the row holds other examples too
  inside = np.zeros(seg.shape, bool)
  inside[row] = seg[row] == target
  noisy = np.where(inside[..., None], batch["patches"] + 0.5, batch["patches"])
  text_inside = np.zeros(batch["text_segment_ids"].shape, bool)
  text_inside[row] = batch["text_segment_ids"][row] == target
  other_text = np.where(text_inside, (batch["text_tokens"] + 7) % 1000 + 3, batch["text_tokens"])
  for changed in (run(noisy, batch["text_tokens"]), run(batch["patches"], other_text)):
    diff = np.abs(changed - base).max(-1)  # [B, L]
    assert diff[inside].min() > 1e-6  # every token of the perturbed example changes...
    assert diff[~inside].max() == 0.0  # ...and nothing else does, padding included


def test_demo_config_packs_rows_nearly_full(data_dir):
  """The tiny demo's input config (configs/vdit/shapes.py:tiny) on the tiny shapes data."""
  c = configs.load().input
  c.data_dir = data_dir
  c.rows_per_batch = 4
  it = pipeline.make_iterator(c, seed=0)
  batches = [next(it) for _ in range(30)]
  it.close()
  efficiency = np.mean([b["loss_mask"].mean() for b in batches])
  print(f"demo packing efficiency {efficiency:.4f}")
  assert efficiency >= 0.95
