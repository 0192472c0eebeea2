"""The bundled TFDS builders (moving_digits, photo_pans) and the folder source for users' data."""

import dataclasses
import hashlib
import json
import os
import re

import imageio.v3 as iio
import numpy as np
import pytest
import threadpoolctl

from tests import configs
from vdit import datasets
from vdit.data import pipeline, transforms
from vdit.datasets import folder, moving_digits, photo_pans, shapes


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
  """Generating many small images: OpenBLAS threads contending for 2 cores are ~6× slower."""
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    yield


def _digest(ex: dict) -> tuple:
  video = ex["video"]
  caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else ex["caption"]
  return hashlib.sha1(video.tobytes() + str(video.shape).encode()).hexdigest(), caption, ex["label"]


def _test_config(builder):
  return next(c for c in builder.BUILDER_CONFIGS if c.name == "test")


@pytest.mark.parametrize("module", [moving_digits, photo_pans], ids=lambda m: m.__name__)
def test_builder_builds_and_reads_back_the_generator_output(data_dir, module):
  builder = {moving_digits: moving_digits.MovingDigits, photo_pans: photo_pans.PhotoPans}[module]
  cfg = _test_config(builder)
  module.build(data_dir, config="test")
  for split, size in (("train", cfg.train_size), ("validation", cfg.validation_size)):
    source = module.data_source(split, data_dir, config="test")
    assert len(source) == size
    stored = sorted(_digest(source[i]) for i in range(size))
    expected = sorted(_digest(module.generate(cfg, split, i)) for i in range(size))
    assert stored == expected  # deterministic: the files hold exactly the generator's output
  # The name-based lookup the pipeline uses reaches the same data.
  same = datasets.data_source(builder.name, "train", data_dir=data_dir, config="test")
  assert _digest(same[3]) == _digest(module.data_source("train", data_dir, config="test")[3])
  with pytest.raises(ValueError, match="config='huge' is unknown"):
    module.build(data_dir, config="huge")


def _centroids(mask: np.ndarray) -> np.ndarray:
  """[T, 2] (x, y) centroid of a [T, H, W] mask."""
  ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
  total = mask.sum(axis=(1, 2))
  return np.stack([(mask * xs).sum(axis=(1, 2)), (mask * ys).sum(axis=(1, 2))], -1) / total[:, None]


def test_moving_digits_content_matches_labels_and_captions():
  cfg = moving_digits.MovingDigits.BUILDER_CONFIGS[0]  # tiny
  checked = 0
  for i in range(120):
    ex = moving_digits.generate(cfg, "train", i)
    t, h, w, _ = ex["video"].shape
    assert cfg.min_frames <= t <= cfg.max_frames and cfg.min_size <= min(h, w) <= cfg.max_size
    assert 1 / cfg.max_aspect <= w / h <= cfg.max_aspect
    names = {str(ex["label"]), moving_digits.NUMBER_WORDS[ex["label"]]}
    assert set(re.findall(r"\w+", ex["caption"])) & names, ex["caption"]
    assert ("bouncing" in ex["caption"]) == bool(ex["bounce"])
    match = re.fullmatch(
      r"(?:a handwritten|the digit) \w+ moving ([\w-]+)(?: in \w+)?", ex["caption"]
    )
    if match and t >= 8:  # one digit on a straight line: its centroid moves the captioned way
      bright = np.abs(ex["video"].astype(np.float32) - ex["video"][0, 0, 0]).sum(-1) > 120
      moved = np.diff(_centroids(bright)[[0, -1]], axis=0)[0]
      dx, dy = moving_digits.DIRECTIONS[match.group(1)]
      for axis, step in enumerate((dx, dy)):
        if step:
          assert moved[axis] * step > 0, (ex["caption"], moved)
      checked += 1
  assert checked >= 10


def test_moving_digits_validation_uses_unseen_scans():
  cfg = moving_digits.MovingDigits.BUILDER_CONFIGS[0]
  boundary = 1797 - moving_digits.VALIDATION_SCANS
  for split, ok in (("train", lambda s: s < boundary), ("validation", lambda s: s >= boundary)):
    for i in range(40):
      ex = moving_digits.generate(cfg, split, i)
      scans = [s for s in ex["scans"].tolist() if s >= 0]
      assert scans and all(ok(s) for s in scans), (split, scans)
      assert ex["label"] == ex["digits"][0]


def test_photo_pans_render_and_windows():
  # Rendering: a window moved right by 8 photo px at scale 1 shifts the frame left by 8 px.
  windows = np.array([[100, 100, 32, 48], [100, 108, 32, 48]], np.float64)
  frames = photo_pans.render("brick", windows, 32, 48).astype(np.float32)
  np.testing.assert_allclose(frames[1][:, :-8], frames[0][:, 8:], atol=1)
  assert np.abs(frames[1] - frames[0]).mean() > 5  # and it is not a flat image
  rng = np.random.default_rng(0)
  for direction, (dx, dy) in photo_pans.DIRECTIONS.items():
    win = photo_pans._windows(rng, (400, 600), 1.5, "pan", direction, 8)  # [T, (top, left, h, w)]
    assert np.sign(win[-1, 1] - win[0, 1]) == dx and np.sign(win[-1, 0] - win[0, 0]) == dy
    assert (win[:, 0] >= 0).all() and (win[:, 0] + win[:, 2] <= 400 + 1e-6).all()
    np.testing.assert_allclose(win[:, 3] / win[:, 2], 1.5)
  zoom = photo_pans._windows(rng, (400, 600), 0.5, "zoom_in", "left", 8)
  assert (np.diff(zoom[:, 2]) < 0).all()  # zooming in: the window narrows


def test_photo_pans_mixes_stills_and_clips_of_many_shapes():
  cfg = photo_pans.PhotoPans.BUILDER_CONFIGS[0]
  examples = [photo_pans.generate(cfg, "train", i) for i in range(60)]
  stills = [e for e in examples if e["video"].shape[0] == 1]
  assert 0.1 < len(stills) / len(examples) < 0.45
  for e in examples:
    noun = photo_pans.PHOTOS[photo_pans.PHOTO_NAMES[e["label"]]]
    assert noun in e["caption"]
    moving = any(w in e["caption"] for w in ("pan", "zooming"))
    assert moving == (e["video"].shape[0] > 1), e["caption"]
  aspects = {round(e["video"].shape[2] / e["video"].shape[1], 2) for e in examples}
  assert min(aspects) < 0.5 and max(aspects) > 2 and len(aspects) > 15
  assert len({e["label"] for e in examples}) > 12


# ---------------------------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------------------------
def _real_video() -> np.ndarray:
  """Real footage: the animated GIF shipped with scikit-image (24 frames of 25×14, upscaled)."""
  import skimage  # noqa: PLC0415

  path = os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")
  frames = iio.imread(path, index=None)[..., :3]
  return np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)[:, :48, :16]  # h264 macroblocks


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("media"))
  video = _real_video()
  for i in range(5):
    iio.imwrite(f"{d}/clip{i}.mp4", video[i:], plugin="FFMPEG", fps=10)
  iio.imwrite(
    f"{d}/photo.png", photo_pans.render("coffee", np.array([[0, 0, 400, 600]]), 40, 60)[0]
  )
  os.makedirs(f"{d}/frames")
  for j in range(6):
    iio.imwrite(f"{d}/frames/{j:03d}.png", video[j])
  with open(f"{d}/corrupt.mp4", "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)  # an mp4 header, then nothing valid
  records = [{"file": f"clip{i}.mp4", "caption": f"a man turning his head {i}"} for i in range(5)]
  records += [
    {"file": "photo.png", "caption": "a cup of coffee", "label": 2, "split": "train"},
    {"file": "frames", "caption": "frames of a man", "split": "validation"},
    {"file": "corrupt.mp4", "caption": "broken", "split": "train"},
    {"file": "missing.mp4", "caption": "not there"},
  ]
  with open(f"{d}/captions.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
  return d


def test_folder_source_skips_counts_and_reports(media_dir, caplog):
  source = folder.FolderSource(media_dir, "train")
  files = [e.file for e in source.entries]
  assert {"photo.png", "corrupt.mp4"} <= set(files) and "frames" not in files
  examples = {f: source[i] for i, f in enumerate(files)}
  assert examples["corrupt.mp4"] is None  # skipped, not a crash
  assert examples["photo.png"]["video"].shape == (1, 40, 60, 3)
  assert (
    examples["photo.png"]["caption"] == b"a cup of coffee" and examples["photo.png"]["label"] == 2
  )
  clip = next(v for f, v in examples.items() if f.startswith("clip"))
  assert clip["video"].dtype == np.uint8 and clip["video"].shape[1:] == (48, 16, 3)
  assert clip["video"].shape[0] >= 19 and clip["label"] == -1
  report = source.report()
  assert report["skipped"] == 1 and list(report["skipped_files"]) == ["corrupt.mp4"]
  assert any("missing.mp4" in p for p in report["problems"])
  assert any("captions.jsonl:10" in p for p in report["problems"])  # the broken line
  assert any("skipping unreadable corrupt.mp4" in r.getMessage() for r in caplog.records)
  frames = folder.FolderSource(media_dir, "validation")
  assert frames[[e.file for e in frames.entries].index("frames")]["video"].shape == (6, 48, 16, 3)


def test_folder_caption_lines_are_checked_and_reported(tmp_path):
  for name in ("a", "b", "c", "d"):
    iio.imwrite(tmp_path / f"{name}.png", np.full((8, 8, 3), 100, np.uint8))
  lines = [
    b'{"file": "a.png", "caption": "first", "label": 1}',
    b'{"file": "b.png", "caption": "caf\xe9"}',  # Latin-1, not UTF-8
    b'{"file": "b.png", "label": "abc"}',
    b'{"file": "b.png", "label": null}',
    b'{"file": "b.png", "label": 2.7}',
    b'{"file": "c.png", "split": "test"}',
    b'{"file": "d.png", "caption": {"text": "a dict"}}',
    b'{"file": "a.png", "caption": "again"}',
    b"[1, 2]",
  ]
  (tmp_path / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  entries, problems = folder.scan(str(tmp_path))
  by_file = {e.file: e for e in entries}
  assert (by_file["a.png"].caption, by_file["a.png"].label) == ("first", 1)  # the first line wins
  assert all(by_file[f].caption == "" and by_file[f].label == -1 for f in ("b.png", "d.png"))
  assert by_file["c.png"].split in folder.SPLITS
  expected = [
    r"captions.jsonl:2: not UTF-8 text",
    r"captions.jsonl:3: 'label' must be an integer >= 0 \(or -1 = none\), got 'abc'",
    r"captions.jsonl:4: 'label' .* got None",
    r"captions.jsonl:5: 'label' .* got 2.7",
    r"captions.jsonl:6: 'split' must be one of \('train', 'validation'\), got 'test'",
    r"captions.jsonl:7: 'caption' must be a string, got dict",
    r"captions.jsonl:8: 'a.png' was already captioned on an earlier line",
    r"captions.jsonl:9: expected a JSON object, got list",
  ]
  assert len(problems) == len(expected)
  for pattern, problem in zip(expected, problems):
    assert re.match(pattern, problem), (pattern, problem)


def test_videos_smaller_than_a_patch_are_skipped(caplog):
  clip = transforms.SampleClip((2, 4, 4), max_frames=8)
  assert clip.clip({"video": np.zeros((6, 1, 200, 3), np.uint8)}, 0) is None
  assert any("skipping a 1x200 video" in r.getMessage() for r in caplog.records)
  assert clip.clip({"video": np.zeros((6, 5, 9, 3), np.uint8)}, 0)["video"].shape == (6, 4, 8, 3)


def test_folder_empty_or_unusable_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no usable 'train' examples"):
    folder.FolderSource(str(tmp_path), "train")
  (tmp_path / "notes.txt").write_text("not media")
  with pytest.raises(ValueError, match="no usable 'train' examples"):
    folder.FolderSource(str(tmp_path), "train")
  with pytest.raises(ValueError, match="is not a directory"):
    folder.FolderSource(str(tmp_path / "nope"), "train")
  (tmp_path / "only.mp4").write_bytes(b"junk")
  with pytest.raises(ValueError, match="none of the 1 'train' files could be decoded"):
    folder.build(str(tmp_path / "tfds"), str(tmp_path))


def test_folder_tfds_conversion_and_pipeline(media_dir, data_dir):
  folder.build(data_dir, media_dir)
  source = folder.data_source("train", data_dir, media_dir)
  raw = folder.FolderSource(media_dir, "train")
  assert len(source) == len(raw) - 1  # the corrupt file is not converted
  stored = {source[i]["file"].decode(): source[i]["video"] for i in range(len(source))}
  for i, entry in enumerate(raw.entries):
    if entry.file != "corrupt.mp4":
      np.testing.assert_array_equal(stored[entry.file], raw[i]["video"])
  config = folder.folder_config(media_dir).name
  folder.build(data_dir, media_dir)  # cached: same fingerprint, no rebuild
  assert folder.folder_config(media_dir).name == config
  # Both ways into the pipeline give packed batches (the raw one skipping the corrupt file).
  for name in ("folder", "folder_raw"):
    c = configs.input_config(data_dir, dataset=name, dataset_config=media_dir)
    batch = next(pipeline.make_iterator(c, seed=0))
    assert batch["loss_mask"].sum() > 0 and (batch["shapes"][..., 0] > 0).sum() >= 2
  with pytest.raises(ValueError, match="needs dataset_config=<path of the folder>"):
    datasets.data_source("folder", "train", data_dir=data_dir)


@pytest.mark.parametrize(
  "builder", [shapes.Shapes, moving_digits.MovingDigits], ids=lambda b: b.__name__
)
def test_tiny_20k_is_tiny_with_more_train_clips(builder):
  """`tiny_20k` differs from `tiny` only in its train size, so its validation split is tiny's
  (models trained on either are scored on the same clips) and tiny's train clips are its first."""
  by_name = {c.name: c for c in builder.BUILDER_CONFIGS}
  tiny, big = by_name["tiny"], by_name["tiny_20k"]
  fields = [f.name for f in dataclasses.fields(tiny) if f.name not in ("name", "description")]
  assert big.train_size == 10 * tiny.train_size
  assert {f: getattr(big, f) for f in fields if f != "train_size"} == {
    f: getattr(tiny, f) for f in fields if f != "train_size"
  }
  for split, index in (("validation", 0), ("validation", 199), ("train", 1999)):
    assert _digest(builder.generate(big, split, index)) == _digest(
      builder.generate(tiny, split, index)
    )
