"""The `digits` evaluator: ink crops (`vdit.data.ink_crop`) and their classifier
(`configs/vit/digit_crops.py`), on frames whose digit box and label are known."""

import json
import os

import jax
import numpy as np
import pytest

from tests import configs
from vdit import evaluators, media, sharding, tasks, train
from vdit.data import dense, ink_crop, transforms
from vdit.datasets import moving_digits as md
from vdit.evaluators import classifier

CONFIG = "configs/vit/digit_crops.py"
E2E_STEPS = 150
FIT_STEPS = 100


def _render(scan: int, scale: int, top: int, left: int, size=(40, 48), ink="red", paper="blue"):
  """A float frame [H, W, 3] in [-1, 1] drawn like `moving_digits`, and its true α [H, W]."""
  digit = md._upscale(md._scans()[0][scan], scale)
  alpha = np.zeros(size, np.float32)
  d = digit.shape[0]
  alpha[top : top + d, left : left + d] = digit[: size[0] - top, : size[1] - left]
  ink_rgb, paper_rgb = np.asarray(md.INKS[ink]), np.asarray(md.PAPERS[paper])
  frame = paper_rgb * (1 - alpha[..., None]) + ink_rgb * alpha[..., None]
  return media.from_uint8(np.round(frame).astype(np.uint8)), alpha


def _bbox(alpha: np.ndarray, level: float) -> tuple[int, int, int, int]:
  """(y0, y1, x0, x1) of the pixels with α ≥ level · (the strongest ink): a scan's darkest
  pixel may be below full ink, and the localiser measures α relative to it."""
  ys, xs = np.nonzero(alpha >= level * alpha.max())
  return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def _assert_box_fits(box, alpha_true):
  """The box holds the digit's strokes (α ≥ ½ of the strongest ink) and is no larger than the
  extent of its faint ink (α ≥ ¼) with the margins (+ 2 px of rounding)."""
  top, left, h, w = box
  y0, y1, x0, x1 = _bbox(alpha_true, 0.5)
  assert top <= y0 and y1 <= top + h and left <= x0 and x1 <= left + w, (box, (y0, y1, x0, x1))
  y0, y1, x0, x1 = _bbox(alpha_true, 0.25)
  extent = max(y1 - y0, x1 - x0)
  assert max(h, w) <= extent * (1 + 2 * ink_crop.MARGIN) + 2, (box, extent)


# ---------------------------------------------------------------------------------------------
# The localiser on frames with a known digit box.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "scan,scale,top,left,ink,paper",
  [
    (0, 2, 3, 5, "white", "black"),
    (7, 3, 14, 20, "red", "blue"),
    (42, 4, 0, 16, "yellow", "gray"),  # touching the top edge
    (101, 4, 8, 0, "cyan", "black"),  # touching the left edge
    (1500, 2, 24, 32, "green", "gray"),  # a validation scan in the corner
  ],
)
def test_box_holds_a_drawn_digit(scan, scale, top, left, ink, paper):
  frame, alpha = _render(scan, scale, top, left, ink=ink, paper=paper)
  estimated = ink_crop.ink_alpha(frame)
  # α recovered up to the scale of the strongest ink, whatever the colours.
  assert not estimated[alpha == 0].any()
  assert np.corrcoef(estimated.ravel(), alpha.ravel())[0, 1] > 0.99
  _assert_box_fits(ink_crop.ink_box(estimated), alpha)


def test_crop_is_colour_and_position_free():
  """The same scan drawn at another place and in other colours gives the same crop."""
  a, _ = _render(7, 3, 2, 3, ink="white", paper="black")
  b, _ = _render(7, 3, 14, 21, ink="green", paper="gray")
  c, _ = _render(9, 3, 14, 21, ink="green", paper="gray")  # another digit
  crops = ink_crop.ink_crops(np.stack([a, b, c]), 16, 16)
  assert crops.shape == (3, 16, 16, 3) and crops.min() >= -1.0 and crops.max() <= 1.0
  np.testing.assert_allclose(crops[0], crops[1], atol=0.05)
  assert np.abs(crops[0] - crops[2]).max() > 0.5


def test_box_holds_the_digit_on_real_frames(data_dir):
  """Real validation frames: the true α is recomputed from the dataset's palette (paper = the
  commonest colour, ink = the palette colour that explains the pixels best), independently of
  the localiser's estimate."""
  source = md.data_source("validation", data_dir)
  checked = 0
  for i in range(40):
    example = source[i]
    if example["digits"][1] >= 0:
      continue
    video = np.asarray(example["video"], np.float32)  # [T, H, W, 3] in 0..255
    for frame, floats in zip(video, media.from_uint8(example["video"])):
      colours, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
      paper = colours[np.argmax(counts)]
      fits = []
      for ink in md.INKS.values():
        direction = np.asarray(ink, np.float32) - paper
        alpha = np.clip((frame - paper) @ direction / (direction @ direction), 0, 1)
        fits.append((np.abs(paper + alpha[..., None] * direction - frame).max(), alpha))
      residual, alpha = min(fits, key=lambda f: f[0])
      assert residual <= 1.0  # the palette explains every pixel up to uint8 rounding
      _assert_box_fits(ink_crop.ink_box(ink_crop.ink_alpha(floats)), alpha)
      checked += 1
  assert checked >= 100


def test_blank_and_noise_frames():
  rng = np.random.default_rng(0)
  blank = np.full((24, 40, 3), -0.9, np.float32)
  faint = blank + rng.uniform(-0.1, 0.1, blank.shape).astype(np.float32)  # below MIN_CONTRAST
  for frame in (blank, faint):
    assert (
      not ink_crop.ink_alpha(frame).any() and ink_crop.ink_box(ink_crop.ink_alpha(frame)) is None
    )
  noise = rng.uniform(-1, 1, (3, 24, 40, 3)).astype(np.float32)
  for frame in noise:  # "ink" is everywhere: the box is about the whole frame
    _, _, h, w = ink_crop.ink_box(ink_crop.ink_alpha(frame), aspect=2.0)
    assert w >= 40 and h >= 20 and abs(w / h - 2.0) < 0.1
  crops = ink_crop.ink_crops(np.concatenate([blank[None], faint[None], noise]), 8, 16)
  assert crops.shape == (5, 8, 16, 3) and np.all(np.isfinite(crops))
  np.testing.assert_array_equal(crops[:2], -1.0)  # blank frames: all paper
  assert crops[2:].std() > 0.2


# ---------------------------------------------------------------------------------------------
# Training batches: single digits only, cropped exactly as the evaluator crops.
# ---------------------------------------------------------------------------------------------
def _config(data_dir, **overrides):
  c = configs.load("tiny", CONFIG)
  c.input.data_dir = data_dir
  return configs.override(c, **overrides)


def _single_digit_validation(data_dir):
  source = md.data_source("validation", data_dir)
  examples = [source[i] for i in range(len(source))]
  singles = [e for e in examples if e["digits"][1] < 0]
  return [np.asarray(e["video"]) for e in singles], np.asarray([int(e["label"]) for e in singles])


def test_validation_batches_are_the_evaluators_crops(data_dir):
  config = _config(data_dir)
  videos, labels = _single_digit_validation(data_dir)
  assert 0 < len(labels) < len(md.data_source("validation", data_dir))
  task = tasks.get(config)
  rows, seen = [], []
  for batch in task.make_iterator(config, train=False, split="validation"):
    rows.append(batch["video"][batch["valid"]])
    seen.append(batch["label"][batch["valid"]])
  rows, seen = np.concatenate(rows), np.concatenate(seen)
  np.testing.assert_array_equal(seen, labels)  # every single-digit example once, in order
  # The evaluator's preprocessing (`Classifier._apply`, `_dense`) of each video's first frame.
  to_float = transforms.ToFloat()
  fixed = dense.FixedSize(config.input.size, config.input.fit)
  for row, video in list(zip(rows, videos))[:20]:
    want = fixed.map(to_float.map({"video": video[:1]}))["video"]
    np.testing.assert_array_equal(row, want)


def test_classifier_fits_a_batch_of_crops(data_dir):
  """FIT_STEPS updates on one batch of crops drive its training accuracy to 1."""
  config = _config(data_dir, **{"optimizer.lr": 5e-3, "optimizer.warmup_steps": 1})
  config.total_steps = FIT_STEPS
  losses, metrics, _ = configs.fit_one_batch(config, FIT_STEPS)
  assert float(metrics["accuracy"]) == 1.0, losses[::10]


# ---------------------------------------------------------------------------------------------
# End to end: a short `digit_crops` run, its top-1, and the `digits` evaluator on it.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crops_workdir(data_dir, tmp_path_factory):
  config = _config(data_dir, total_steps=E2E_STEPS, log_every_steps=50)
  config.optimizer.warmup_steps = 20
  workdir = str(tmp_path_factory.mktemp("vit_digit_crops"))
  train.train_and_evaluate(config, workdir)
  return workdir


def test_evaluator_matches_the_runs_top1(crops_workdir, data_dir):
  """The evaluator on the first frames of the real single-digit validation videos reproduces
  the run's own validation top-1 (same params, same crops), and a short run is past chance."""
  with open(os.path.join(crops_workdir, "eval", f"{E2E_STEPS}.json")) as f:
    top1 = json.load(f)["classification"]
  videos, labels = _single_digit_validation(data_dir)
  assert top1["examples"] == len(labels)
  clf = classifier.Classifier(crops_workdir)
  # One video at a time: their native sizes differ.
  correct = [classifier.digit_accuracy(clf, v[None, :1], y[None]) for v, y in zip(videos, labels)]
  accuracy = np.mean([r["frame_accuracy"] for r in correct])
  assert abs(accuracy - top1["top1"]) <= 1 / len(labels), (accuracy, top1)
  assert top1["top1"] > 0.2, top1  # chance 0.1; 150 steps reach ≈ 0.35-0.39 (seeds 0-2)


def test_digit_accuracy_on_known_videos(crops_workdir):
  """`digit_accuracy` (the `digits` evaluator's scoring; the evaluator with a real sampler runs
  in tests/test_evaluators.py) on videos whose answers are known: moving real validation scans
  of each digit score like the run's crops; blank videos are one constant class, so exactly
  chance with one video per digit."""
  _, scan_labels = md._scans()
  pool = md.scan_pool("validation")
  videos = []
  for digit in range(10):
    scan = int(pool[np.nonzero(scan_labels[pool] == digit)[0][0]])
    frames = [_render(scan, 2, 2 + t, 4 + 2 * t, (32, 32))[0] for t in range(4)]
    videos.append(media.to_uint8(np.stack(frames)))
  clf = classifier.Classifier(crops_workdir)
  labels = np.arange(10)
  res = classifier.digit_accuracy(clf, np.stack(videos), labels)
  assert res["num_videos"] == 10 and 0.0 <= res["frame_accuracy"] <= 1.0
  pred = np.argmax(clf.logits(np.stack(videos)), -1)
  assert res["frame_accuracy"] == float(np.mean(pred == labels[:, None]))
  blank = np.full((10, 4, 32, 32, 3), 30, np.uint8)
  res = classifier.digit_accuracy(clf, blank, labels)
  assert res["frame_accuracy"] == res["video_accuracy"] == 0.1
  noise = np.random.default_rng(0).integers(0, 256, (10, 4, 32, 32, 3), dtype=np.uint8)
  res = classifier.digit_accuracy(clf, noise, labels)
  assert 0.0 <= res["frame_accuracy"] <= 1.0 and res["num_videos"] == 10


@pytest.mark.slow
def test_digits_scores_a_class_conditional_dit(data_dir, tmp_path):
  """`digits` on a class-conditional image model (`configs/dit/digits.py`, task `generate`):
  `videos_per_digit` images of each class, scored as 1-frame videos exactly as `digit_accuracy`
  scores the same images drawn directly (same seed); the config's `classifier=` option adds
  the eval. (A 3-step classifier: the wiring, not the accuracy, is under test.)"""
  crops = str(tmp_path / "crops")
  train.train_and_evaluate(
    _config(data_dir, total_steps=3, log_every_steps=1, **{"optimizer.warmup_steps": 1}), crops
  )
  config = configs.load(f"tiny,classifier={crops}", "configs/dit/digits.py")
  assert config.evals.digits.type == "digits" and config.evals.digits.classifier_workdir == crops
  config.input.data_dir = data_dir
  config.evals = dict(digits=dict(config.evals.digits, videos_per_digit=2, steps=3))
  task = tasks.get(config)
  model = task.build_model(config)
  params = model.init(jax.random.key(0), *task.dummy_inputs(config))["params"]
  params = configs.off_zero_init(params, seed=1)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  fns = task.predict_fns(config, model, mesh, rules)
  with sharding.activate(mesh, rules):
    got = evaluators.run(config, fns, params, str(tmp_path), 0)["digits"]
  assert got["num_videos"] == 20 and got["chance"] == 0.1
  labels = np.repeat(np.arange(10), 2)
  images = fns["generate"](params, labels, steps=3, guidance_scale=config.sample.guidance, seed=0)
  assert len({media.to_uint8(x).tobytes() for x in images[::2]}) == 10  # the label is used
  want = classifier.digit_accuracy(
    classifier.Classifier(crops), media.to_uint8(images)[:, None], labels
  )
  assert got == want
