"""Data layer: patchify, tokenizer, the `shapes` TFDS builder, transforms and packed batches."""

import collections
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit.data import patchify as patchify_lib
from vdit.data import pipeline
from vdit.data import tokenizer as tokenizer_lib
from vdit.data import transforms as transforms_lib
from vdit.datasets import shapes

CONTRACT = {
  "patches": np.float32,
  "positions": np.int32,
  "segment_ids": np.int32,
  "shapes": np.int32,
  "text_tokens": np.int32,
  "text_segment_ids": np.int32,
  "labels": np.int32,
  "cond_mask": np.bool_,
  "loss_mask": np.bool_,
}
# Independent of the generator's tables: what a colour name and a direction word mean.
NAMED_RGB = {
  "red": (255, 0, 0),
  "green": (0, 255, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 255, 0),
  "white": (255, 255, 255),
  "purple": (128, 0, 128),
}


def _direction_signs(direction: str) -> tuple[int, int]:
  """(dx, dy) signs in image coordinates (y grows downwards) of e.g. "up-left"."""
  words = direction.split("-")
  dx = ("right" in words) - ("left" in words)
  dy = ("down" in words) - ("up" in words)
  return dx, dy


CAPTION = re.compile(
  r"(?:a video of |footage of |an animation of )?a (\w+) (\w+) moving ([\w-]+)"
  r"(?: (slowly|quickly))?(?: on a (\w+) background)?"
)
TEST_CONFIG = next(c for c in shapes.Shapes.BUILDER_CONFIGS if c.name == "test")


# ---------------------------------------------------------------------------------------------
# patchify
# ---------------------------------------------------------------------------------------------
def test_patchify_roundtrip_and_token_order():
  rng = np.random.default_rng(0)
  video = rng.normal(size=(4, 8, 12, 3)).astype(np.float32)
  patches, positions, grid = patchify_lib.patchify(video, (2, 4, 4))
  assert grid == (2, 2, 3) and patches.shape == (12, 2 * 4 * 4 * 3)
  assert positions.dtype == np.int32 and positions.shape == (12, 3)
  # t-major, then h, then w; each patch flattened in (pt, ph, pw, C) order.
  for n, (t, h, w) in enumerate(positions):
    assert n == (t * grid[1] + h) * grid[2] + w
    block = video[2 * t : 2 * t + 2, 4 * h : 4 * h + 4, 4 * w : 4 * w + 4]
    np.testing.assert_array_equal(patches[n], block.reshape(-1))
  np.testing.assert_array_equal(patchify_lib.unpatchify(patches, grid, (2, 4, 4), 3), video)


def test_patchify_leading_dims_and_jax_arrays():
  video = np.arange(2 * 2 * 4 * 8 * 1, dtype=np.float32).reshape(2, 2, 4, 8, 1)
  patches, _, grid = patchify_lib.patchify(video, (1, 2, 4))
  assert patches.shape == (2, 2 * 2 * 2, 8)
  np.testing.assert_array_equal(patches[1], patchify_lib.patchify(video[1], (1, 2, 4))[0])
  np.testing.assert_array_equal(patchify_lib.unpatchify(patches, grid, (1, 2, 4), 1), video)
  jax_patches, _, _ = patchify_lib.patchify(jnp.asarray(video), (1, 2, 4))
  back = patchify_lib.unpatchify(jax_patches, grid, (1, 2, 4), 1)
  np.testing.assert_array_equal(np.asarray(back), video)


def test_check_divisible_names_every_bad_dim():
  with pytest.raises(ValueError) as error:
    patchify_lib.check_divisible(16, 50, 30, (2, 4, 4))
  message = str(error.value)
  assert "height=50 is not a multiple of the patch size 4" in message
  assert "width=30 is not a multiple of the patch size 4" in message
  assert "num_frames" not in message
  with pytest.raises(ValueError, match="num_frames=3 is not a multiple of the patch size 2"):
    patchify_lib.patchify(np.zeros((3, 8, 8, 3)), (2, 4, 4))
  patchify_lib.check_divisible(16, 48, 32, (2, 4, 4))  # fine
  with pytest.raises(ValueError, match="do not fit grid"):
    patchify_lib.unpatchify(np.zeros((5, 96)), (1, 2, 2), (2, 4, 4), 3)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def test_tokenizer_ids_are_stable_and_structured():
  tok = tokenizer_lib.Tokenizer(vocab_size=1024)
  ids = tok.encode("A Red circle, moving RIGHT!")
  assert ids.dtype == np.int32 and ids[0] == tokenizer_lib.BOS_ID
  assert ids.tolist() == tok.encode("a red circle moving right").tolist()
  assert all(3 <= i < tokenizer_lib.NUM_FIXED_IDS for i in ids[1:])  # built-in words
  assert len(set(ids[1:].tolist())) == 5
  # Unknown words: crc32 buckets past the built-in ids, independent of PYTHONHASHSEED.
  unknown = tok.encode("zorblax")[1]
  buckets = 1024 - tokenizer_lib.NUM_FIXED_IDS
  assert unknown == tokenizer_lib.NUM_FIXED_IDS + zlib.crc32(b"zorblax") % buckets
  code = "from vdit.data import tokenizer as t; print(t.Tokenizer().encode('zorblax red').tolist())"
  env = dict(os.environ, PYTHONHASHSEED="12345")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
  )
  assert out.stdout.strip() == str(tok.encode("zorblax red").tolist()), out.stderr
  assert tok.decode(tok.encode("a red zorblax")) == f"<bos> a red <hash:{unknown}>"
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer_lib.Tokenizer(vocab_size=100)


def test_tokenizer_null_caption_and_truncation(caplog):
  tok = tokenizer_lib.Tokenizer()
  for empty in ("", "   ", "\n\t", b"", "?!"):
    assert tok.encode(empty, 8).tolist() == [tokenizer_lib.NULL_ID]
  text = "a red circle moving right on a blue background"
  assert len(tok.encode(text)) == 10
  with caplog.at_level(logging.WARNING):
    short = tok.encode(text, max_len=4)
    tok.encode(text, max_len=4)
  assert short.tolist() == tok.encode(text)[:4].tolist()
  assert sum("truncated" in r.getMessage() for r in caplog.records) == 1  # warned once


# ---------------------------------------------------------------------------------------------
# shapes: the generator
# ---------------------------------------------------------------------------------------------
def _object_mask(video: np.ndarray, background: str) -> np.ndarray:
  """[T, H, W] pixels far from the (gently shaded) background colour."""
  bg = np.asarray(shapes.BACKGROUNDS[background], np.float32)
  return np.linalg.norm(video.astype(np.float32) - bg, axis=-1) > 85


def _check_example_matches_caption(ex: dict):
  words = CAPTION.fullmatch(ex["caption"]).groups()
  colour, shape, direction, _, background = words
  assert shapes.COLOUR_NAMES[ex["colour"]] == colour
  assert shapes.SHAPES[ex["shape"]] == shape == shapes.SHAPES[ex["label"]]
  assert shapes.DIRECTION_NAMES[ex["direction"]] == direction
  assert background in (None, shapes.BACKGROUND_NAMES[ex["background"]])
  video = ex["video"]
  mask = _object_mask(video, shapes.BACKGROUND_NAMES[ex["background"]])
  assert mask[0].sum() >= 9 and mask[-1].sum() >= 0.5 * mask[0].sum()  # stays mostly in frame
  # The object's mean colour in the first frame (inside its anti-aliased edge) is nearest to the
  # captioned colour.
  core = mask[0].copy()
  core[1:] &= mask[0][:-1]
  core[:-1] &= mask[0][1:]
  core[:, 1:] &= mask[0][:, :-1]
  core[:, :-1] &= mask[0][:, 1:]
  mean = video[0][core].astype(np.float32).mean(0)
  nearest = min(NAMED_RGB, key=lambda c: np.linalg.norm(mean - NAMED_RGB[c]))
  assert nearest == colour, (ex["caption"], mean)
  # Its centroid moves the captioned way on each moving axis by at least half of what the
  # generator promises: MIN_SPEED px/frame, or, on a side too short for that over the clip, the
  # side less the object's half-size (≤ 0.3 of the short side), the object leaving at most half.
  ys, xs = np.mgrid[: video.shape[1], : video.shape[2]]
  centroid = lambda m: np.array([(xs * m).sum(), (ys * m).sum()]) / m.sum()
  moved = centroid(mask[-1]) - centroid(mask[0])
  sides = (video.shape[2], video.shape[1])  # (x, y) extents
  for axis, step in enumerate(_direction_signs(direction)):
    if step:
      promised = min(shapes.MIN_SPEED * (len(video) - 1), 0.7 * sides[axis])
      assert moved[axis] * step >= 0.5 * promised, (ex["caption"], moved)
    else:
      assert abs(moved[axis]) < 1.0, (ex["caption"], moved)


def test_make_example_matches_spec_for_every_combination():
  rng = np.random.default_rng(0)
  for colour in shapes.COLOURS:
    for shape in shapes.SHAPES:
      for direction in shapes.DIRECTIONS:
        background = str(rng.choice(shapes.contrasting_backgrounds([colour])))
        height, width = (int(s) for s in rng.choice([16, 32, 64], size=2))
        spec = shapes.ExampleSpec(
          objects=(shapes.ObjectSpec(colour, shape, direction),),
          background=background,
          num_frames=int(rng.integers(8, 17)),
          height=height,
          width=width,
          caption_background=bool(rng.random() < 0.5),
        )
        ex = shapes.make_example(rng, spec)
        assert ex["video"].shape == (spec.num_frames, height, width, 3)
        assert ex["video"].dtype == np.uint8
        assert ex["caption"].startswith(f"a {colour} {shape} moving {direction}")
        _check_example_matches_caption(ex)


def test_spec_distribution_spans_declared_ranges():
  cfg = shapes.Shapes.BUILDER_CONFIGS[0]  # "tiny"
  rng = np.random.default_rng(1)
  specs = [shapes.sample_spec(rng, cfg) for _ in range(600)]
  aspects = [s.width / s.height for s in specs]
  assert min(aspects) == 1 / 3 and max(aspects) == 3.0
  sides = {s.height for s in specs} | {s.width for s in specs}
  assert sides == set(range(16, 81, 8))
  assert {s.num_frames for s in specs} == set(range(4, 25))
  assert {s.speed for s in specs} == {"", "slowly", "quickly"}
  assert {s.prefix for s in specs} == {"", *shapes.PREFIXES}
  for s in specs:  # the canonical phrase the demo prompts with is always in the caption
    o = s.objects[0]
    assert f"a {o.colour} {o.shape} moving {o.direction}" in shapes.caption(s)
  assert {o.colour for s in specs for o in s.objects} == set(cfg.colours)
  assert {o.shape for s in specs for o in s.objects} == set(cfg.shapes)
  assert {o.direction for s in specs for o in s.objects} == set(cfg.directions)
  assert 0.15 < np.mean([s.caption_background for s in specs]) < 0.35
  for s in specs:  # backgrounds contrast with the object
    assert s.background in shapes.contrasting_backgrounds([o.colour for o in s.objects])
  two = shapes.ShapesConfig(name="two", two_object_rate=1.0)
  spec = shapes.sample_spec(rng, two)
  assert len(spec.objects) == 2 and " and a " in shapes.caption(spec)


# ---------------------------------------------------------------------------------------------
# shapes: the TFDS builder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_data_dir(data_dir):
  shapes.build(data_dir, config="test")
  return data_dir


def _digest(video: np.ndarray) -> str:
  return hashlib.sha1(video.tobytes() + str(video.shape).encode()).hexdigest()


def test_builder_writes_the_generator_output(test_data_dir):
  for split, size in (("train", TEST_CONFIG.train_size), ("validation", 8)):
    source = shapes.data_source(split, test_data_dir, config="test")
    assert len(source) == size
    stored = collections.Counter()
    for i in range(len(source)):
      ex = source[i]
      video = ex["video"]
      t, h, w, c = video.shape
      cfg = TEST_CONFIG
      assert video.dtype == np.uint8 and c == 3
      assert cfg.min_frames <= t <= cfg.max_frames
      assert cfg.min_size <= min(h, w) and max(h, w) <= cfg.max_size
      assert h % 8 == 0 and w % 8 == 0 and 1 / 3 <= w / h <= 3.0
      ex = {**ex, "caption": ex["caption"].decode()}
      _check_example_matches_caption(ex)
      stored[(_digest(video), ex["caption"], ex["label"])] += 1
    expected = collections.Counter()
    for i in range(size):
      ex = shapes.generate(TEST_CONFIG, split, i)
      expected[(_digest(ex["video"]), ex["caption"], ex["label"])] += 1
    assert stored == expected  # deterministic: the files hold exactly the generator's output


def test_speed_words_are_honoured():
  rng = np.random.default_rng(3)
  moved = {}
  for speed in ("slowly", "quickly"):
    obj = (shapes.ObjectSpec("red", "circle", "right"),)
    spec = shapes.ExampleSpec(obj, "black", num_frames=12, height=32, width=96, speed=speed)
    distances = []
    for _ in range(10):
      ex = shapes.make_example(rng, spec)
      assert ex["caption"] == f"a red circle moving right {speed}"
      mask = _object_mask(ex["video"], "black")
      xs = np.arange(96)[None, :]
      distances.append(
        (mask[-1] * xs).sum() / mask[-1].sum() - (mask[0] * xs).sum() / mask[0].sum()
      )
    moved[speed] = np.mean(distances)
  assert moved["quickly"] > 1.8 * moved["slowly"] > 0, moved


def test_the_speed_word_says_what_the_video_shows():
  """The caption's speed word is the range the motion falls in (else the nearest), not the speed
  drawn: a 1 px/frame floor makes a long clip on a small canvas move faster than drawn."""
  assert [
    shapes.speed_word(f) for f in (0.3, 0.45, 0.5, 0.55, 0.6, 0.85, 0.87, 0.88, 1.0, 1.6)
  ] == ["slowly", "slowly", "slowly", "", "", "", "", "quickly", "quickly", "quickly"]
  # 24 frames across a 24-px side: at 1 px/frame the object crosses more than its free span.
  obj = (shapes.ObjectSpec("red", "circle", "right"),)
  spec = shapes.ExampleSpec(obj, "black", num_frames=24, height=48, width=24, speed="slowly")
  ex = shapes.make_example(np.random.default_rng(0), spec)
  assert ex["caption"] == "a red circle moving right quickly"
  mask = _object_mask(ex["video"], "black")
  xs = np.arange(24)[None, :]
  first, last = ((m * xs).sum() / m.sum() for m in (mask[0], mask[-1]))
  assert last - first > 0.45 * 24  # it moved as far as the side allows, not "slowly"


def test_object_size_is_a_fraction_of_the_short_side():
  """`object_size` sets the half-size r as a fraction of the canvas's short side: a circle's
  area is π r² (up to its anti-aliased edge), on any canvas."""
  rng = np.random.default_rng(4)
  obj = (shapes.ObjectSpec("red", "circle", "right"),)
  for (h, w), fraction in (((32, 48), 0.2), ((48, 32), 0.3), ((40, 40), 0.25)):
    spec = shapes.ExampleSpec(obj, "black", 6, h, w, object_size=(fraction, fraction))
    mask = _object_mask(shapes.make_example(rng, spec)["video"], "black")
    r = fraction * min(h, w)
    np.testing.assert_allclose(mask.sum((1, 2)).mean(), np.pi * r**2, rtol=0.1)


def test_build_is_idempotent(test_data_dir):
  version = str(shapes.Shapes.VERSION)
  info = os.path.join(test_data_dir, "shapes", "test", version, "dataset_info.json")
  before = os.path.getmtime(info)
  shapes.build(test_data_dir, config="test")
  assert os.path.getmtime(info) == before
  with pytest.raises(ValueError, match="config='huge' is unknown"):
    shapes.build(test_data_dir, config="huge")


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
def test_sample_clip_stride_and_crop():
  video = np.arange(11, dtype=np.uint8)[:, None, None, None] * np.ones((1, 10, 13, 3), np.uint8)
  clip = transforms_lib.SampleClip((2, 4, 4), max_frames=4, frame_stride=2)
  out = clip.clip({"video": video}, start=3)["video"]
  assert out.shape == (4, 8, 12, 3)
  np.testing.assert_array_equal(out[:, 0, 0, 0], [3, 5, 7, 9])
  assert clip.num_starts(11) == 5  # starts 0..4 leave room for 4 frames at stride 2
  image = clip.clip({"video": video[:1]}, start=0)["video"]  # an image becomes pt frames
  assert image.shape == (2, 8, 12, 3)
  long = transforms_lib.SampleClip((2, 4, 4), max_frames=16)
  assert long.clip({"video": video}, start=0)["video"].shape[0] == 10  # 11 -> multiple of 2


def test_sample_clip_draws_stride_and_duration():
  video = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
  clip = transforms_lib.SampleClip((2, 4, 4), 12, 1, min_frames=4, max_frame_stride=3)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(300):
    frames = clip.random_map({"video": video}, rng)["video"][:, 0, 0, 0].astype(int)
    steps = set(np.diff(frames).tolist())
    assert len(steps) == 1 and len(frames) % 2 == 0 and 4 <= len(frames) <= 12  # one stride
    seen.add((steps.pop(), len(frames)))
  assert {s for s, _ in seen} == {1, 2, 3} and {n for _, n in seen} == {4, 6, 8, 10, 12}
  short = np.zeros((5, 8, 8, 3), np.uint8)  # too short for stride 3 at 4 frames: stride 1
  assert clip.random_map({"video": short}, rng)["video"].shape[0] == 4


def test_whole_clip_spreads_the_frames_over_the_video_in_training_and_evaluation():
  """`input.whole_clip`: up to max_frames frames (whole patch-frames) from the first frame to
  the last, the same in training and evaluation: a clip shows how far its object travels."""
  video = np.arange(24, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
  c = pipeline.resolve_input_config(dict(patch_size=(2, 4, 4), max_frames=8, whole_clip=True))
  rng = np.random.default_rng(0)
  for train in (True, False):
    (sample,) = [t for t in transforms_lib.example_transforms(c, train=train) if hasattr(t, "clip")]
    for t, frames in ((24, [0, 3, 7, 10, 13, 16, 20, 23]), (8, list(range(8))), (5, [0, 1, 3, 4])):
      got = sample.random_map({"video": video[:t]}, rng)["video"][:, 0, 0, 0].astype(int)
      assert got.tolist() == frames, (train, t)
  assert not pipeline.default_input_config().whole_clip  # a window of the video by default


def test_resize_to_token_budget_keeps_aspect_and_mean():
  for grid, budget in [((8, 16, 16), 512), ((8, 16, 8), 512), ((4, 4, 16), 100), ((7, 9, 5), 400)]:
    t, h, w = transforms_lib.fit_grid(grid, budget)
    assert t == grid[0] and t * h * w <= budget and h <= grid[1] and w <= grid[2]
    assert t * h * w > 0.6 * budget or (h, w) == grid[1:]
    assert abs(np.log(h / w * grid[2] / grid[1])) < 0.2
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, size=(4, 24, 40, 3)).astype(np.float32)
  small = transforms_lib.area_resize(video, 15, 25)
  assert small.shape == (4, 15, 25, 3)
  np.testing.assert_allclose(small.mean(axis=(1, 2)), video.mean(axis=(1, 2)), atol=1e-5)
  resize = transforms_lib.ResizeToTokenBudget((2, 4, 4), 60)
  out = resize.random_map({"video": video}, rng)["video"]  # grid (2, 6, 10) = 120 tokens -> ≤ 60
  assert out.shape[0] == 4 and (out.shape[1] // 4) * (out.shape[2] // 4) * 2 <= 60
  # NaViT resolution sampling: the budget is drawn per example in [min, max].
  sampled = transforms_lib.ResizeToTokenBudget((2, 4, 4), 120, min_tokens=20)
  sizes = {
    int(np.prod(transforms_lib.grid_of(sampled.random_map({"video": video}, rng), (2, 4, 4))))
    for _ in range(60)
  }
  assert min(sizes) <= 40 and max(sizes) >= 100 and len(sizes) >= 6


def test_token_drop_keeps_positions():
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, size=(4, 16, 24, 3)).astype(np.float32)
  element = {"video": video, "text_tokens": np.array([1, 5], np.int32), "label": np.int32(3)}
  full = transforms_lib.materialize(
    {**element, "drop_rate": np.float32(0.0), "seed": np.int64(0)}, (2, 4, 4)
  )
  drop = transforms_lib.SampleTokenDrop(0.25, 0.75)
  for _ in range(5):
    ex = transforms_lib.materialize(drop.random_map(element, rng), (2, 4, 4))
    n = len(full["patches"])  # 2 * 4 * 6 = 48
    rate = 1 - len(ex["patches"]) / n
    assert 0.25 - 1 / n <= rate <= 0.75 + 1 / n
    np.testing.assert_array_equal(ex["shapes"], [[2, 4, 6]])  # the full grid, not N
    # Every kept token is the full example's token at the same position, in order.
    flat = [(t * 4 + h) * 6 + w for t, h, w in ex["positions"]]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)
    np.testing.assert_array_equal(ex["patches"], full["patches"][flat])
    np.testing.assert_array_equal(ex["positions"], full["positions"][flat])


# ---------------------------------------------------------------------------------------------
# pipeline: packed batches
# ---------------------------------------------------------------------------------------------
def _candidates(c, split, data_dir, train):
  """(text tokens, grid) -> every packable version of every raw example (all clip starts).

  Valid for configs whose only randomness is the clip start (fixed duration, stride, budget).
  """
  source = shapes.data_source(split, data_dir, config="test")
  chain = transforms_lib.example_transforms(c, train=train)
  clip, rest = chain[0], chain[1:]
  out = collections.defaultdict(list)
  for i in range(len(source)):
    raw = source[i]
    starts = clip.num_starts(raw["video"].shape[0]) if train else 1
    for start in range(starts):
      ex = transforms_lib.apply(rest, clip.clip(raw, start))
      ex = transforms_lib.materialize(ex, c.patch_size)
      out[(tuple(ex["text_tokens"].tolist()), tuple(ex["shapes"][0].tolist()))].append((i, ex))
  return out


def _check_contract(batch, c):
  b, length, k = c.rows_per_batch, c.tokens_per_row, c.max_examples_per_row
  m = c.text_tokens_per_row
  p = int(np.prod(c.patch_size)) * 3
  expected_shapes = {
    "patches": (b, length, p),
    "positions": (b, length, 3),
    "segment_ids": (b, length),
    "shapes": (b, k, 3),
    "text_tokens": (b, m),
    "text_segment_ids": (b, m),
    "labels": (b, k),
    "cond_mask": (b, length),
    "loss_mask": (b, length),
  }
  assert set(batch) == set(CONTRACT)
  for key, dtype in CONTRACT.items():
    assert batch[key].dtype == dtype and batch[key].shape == expected_shapes[key], key
  seg, text_seg = batch["segment_ids"], batch["text_segment_ids"]
  assert not batch["cond_mask"].any()
  np.testing.assert_array_equal(batch["loss_mask"], seg > 0)
  assert np.abs(batch["patches"]).max() <= 1.0
  assert not batch["patches"][seg == 0].any() and not batch["positions"][seg == 0].any()
  assert not batch["text_tokens"][text_seg == 0].any()
  segments = []
  for row in range(b):
    used = int((batch["shapes"][row, :, 0] > 0).sum())
    assert (batch["shapes"][row, used:] == 0).all() and (batch["labels"][row, used:] == -1).all()
    assert set(np.unique(seg[row])) - {0} == set(range(1, used + 1))
    assert set(np.unique(text_seg[row])) - {0} == set(range(1, used + 1))
    for slot in range(used):
      grid = tuple(batch["shapes"][row, slot].tolist())
      tokens = seg[row] == slot + 1
      assert tokens.sum() == np.prod(grid) <= c.max_tokens_per_example
      # The positions cover the example's own grid, t-major, exactly once.
      np.testing.assert_array_equal(
        batch["positions"][row][tokens], patchify_lib.grid_positions(grid)
      )
      text = batch["text_tokens"][row][text_seg[row] == slot + 1]
      assert text[0] in (tokenizer_lib.BOS_ID, tokenizer_lib.NULL_ID)
      assert 0 <= batch["labels"][row, slot] < len(shapes.SHAPES)
      segments.append((tuple(text.tolist()), grid, batch["patches"][row][tokens], row, slot))
  return segments


def _match(segment, candidates, batch=None):
  """Index of the raw example whose transformed version is exactly this segment."""
  text, grid, patches, row, slot = segment
  hits = [i for i, ex in candidates[(text, grid)] if np.array_equal(ex["patches"], patches)]
  assert hits, f"segment {slot + 1} of row {row} matches no transformed example"
  if batch is not None:
    ex = next(ex for i, ex in candidates[(text, grid)] if i == hits[0])
    assert batch["labels"][row, slot] == ex["labels"][0]
  return hits[0]


def test_train_batches_follow_the_contract(test_data_dir):
  c = configs.input_config(test_data_dir)
  candidates = _candidates(c, "train", test_data_dir, train=True)
  it = pipeline.make_iterator(c, seed=7)
  seen = collections.Counter()
  for _ in range(8):
    batch = next(it)
    for segment in _check_contract(batch, c):
      seen[_match(segment, candidates, batch)] += 1
  assert sum(seen.values()) >= 12 and len(seen) >= 8  # many distinct examples, all verified


def test_eval_pass_yields_every_example_once(test_data_dir):
  c = configs.input_config(test_data_dir, split="validation")
  candidates = _candidates(c, "validation", test_data_dir, train=False)
  batches = list(pipeline.make_dataset(c, seed=0, train=False))
  seen = collections.Counter(
    _match(segment, candidates) for batch in batches for segment in _check_contract(batch, c)
  )
  assert seen == collections.Counter(range(TEST_CONFIG.validation_size))
  # Two hosts split the same pass: disjoint, and together everything.
  hosts = []
  for index in range(2):
    ds = pipeline.make_dataset(c, seed=0, process_index=index, process_count=2, train=False)
    hosts.append(
      collections.Counter(
        _match(segment, candidates) for batch in ds for segment in _check_contract(batch, c)
      )
    )
  assert not set(hosts[0]) & set(hosts[1]) and hosts[0] + hosts[1] == seen


def test_iterator_state_round_trip(test_data_dir):
  c = configs.input_config(test_data_dir, prefetch_batches=2, read_threads=2)
  it = pipeline.make_iterator(c, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # what a checkpoint stores
  expected = [next(it) for _ in range(4)]
  restored = pipeline.make_iterator(c, seed=3)
  restored.set_state(state)
  it.set_state(state)  # rewinding the same iterator works too
  for want, got, again in zip(
    expected, [next(restored) for _ in range(4)], [next(it) for _ in range(4)]
  ):
    for key in CONTRACT:
      np.testing.assert_array_equal(got[key], want[key])
      np.testing.assert_array_equal(again[key], want[key])
  other = next(pipeline.make_iterator(c, seed=4))
  assert not np.array_equal(other["patches"], expected[0]["patches"])
  for i in (it, restored):
    i.close()


def test_config_errors_name_the_value(test_data_dir):
  for overrides, message in [
    (dict(max_tokens_per_example=1024), "max_tokens_per_example=1024 exceeds"),
    (dict(max_caption_tokens=64), "max_caption_tokens=64"),
    (dict(packing="first_fit"), "input.packing='first_fit' was removed"),
    (dict(max_tokens_per_example=4), "max_tokens_per_example=4 is below"),
    (dict(min_tokens_per_example=300), "min_tokens_per_example=300 exceeds"),
    (dict(min_frames=32), "min_frames=32 must be in [1, max_frames=16]"),
    (dict(max_frame_stride=0), "max_frame_stride=0 is below frame_stride=1"),
    (dict(token_drop=(0.5, 0.2)), "token_drop=(0.5, 0.2)"),
    (dict(shrink_to_fill=1.0), "shrink_to_fill=1.0"),
    (dict(mixture=(("shapes", "test"),)), "input.mixture entry ('shapes', 'test')"),
    (dict(mixture=(("nope", "tiny", 1.0),)), "dataset='nope' is unknown"),
    (dict(dataset="nope"), "dataset='nope' is unknown"),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      pipeline.make_dataset(configs.input_config(test_data_dir, **overrides), seed=0)
  with pytest.raises(ValueError, match=re.escape("unknown input config keys ['tokens_per_rows']")):
    pipeline.make_dataset(
      dict(configs.input_config(test_data_dir).to_dict(), tokens_per_rows=3), seed=0
    )
  # A config saved before the key was removed, with the value that meant today's packer, resolves.
  assert "packing" not in pipeline.resolve_input_config(dict(packing="best_fit"))


def test_missing_new_keys_get_defaults(test_data_dir):
  """A config written before a key existed still works: absent keys take the defaults."""
  old = configs.input_config(test_data_dir).to_dict()
  for key in (
    "mixture",
    "min_frames",
    "max_frame_stride",
    "min_tokens_per_example",
    "token_drop",
    "shrink_to_fill",
    "prefetch_batches",
  ):
    old.pop(key)
  old["max_tokens_per_example"] = 200  # below the default min_tokens_per_example (512)...
  c = pipeline.resolve_input_config(old)
  assert c.min_tokens_per_example == 200 and c.token_drop == (0.0, 0.0) and c.min_frames == 16
  # ...so an absent min follows the given max rather than failing.
  batch = next(pipeline.make_iterator(old, seed=0))
  _check_contract(batch, pipeline.resolve_input_config(old))


def test_multiprocess_workers_resume_exactly(test_data_dir):
  """workers > 0: grain worker processes each pack their slice; the state still round-trips."""
  c = configs.input_config(test_data_dir, workers=2, min_tokens_per_example=64, shrink_to_fill=0.5)
  it = pipeline.make_iterator(c, seed=0)
  first = next(it)
  _check_contract(first, c)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  it.set_state(state)
  for want in expected:
    got = next(it)
    for key in CONTRACT:
      np.testing.assert_array_equal(got[key], want[key])
  it.close()
  single = next(pipeline.make_iterator(configs.input_config(test_data_dir), seed=0))
  assert not np.array_equal(single["patches"], first["patches"])  # workers split the stream
