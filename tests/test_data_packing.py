"""Packing: the best-fit pool packer, exact resume, mixtures, and isolation through the model."""

import collections
import hashlib
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit import batch_spec, models
from vdit.data import packing, pipeline, tokenizer
from vdit.data import transforms as transforms_lib
from vdit.datasets import moving_digits, photo_pans, shapes
from vdit.tools.bench import packing as bench_packing

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


@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_pool_fills_rows_nearly_full(shrink):
  """Over 98% of the row slots are real tokens (99.6% here; grain's first-fit packer, an option
  until issue 17, gave 95.6% on these examples; BENCHMARKS.md compares packers on real data)."""
  k = 12  # not binding: rows fill up on tokens first
  ds = _pool(max_examples_per_row=k, text_tokens_per_row=64, shrink_to_fill=shrink)
  rows = [r for _, r in zip(range(200), ds)]
  assert np.mean([(r["segment_ids"] > 0).mean() for r in rows]) > 0.98


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
# Resuming on another number of hosts (`packing.remap_state`).
# ---------------------------------------------------------------------------------------------
def _frontier(state) -> int:
  """The first global example the host of `state` has not read: i + n·next_index."""
  i, n = state["shard"]
  return i + n * state["next_index"]


def _pending(state) -> set[int]:
  """Global indices of the examples in the open and unsent rows of `state`."""
  rows = json.loads(state["rows"])
  return {g for kind in ("bins", "ready") for row in rows[kind] for g, _ in row}


def _check_remap(before, states, after, new_states):
  """`before`/`after`: Counters of the global examples emitted by the old/new hosts. Nothing is
  lost, each run emits an example once, and only the old hosts' lead over the slowest repeats."""
  old, start = len(states), min(_frontier(s) for s in states)
  horizon = min(_frontier(s) for s in new_states)
  assert horizon > max(_frontier(s) for s in states)  # the new hosts passed every old frontier
  waiting = set().union(*map(_pending, new_states))
  lost = [g for g in range(horizon) if g not in before and g not in after and g not in waiting]
  assert not lost, f"examples below {horizon} never emitted: {lost}"
  assert max(before.values()) == 1 and max(after.values()) == 1
  handed_on = {g for s in states for g in _pending(s) if g < start}
  assert handed_on and handed_on <= set(after) | waiting  # old hosts' rows moved, not re-read
  repeats = set(before) & set(after)
  assert all(start <= g < _frontier(states[g % old]) for g in repeats), sorted(repeats)
  return repeats


@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (3, 2), (1, 4)])
def test_remap_state_loses_no_example(old, new):
  """Hosts drift apart and save; the run resumes on another host count from `remap_state`."""
  hosts = [iter(_pool(shard=(i, old))) for i in range(old)]
  before = collections.Counter()
  for i, it in enumerate(hosts):
    for _ in range(6 + 10 * i):  # the hosts drift apart
      row = next(it)
      labels = [label for label, _, _ in _row_examples(row)]
      assert all(label % old == i for label in labels)  # host i reads examples i + old·k
      before.update(labels)
  states = [json.loads(json.dumps(it.get_state())) for it in hosts]  # as a checkpoint holds them
  after, new_states = collections.Counter(), []
  for j in range(new):
    it = iter(_pool(shard=(j, new)))
    it.set_state(packing.remap_state(states, j, new))
    assert len(json.loads(it.get_state()["rows"])["bins"]) <= 8  # at most num_bins open rows
    while _frontier(it.get_state()) <= max(map(_frontier, states)):  # past every old host
      after.update(label for label, _, _ in _row_examples(next(it)))
    new_states.append(it.get_state())
  repeats = _check_remap(before, states, after, new_states)
  assert bool(repeats) == (old > 1)  # one old host has no lead to repeat


def test_state_with_host_local_indices_resumes_exactly():
  """States written before version 2 numbered the examples of a row within the host's share."""
  it = iter(_pool(shard=(1, 3)))
  for _ in range(5):
    next(it)
  state = it.get_state()
  rows = json.loads(state["rows"])
  local = {kind: [[[(g - 1) // 3, grid] for g, grid in r] for r in rows[kind]] for kind in rows}
  legacy = {"shard": [1, 3], "next_index": state["next_index"], "rows": json.dumps(local)}
  want = [next(it) for _ in range(4)]
  restored = iter(_pool(shard=(1, 3)))
  restored.set_state(legacy)
  for a, b in zip(want, [next(restored) for _ in range(4)], strict=True):
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["patches"], b["patches"])


def test_remap_state_rejects_other_layouts():
  grain_state = {"parent": {"next_index": 3}, "next_row": 0, "counter": 0}
  with pytest.raises(ValueError, match=r"host 0 of 2 has layout \['counter', 'next_row'"):
    packing.remap_state([grain_state] * 2, 0, 1)
  it = iter(_pool(shard=(0, 2)))
  state = it.get_state()
  with pytest.raises(ValueError, match=r"host 1 of 2 has layout .* shard \[0, 2\]"):
    packing.remap_state([state, state], 0, 1)  # two copies of host 0
  with pytest.raises(ValueError, match=r"process_index=3 must be in \[0, process_count=3\)"):
    packing.remap_state([state], 3, 3)


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
      mixture=bench_packing.bundled_mixture("test"),
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


def _segment_key(patches, text) -> bytes:
  return hashlib.sha1(np.ascontiguousarray(patches).tobytes() + text.tobytes()).digest()


def _emitted(batch) -> list[bytes]:
  """The key of every example in a batch (its patches and caption tokens)."""
  keys = []
  for row in range(batch["segment_ids"].shape[0]):
    for k in range(1, batch["segment_ids"][row].max() + 1):
      keys.append(
        _segment_key(
          batch["patches"][row][batch["segment_ids"][row] == k],
          batch["text_tokens"][row][batch["text_segment_ids"][row] == k],
        )
      )
  return keys


def test_pipeline_resumes_on_other_host_counts_without_losing_examples(data_dir):
  """Real pipelines on the tiny shapes data as 2 hosts that drift apart; their states remapped
  to 1 and to 3 hosts. The examples are identified by content (example g of the global stream,
  packed without shrinking, has the same patches on any host)."""
  c = configs.small(data_dir).input
  c.update(dict(rows_per_batch=2, num_packing_bins=4, shrink_to_fill=0.0))
  make = lambda j, m: pipeline.make_iterator(c, seed=3, process_index=j, process_count=m)
  old = [make(i, 2) for i in range(2)]
  before = [key for i, it in enumerate(old) for _ in range(3 + 3 * i) for key in _emitted(next(it))]
  states = [json.loads(json.dumps(it.get_state())) for it in old]
  runs = {}
  for new in (1, 3):
    after, new_states = [], []
    for j in range(new):
      it = make(j, new)
      it.set_state(packing.remap_state(states, j, new))
      while _frontier(it.get_state()) <= max(map(_frontier, states)):
        after.extend(_emitted(next(it)))
      new_states.append(it.get_state())
      it.close()
    runs[new] = after, new_states
  last = max(_frontier(s) for _, states_after in runs.values() for s in states_after)
  stream = pipeline.packable_examples(c, seed=3, train=True)
  index = {}  # content key -> global example index
  for g in range(last):
    ex = stream[g]
    grid = transforms_lib.grid_of(ex, c.patch_size)
    ex = transforms_lib.materialize(ex, c.patch_size, grid)
    index[_segment_key(ex["patches"], ex["text_tokens"])] = g
  assert len(index) == last  # the keys identify the examples
  before = collections.Counter(index[k] for k in before)
  for after, new_states in runs.values():
    _check_remap(before, states, collections.Counter(index[k] for k in after), new_states)
  for it in old:
    it.close()


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


def test_a_padding_row_is_the_batch_specs_padding():
  """`empty_row` (what a row holds where no example is) is `batch_spec`'s padding of every key:
  segment 0, labels −1, PAD text ids, zero patches, with the spec's dtypes and shapes."""
  row = packing.empty_row(length=6, text_length=4, slots=2, patch_dim=5, embed_dim=3)
  assert set(row) == {*batch_spec.PACKED_KEYS, "text_embeddings"} - {"cond_mask", "loss_mask"}
  for key, value in row.items():
    field = batch_spec.FIELDS[key]
    sizes = dict(B=1, L=6, M=4, K=2, P=5, D=3)
    assert value.shape == batch_spec.shape(key, sizes)[1:] and value.dtype == field.dtype, key
    assert np.all(value == field.pad), key
  assert np.all(row["labels"] == -1) and np.all(row["text_tokens"] == tokenizer.PAD_ID)
  assert "text_embeddings" not in packing.empty_row(6, 4, 2, 5)
