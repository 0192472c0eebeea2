"""Evaluators (vdit/evaluators) and `python -m vdit.evaluate`: known answers and end to end."""

import json
import os
import shutil
import types

import jax
import ml_collections
import numpy as np
import pytest

from tests import configs
from vdit import checkpointing, evaluators, sharding, tasks, train
from vdit.datasets import shapes
from vdit.evaluators import adherence, classifier, frechet, modes, samples, shapes_scorer, top1
from vdit.evaluators import validation as validation_lib
from vdit.tasks import base as tasks_base
from vdit.tasks import restore
from vdit.tools import steps_table

MESH_2X2X2 = dict(data=2, fsdp=2, sequence=1, tensor=2)
PATCH = (2, 4, 4)  # the shapes configs' patch (pt, ph, pw), in pixels


# ---------------------------------------------------------------------------------------------
# Adherence scorer on real and noise videos.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def validation(data_dir):
  source = shapes.data_source("validation", data_dir)
  examples = [source[i] for i in range(len(source))]
  captions = [e["caption"] for e in examples]
  captions = [c.decode() if isinstance(c, bytes) else str(c) for c in captions]
  return [np.asarray(e["video"]) for e in examples], captions


def test_parse_caption():
  objs = shapes_scorer.parse_caption(
    "a video of a red circle moving up-left and a blue square moving down quickly on a gray "
    "background"
  )
  assert objs == [
    shapes.ObjectSpec("red", "circle", "up-left"),
    shapes.ObjectSpec("blue", "square", "down"),
  ]
  with pytest.raises(ValueError, match="names no object"):
    shapes_scorer.parse_caption("a cat sleeping")


def test_adherence_is_right_on_real_shapes_videos(validation):
  videos, captions = validation
  assert len(videos) >= 200
  res = shapes_scorer.score_many(videos, captions, shapes_scorer.Vocabulary.of_dataset("tiny"))
  for key in ("colour", "shape", "direction", "all"):
    assert res[key] >= 0.99, res
  assert res["temporal"] >= 0.95, res


def test_adherence_is_chance_on_noise_and_on_wrong_captions(validation):
  videos, captions = validation
  vocab = shapes_scorer.Vocabulary.of_dataset("tiny")
  rng = np.random.default_rng(0)
  noise = [rng.integers(0, 256, v.shape, dtype=np.uint8) for v in videos]
  res = shapes_scorer.score_many(noise, captions, vocab)
  for key in ("colour", "shape", "direction"):
    assert abs(res[key] - res[f"chance_{key}"]) <= 0.12, res
  assert res["all"] <= 0.1 and res["temporal"] <= 0.1, res
  # Real videos against another video's caption: the attributes agree only by chance.
  shuffled = captions[1:] + captions[:1]
  res = shapes_scorer.score_many(videos, shuffled, vocab)
  assert res["all"] <= 0.15 and res["colour"] <= 0.45, res
  assert res["temporal"] >= 0.95  # the videos are still consistent objects


def test_adherence_on_the_default_variant_two_objects_and_diagonals():
  cfg = next(c for c in shapes.Shapes.BUILDER_CONFIGS if c.name == "default")
  vocab = shapes_scorer.Vocabulary.of_dataset("default")
  picked, i = [], 0
  while len(picked) < 8:  # small canvases keep this fast; two objects and diagonals included
    spec = shapes.sample_spec(shapes.building.split_rng(cfg.seed, "validation", i), cfg)
    if spec.height * spec.width * spec.num_frames <= 128 * 128 * 24:
      picked.append(shapes.generate(cfg, "validation", i))
    i += 1
  res = shapes_scorer.score_many(
    [e["video"] for e in picked], [e["caption"] for e in picked], vocab
  )
  assert res["all"] == 1.0, res


def test_modes_scores_are_right_on_the_real_clips_and_wrong_on_still_or_unedited_ones(validation):
  """`modes` scoring on known answers: the clip itself is a perfect output of every
  frame-conditioning mode and of retake; holding the given frames still loses the motion; an
  edit that does not recolour fails on colour; a palindrome loops, the clip does not."""
  videos, captions = validation
  vocab = shapes_scorer.Vocabulary.of_dataset("tiny")
  data = [{"video": v, "caption": c} for v, c in zip(videos, captions)]  # a data source
  clips, caps = modes.clips(data, 12, (8, 32, 32), vocab)
  assert clips.shape == (12, 8, 32, 32, 3) and len(caps) == 12
  for mode in ("i2v", "extend_fwd", "extend_bwd", "interpolate", "retake", "keyframes"):
    got = [modes.score(mode, c, c, p, vocab, PATCH) for c, p in zip(clips, caps)]
    assert all(g["given_psnr"] == g["new_psnr"] == 99.0 for g in got), mode
    assert np.mean([g["all"] for g in got]) >= 0.9, mode
    assert max(g["hold_psnr"] for g in got) < 99.0
    given, new = modes.frames(mode, 8, 2)
    still = [modes.held(c, given) for c in clips]
    held = [modes.score(mode, s, c, p, vocab, PATCH) for s, c, p in zip(still, clips, caps)]
    assert all(h["given_psnr"] == 99.0 and h["new_psnr"] < 99.0 for h in held), mode
    assert np.mean([g["new_direction"] for g in got]) >= 0.9, mode
    if mode not in ("interpolate", "retake", "keyframes"):  # (held from two ends: a jump)
      assert np.mean([h["new_direction"] for h in held]) <= 0.5, mode  # a still: no direction
  assert modes.frames("i2v", 8, 2)[1].tolist() == [False] * 2 + [True] * 6
  assert modes.frames("interpolate", 8, 2)[0].tolist() == [True] * 2 + [False] * 4 + [True] * 2
  assert modes.frames("retake", 8, 2)[1].tolist() == [False] * 2 + [True] * 4 + [False] * 2
  given, new = modes.frames("keyframes", 8, 2)  # images at 0 and 5; stills of 2 frames each
  assert np.flatnonzero(given).tolist() == [0, 5] and np.flatnonzero(new).tolist() == [2, 3, 6, 7]
  # Edit: the unedited clip keeps its colour (wrong) and its track (0 px).
  edits = [modes.score("edit", c, c, p, vocab, PATCH) for c, p in zip(clips, caps)]
  assert all(e["colour"] == 0.0 for e in edits)
  assert np.mean([e["track"] for e in edits]) >= 5.0  # the new colour is nowhere
  (obj,) = shapes_scorer.parse_caption(caps[0])
  assert modes.track(clips[0], obj.colour, clips[0], obj.colour) == 0.0
  assert modes.recoloured("a red circle moving up on a gray background", vocab).startswith(
    f"a {vocab.colours[(vocab.colours.index('red') + 1) % len(vocab.colours)]} circle moving up"
  )
  # Loop: a palindrome (forward, then back) comes back to its start, the clip does not.
  loops = [np.concatenate([c[:5], c[4:0:-1]]) for c in clips]
  assert np.median([modes.seam(v) for v in loops]) <= 1.5
  assert np.median([modes.seam(c) for c in clips]) >= 3.0
  with pytest.raises(ValueError, match="only .* validation clips"):
    modes.clips(data, 10_000, (8, 32, 32), vocab)


class _BlackRegions:
  """A stand-in sampler whose retake, inpaint and outpaint return exactly the pixels they were
  asked to keep and paint the rest black; records each request. `fs` > 1: a latent-space one
  (sizes in latent cells of fs × fs pixels, per-frame codes)."""

  def __init__(self, patch_size=PATCH, fs=1):
    self.pt, self.patch_size, self.requests = patch_size[0], patch_size, {}
    self.codec = types.SimpleNamespace(compression=(1, fs, fs)) if fs > 1 else None
    self.fs = fs

  def retake(self, prompts, video, *, frames, **options):
    self.requests["retake"] = frames
    out = video.copy()
    out[frames[0] : frames[1]] = 0
    return out[None]

  def inpaint(self, prompts, video, mask, **options):
    self.requests["inpaint"] = mask
    return np.where(mask[None, :, :, None], 0, video)[None].astype(np.uint8)

  def outpaint(self, prompts, video, *, height, width, **options):
    self.requests["outpaint"] = (video.shape, height, width)
    out = np.zeros((len(video), self.fs * height, self.fs * width, 3), np.uint8)
    left = (self.fs * width - video.shape[2]) // 2
    out[:, :, left : left + video.shape[2]] = video
    return out[None]


def test_long_scores_are_right_on_real_clips_and_wrong_when_the_object_vanishes(validation):
  """`long` scoring on known answers: 16-frame real clips read in windows of 4 adhere in every
  window and keep one object throughout; with the object gone from the second half (its frames
  painted one colour) persistence and identity fall."""
  videos, captions = validation
  vocab = shapes_scorer.Vocabulary.of_dataset("tiny")
  data = [{"video": v, "caption": c} for v, c in zip(videos, captions)]
  clips, caps = modes.clips(data, 8, (16, 32, 32), vocab)
  got = [modes.long_scores(c, p, vocab, 4) for c, p in zip(clips, caps)]
  for key in ("colour", "shape", "identity", "persistence"):
    assert np.mean([g[key] for g in got]) >= 0.9, (key, got)
  assert np.mean([g["all"] for g in got]) >= 0.75
  for g in got:  # one direction score per window of 4, averaging to the per-window direction
    assert sorted(k for k in g if "_w" in k) == [f"direction_w{i}" for i in range(4)]
    assert np.mean([g[f"direction_w{i}"] for i in range(4)]) == g["direction"]
  # The second half played backwards: the object turns back in windows 2 and 3 only.
  back = np.concatenate([clips[:, :8], clips[:, 8:][:, ::-1]], axis=1)
  turned = [modes.long_scores(c, p, vocab, 4) for c, p in zip(back, caps)]
  assert np.mean([g["direction_w0"] for g in turned]) >= 0.75
  assert np.mean([g["direction_w3"] for g in turned]) <= 0.25
  gone = clips.copy()
  gone[:, 8:] = np.median(clips[:, :1], axis=(2, 3), keepdims=True).astype(np.uint8)
  lost = [modes.long_scores(c, p, vocab, 4) for c, p in zip(gone, caps)]
  assert np.mean([g["persistence"] for g in lost]) <= 0.6
  assert np.mean([g["all"] for g in lost]) <= 0.6
  assert modes.longest_clip(configs.load("tiny"), "tiny") == 16  # the pipeline's cap (data: 24)
  assert configs.load("tiny").evals.modes.modes == modes.MODES  # the config lists them all


def test_modes_region_scores_are_right_on_the_real_clips_and_wrong_on_filled_or_black_ones(
  validation,
):
  """retake, inpaint and outpaint on known answers: the clip is a perfect output; the region
  painted the background (`fill`) or black keeps the kept pixels (99 dB) and is far from the
  clip where it was generated; `generate` asks for exactly the pixels `score` reads as kept."""
  videos, captions = validation
  vocab = shapes_scorer.Vocabulary.of_dataset("tiny")
  data = [{"video": v, "caption": c} for v, c in zip(videos, captions)]
  clips, caps = modes.clips(data, 12, (8, 32, 32), vocab)
  box = np.zeros((32, 32), bool)
  box[8:24, 8:24] = True  # the middle half of the height and width: whole 4-pixel patches
  assert (modes.region("inpaint", (8, 32, 32), PATCH) == box).all()
  border = modes.region("outpaint", (8, 32, 32), PATCH)[0, 0]
  assert np.flatnonzero(border).tolist() == [*range(8), *range(24, 32)]
  middle = modes.region("retake", (8, 32, 32), PATCH)[:, 0, 0]
  assert np.flatnonzero(middle).tolist() == [2, 3, 4, 5]
  # Off the patch grid the regenerated part widens to whole patches (as the sampler's tokens).
  regen = modes.region("inpaint", (8, 18, 18), PATCH)
  assert np.flatnonzero(regen[0, :, 9]).tolist() == list(range(4, 14))
  assert np.flatnonzero(~modes.kept(regen, PATCH)[0, :, 9]).tolist() == list(range(4, 16))
  with pytest.raises(ValueError, match="inpaint: the height .* needs ≥ 3"):
    modes.region("inpaint", (8, 8, 32), PATCH)
  modes.region("outpaint", (8, 8, 32), PATCH)  # outpaint halves the width only
  for mode in ("inpaint", "outpaint"):
    keep = modes.kept(modes.region(mode, (8, 32, 32), PATCH), PATCH)
    got = [modes.score(mode, c, c, p, vocab, PATCH) for c, p in zip(clips, caps)]
    assert all(g["given_psnr"] == g["new_psnr"] == 99.0 for g in got), mode
    assert np.mean([g["all"] for g in got]) >= 0.9, mode
    assert np.mean([g["fill_psnr"] for g in got]) < 99.0, mode
    fills = [modes.filled(c, keep) for c in clips]
    assert all((f[keep] == c[keep]).all() for f, c in zip(fills, clips)), mode
    fill = [modes.score(mode, f, c, p, vocab, PATCH) for f, c, p in zip(fills, clips, caps)]
    assert all(f["given_psnr"] == 99.0 and f["new_psnr"] == f["fill_psnr"] for f in fill), mode
  # Through `generate`: the kept pixels come back exactly, black is worse than the baselines.
  fake, options = _BlackRegions(), dict(height=32, width=32, steps=1, strength=0.6)
  for mode in modes.REGIONS:
    out = [modes.generate(fake, mode, c, p, vocab, **options) for c, p in zip(clips, caps)]
    assert all(o.shape == c.shape for o, c in zip(out, clips)), mode
    got = [modes.score(mode, o, c, p, vocab, PATCH) for o, c, p in zip(out, clips, caps)]
    baseline = "hold_psnr" if mode == "retake" else "fill_psnr"
    assert all(g["given_psnr"] == 99.0 and g["new_psnr"] < g[baseline] for g in got), mode
  assert fake.requests["retake"] == (2, 6)
  assert (fake.requests["inpaint"] == box).all()
  assert fake.requests["outpaint"] == ((8, 32, 16, 3), 32, 32)  # the centre half, back to 32
  # Latent space: sizes in latent cells; a patch of 2 × 2 cells of 4 × 4 pixels is 8 × 8 pixels.
  latent = _BlackRegions(patch_size=(2, 2, 2), fs=4)
  assert modes.pixel_patch(latent) == (2, 8, 8)
  options = dict(height=8, width=8, steps=1, strength=0.6)
  out = modes.generate(latent, "outpaint", clips[0], caps[0], vocab, **options)
  assert latent.requests["outpaint"] == ((8, 32, 16, 3), 8, 8) and out.shape == clips[0].shape
  assert modes.score("outpaint", out, clips[0], caps[0], vocab, (2, 8, 8))["given_psnr"] == 99.0
  # Outpaint's input unchanged (the crop's edge repeated, as the sampler's canvas): not the clip.
  edged = [np.pad(c[:, :, 8:24], ((0, 0), (0, 0), (8, 8), (0, 0)), mode="edge") for c in clips]
  got = [modes.score("outpaint", e, c, p, vocab, PATCH) for e, c, p in zip(edged, clips, caps)]
  assert all(g["given_psnr"] == 99.0 and g["new_psnr"] < 99.0 for g in got)


def test_prompts_for_are_distinct_and_in_the_vocabulary():
  vocab = shapes_scorer.Vocabulary.of_dataset("tiny")
  prompts = adherence.prompts_for(vocab, 12, seed=0)
  assert len(set(prompts)) == 12 and prompts == adherence.prompts_for(vocab, 12, seed=0)
  for p in prompts:
    (obj,) = shapes_scorer.parse_caption(p)
    assert obj.colour in vocab.colours and obj.direction in vocab.directions


# ---------------------------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------------------------
def test_frechet_known_answers():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
  assert frechet.frechet_of_features(x, x) == pytest.approx(0.0, abs=1e-6)
  # A mean shift δ leaves the covariance: FD = ‖δ‖².
  delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.1])
  assert frechet.frechet_of_features(x, x + delta) == pytest.approx(delta @ delta, rel=1e-6)
  assert frechet.frechet_of_features(x, x + 2 * delta) > frechet.frechet_of_features(x, x + delta)
  # Closed form for diagonal Gaussians: ‖μ1 − μ2‖² + Σ (σ1 − σ2)².
  s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  want = 3.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = frechet.frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2))
  assert got == pytest.approx(want, rel=1e-9)
  # Rank-deficient covariances (fewer samples than dimensions) stay finite and ≥ 0.
  assert frechet.frechet_of_features(x[:4], x[4:8]) >= 0.0


def test_real_videos_max_aspect_keeps_clips_of_the_sizes_aspect(data_dir, validation):
  """`max_aspect` skips the clips a resize to `size` would stretch by more than that factor (in
  split order); without it, the first clips of the split whatever their aspect."""
  config = ml_collections.ConfigDict(
    dict(input=dict(dataset="shapes", dataset_config="tiny", data_dir=data_dir))
  )
  videos, captions = validation
  stretch = [validation_lib.stretch(v.shape[1:3], (32, 32)) for v in videos]
  kept = [i for i, s in enumerate(stretch) if s <= 1.3][:6]
  assert len(kept) == 6 and kept != list(range(6))  # some clips are wider / taller than 1.3
  got, got_captions, picked = validation_lib.real_videos(config, 6, [(4, 32, 32)], None, None, 1.3)
  assert np.stack(got).shape == (6, 4, 32, 32, 3) and got_captions == [captions[i] for i in kept]
  assert picked == [0] * 6
  _, first, _ = validation_lib.real_videos(config, 6, [(4, 32, 32)], None, None)
  assert first == captions[:6]
  assert validation_lib.stretch((16, 48), (32, 32)) == validation_lib.stretch((48, 16), (8, 8)) == 3
  # Several sizes: every clip (none left out) at the size that stretches it least.
  sizes = [(4, 32, 32), (4, 16, 48), (4, 48, 16), (4, 24, 40)]
  got, got_captions, picked = validation_lib.real_videos(config, 12, sizes, None, None)
  assert got_captions == captions[:12] and len(set(picked)) > 1
  for video, source, k in zip(got, videos[:12], picked):
    assert video.shape == (4, *sizes[k][1:], 3)
    best = min(validation_lib.stretch(source.shape[1:3], s[1:]) for s in sizes)
    assert validation_lib.stretch(source.shape[1:3], sizes[k][1:]) == best


def test_frechet_weights_extractor_is_a_clear_error():
  with pytest.raises(FileNotFoundError, match="does not exist.*rgb_imagenet.pt"):
    frechet.EXTRACTORS["i3d"](weights="/nonexistent/i3d.npz")


# ---------------------------------------------------------------------------------------------
# Registry: due, run.
# ---------------------------------------------------------------------------------------------
def _config(**evals) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.evals = evals
  return c


def test_due():
  c = _config(
    a=dict(type="loss", every_steps=10),
    b=dict(type="samples", every_steps=25),
    c=dict(type="adherence", every_steps=0),
  )
  assert evaluators.due(c, 10, 100) == ["a"]
  assert evaluators.due(c, 50, 100) == ["a", "b"]
  assert evaluators.due(c, 7, 100) == []
  assert evaluators.due(c, 100, 100) == ["a", "b", "c"]  # everything at the final step
  assert evaluators.due(c, 33, 33) == ["a", "b", "c"]
  assert evaluators.due(ml_collections.ConfigDict({"x": 1}), 10, 10) == []


def test_missing_evals_of_a_finished_run(tmp_path):
  # A run that crashed in (or stopped before) its final evals reruns only the missing ones.
  c = _config(a=dict(type="loss", every_steps=10), b=dict(type="samples", every_steps=0))
  workdir = str(tmp_path)
  assert evaluators.missing(c, workdir, 100, 100) == ["a", "b"]
  tasks_base.write_eval_json(workdir, 100, "a", {"x": 1.0})
  assert evaluators.missing(c, workdir, 100, 100) == ["b"]
  tasks_base.write_eval_json(workdir, 100, "b", {})
  assert evaluators.missing(c, workdir, 100, 100) == []


class _Writer:
  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars.update({(step, k): v for k, v in scalars.items()})

  def write_images(self, step, images):
    self.images.update({(step, k): v for k, v in images.items()})

  def write_videos(self, step, videos):
    self.videos = {(step, k): v for k, v in videos.items()}

  def flush(self):
    pass


def test_run_writes_json_scalars_and_summaries(tmp_path):
  calls = []

  @evaluators.register("_fake")
  def fake(ctx, *, scale=1.0):
    calls.append((ctx.fns["predict"](ctx.params), ctx.step, scale))
    return {"value": 2.0 * scale, "count": 3, "images": {"grid": np.zeros((1, 4, 4, 3), np.uint8)}}

  c = _config(first=dict(type="_fake", every_steps=5, scale=3.0), second=dict(type="_fake"))
  workdir = str(tmp_path)
  tasks_base.write_eval_json(workdir, 5, "classification", {"top1": 0.5})  # kept (merged)
  writer = _Writer()
  fns = {"predict": lambda params: f"predicted with {params}"}
  out = evaluators.run(c, fns, "params", workdir, 5, names=["first"], writer=writer)
  assert out == {"first": {"value": 6.0, "count": 3}}
  assert calls == [("predicted with params", 5, 3.0)]  # the functions and params handed in
  saved = json.loads((tmp_path / "eval" / "5.json").read_text())
  assert saved == {"classification": {"top1": 0.5}, "first": {"value": 6.0, "count": 3}}
  assert writer.scalars == {(5, "eval/first/value"): 6.0, (5, "eval/first/count"): 3.0}
  assert (5, "eval/first/grid") in writer.images
  with pytest.raises(ValueError, match="not in config.evals"):
    evaluators.run(c, fns, None, workdir, 5, names=["third"])
  with pytest.raises(ValueError, match="unknown"):
    evaluators.run(_config(x=dict(type="nope")), fns, None, workdir, 5)


def test_a_failing_eval_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch):
  def boom(ctx):
    raise RuntimeError("the scorer broke")

  def fine(ctx):
    return {"value": 1.0}

  monkeypatch.setitem(evaluators.EVALUATORS, "_boom", boom)
  monkeypatch.setitem(evaluators.EVALUATORS, "_fine", fine)
  c = _config(a=dict(type="_boom"), b=dict(type="_fine"))
  out = evaluators.run(c, {}, None, str(tmp_path), 7)
  assert out == {"a": {"error": "RuntimeError: the scorer broke"}, "b": {"value": 1.0}}
  assert evaluators.failures(out) == {"a": "RuntimeError: the scorer broke"}
  assert json.loads((tmp_path / "eval" / "7.json").read_text()) == out
  assert evaluators.missing(c, str(tmp_path), 7, 7) == ["a"]  # a rerun retries the failed one


def test_training_survives_a_failing_eval_and_reports_it(data_dir, tmp_path, monkeypatch):
  def boom(ctx):
    raise RuntimeError("the scorer broke")

  monkeypatch.setitem(evaluators.EVALUATORS, "_boom", boom)
  c = configs.small(data_dir, total_steps=2, evals={"bad": dict(type="_boom", every_steps=1)})
  with pytest.raises(evaluators.EvalFailed, match=r"bad at step 1: RuntimeError.*bad at step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  assert checkpointing.latest_step(str(tmp_path)) == 2  # the training itself completed


def test_adherence_does_not_apply_to_other_datasets():
  c = configs.load("tiny")
  c.input.dataset, c.input.dataset_config = "folder", "/some/folder"
  with pytest.raises(evaluators.NotApplicable, match=r"input.dataset='folder'"):
    adherence.evaluate(evaluators.Context(c, {}, None, "/nonexistent", 0))


def test_an_evaluator_needing_a_function_the_task_lacks_is_skipped(tmp_path):
  # A classifier's task gives no `sampler`: `samples` is skipped (recorded), not an error.
  c = _config(samples=dict(type="samples"))
  out = evaluators.run(c, {"batches": iter, "logits": None}, None, str(tmp_path), 3)
  assert "needs the task's `sampler` function" in out["samples"]["skipped"]
  assert evaluators.failures(out) == {} and evaluators.missing(c, str(tmp_path), 3, 3) == []


def test_top1_counts_labelled_valid_slots_over_all_batches(tmp_path):
  """Known answer: two batches of packed slots [B, K, C]; unlabelled (−1) and invalid slots do
  not count, in the accuracy nor in the mean cross-entropy; a split without a labelled slot
  gives zeros."""
  r = np.random.default_rng(0)
  parts = [
    (
      r.normal(size=(2, 3, 5)),
      np.array([[1, -1, 4], [0, 2, -1]]),
      np.array([[1, 1, 0], [1, 1, 1]]),
    ),
    (r.normal(size=(1, 3, 5)), np.array([[3, 3, 0]]), np.array([[1, 0, 1]])),
  ]
  parts = [(x.astype(np.float32), y.astype(np.int32), v.astype(bool)) for x, y, v in parts]
  fns = {"logits": lambda params, batch: batch, "batches": lambda: iter(parts)}
  logits, labels, valid = (
    np.concatenate([p[i].reshape(-1, *p[i].shape[2:]) for p in parts]) for i in range(3)
  )
  keep = valid & (labels >= 0)  # 5 slots
  logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  nll = -logp[np.arange(len(labels)), np.maximum(labels, 0)]
  got = top1.evaluate(evaluators.Context(None, fns, None, str(tmp_path), 0))
  assert got["examples"] == int(keep.sum()) == 5
  assert got["top1"] == pytest.approx(np.mean(np.argmax(logits, -1)[keep] == labels[keep]))
  assert got["loss"] == pytest.approx(np.mean(nll[keep]), rel=1e-6)
  unlabelled = [(parts[0][0], np.full_like(parts[0][1], -1), parts[0][2])]
  fns["batches"] = lambda: iter(unlabelled)
  assert top1.evaluate(evaluators.Context(None, fns, None, str(tmp_path), 0)) == {
    "top1": 0.0,
    "loss": 0.0,
    "examples": 0,
  }


# ---------------------------------------------------------------------------------------------
# Classifier-based evaluators (a ViT digit classifier trained for 2 steps).
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_workdir(data_dir, tmp_path_factory):
  c = configs.load("tiny", "configs/vit/digits.py")
  c.input.data_dir = data_dir
  c.total_steps = 2
  c.log_every_steps = 1
  workdir = str(tmp_path_factory.mktemp("vit_digits"))
  train.train_and_evaluate(c, workdir)
  return workdir


def test_classifier_features_digits_and_frechet(vit_workdir):
  clf = classifier.Classifier(vit_workdir)
  rng = np.random.default_rng(0)
  videos = rng.integers(0, 256, (5, 3, 40, 24, 3), dtype=np.uint8)  # any size is resized
  logits, feats = clf.logits(videos), clf.features(videos)
  assert logits.shape == (5, 3, 10) and feats.shape == (5, 3, clf.config.model.width)
  # The head applied to the features gives the logits: features are the penultimate layer.
  head = clf.params["head"]
  np.testing.assert_allclose(
    np.asarray(feats @ head["kernel"] + head["bias"]), logits, rtol=1e-4, atol=1e-5
  )
  # Still videos: every frame gets the same class; the accuracies follow the labels given.
  still = np.repeat(videos[:, :1], 3, axis=1)
  labels = np.argmax(clf.logits(still), -1)[:, 0]
  res = classifier.digit_accuracy(clf, still, labels)
  assert res["video_accuracy"] == res["frame_accuracy"] == 1.0 and res["chance"] == 0.1
  res = classifier.digit_accuracy(clf, still, (labels + 1) % 10)
  assert res["video_accuracy"] == res["frame_accuracy"] == 0.0
  f = feats.mean(1)
  assert frechet.frechet_of_features(f, f) == pytest.approx(0.0, abs=1e-6)


def test_classifier_rejects_a_generative_workdir(tmp_path):
  workdir = str(tmp_path)
  c = configs.small("unused")
  with open(os.path.join(workdir, "config.json"), "w") as fp:
    fp.write(c.to_json())
  with pytest.raises(ValueError, match="task='video_diffusion' run; a classifier workdir"):
    classifier.Classifier(workdir)
  with pytest.raises(FileNotFoundError, match="not a vdit workdir"):
    classifier.Classifier(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# End to end: python -m vdit.main (2 steps), then python -m vdit.evaluate.
# ---------------------------------------------------------------------------------------------
TINY_FLAGS = [
  *configs.TINY_CLI_FLAGS,
  "--config.total_steps=2",
  "--config.sample.prompts=()",
  "--config.evals.adherence.num_prompts=4",
  "--config.evals.adherence.steps=2",
  "--config.evals.samples.steps=2",
  "--config.evals.loss.num_batches=1",
]


def _run(module, *args, timeout=900):
  return configs.run_module(module, *args, timeout=timeout, JAX_PLATFORMS="cpu")


@pytest.mark.slow
def test_evaluate_end_to_end(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  out = _run(
    "vdit.main", *TINY_FLAGS, f"--workdir={workdir}", f"--config.input.data_dir={data_dir}"
  )
  assert out.returncode == 0, out.stderr[-3000:]

  saved = json.loads((tmp_path / "run" / "eval" / "2.json").read_text())
  assert set(saved) >= {"loss", "samples", "adherence"}  # the end-of-run evals
  # vdit.evaluate on the checkpoint (adherence, the slowest, is left to the run's own eval).
  out = _run("vdit.evaluate", f"--workdir={workdir}", "--evals=loss,samples")
  assert out.returncode == 0, out.stderr[-3000:]
  rerun = json.loads((tmp_path / "run" / "eval" / "2.json").read_text())["loss"]["loss"]
  assert rerun == pytest.approx(saved["loss"]["loss"], rel=1e-5)  # same checkpoint, same rngs
  loss = saved["loss"]
  assert np.isfinite(loss["loss"]) and loss["examples"] == sum(
    loss[f"count_t{i}"] for i in range(5)
  )
  adh = saved["adherence"]
  # The tiny config scores every prompt at three sizes, each also on its own, with a grid GIF.
  sizes = ("8x32x32", "8x32x48", "8x48x24")
  assert adh["count"] == 4 * len(sizes)
  assert all(0.0 <= adh[k] <= 1.0 for k in ("colour", "shape", "all"))
  assert all(0.0 <= adh[f"{s}_all"] <= 1.0 for s in sizes)
  assert all((tmp_path / "run" / "samples" / "2" / f"adherence_{s}.gif").exists() for s in sizes)
  assert all(os.path.exists(p) for p in saved["samples"]["files"])
  assert any(p.endswith(".gif") for p in saved["samples"]["files"])
  assert '"samples"' in out.stdout and '"loss"' in out.stdout  # the results are printed

  # Same checkpoint, same fixed rngs: the loss is reproducible. A workdir config without
  # `evals` takes them from --config.
  cfg_path = tmp_path / "run" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  del cfg["evals"]
  cfg_path.write_text(json.dumps(cfg))
  (tmp_path / "run" / "eval" / "2.json").unlink()
  flags = ["--config=configs/vdit/shapes.py:tiny", "--config.evals.loss.num_batches=1"]
  out = _run("vdit.evaluate", f"--workdir={workdir}", *flags, "--evals=loss", "--step=2")
  assert out.returncode == 0, out.stderr[-3000:]
  again = json.loads((tmp_path / "run" / "eval" / "2.json").read_text())
  assert set(again) == {"loss"}
  assert again["loss"]["loss"] == pytest.approx(loss["loss"], rel=1e-5)

  out = _run("vdit.evaluate", f"--workdir={tmp_path / 'nothing'}")
  assert out.returncode != 0 and "not a vdit workdir" in out.stderr


def test_vdit_evaluate_runs_in_process_on_a_classifier(vit_workdir, tmp_path):
  from vdit import evaluate  # noqa: PLC0415

  # The run's own evals (configs/vit/digits.py: `classification`, type top1) on its checkpoint
  # give what the trainer wrote at its last step: the same sharded state, the same functions.
  trained = json.loads(open(os.path.join(vit_workdir, "eval", "2.json")).read())["classification"]
  step, results = evaluate.evaluate(vit_workdir)
  assert step == 2 and 0.0 <= results["classification"]["top1"] <= 1.0
  assert results["classification"]["examples"] == trained["examples"] == 200
  assert results["classification"]["top1"] == trained["top1"]
  assert results["classification"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
  # A workdir whose config has no `evals` takes them from the fallback config.
  workdir = str(tmp_path / "copy")
  shutil.copytree(vit_workdir, workdir)
  cfg = json.loads(open(os.path.join(workdir, "config.json")).read())
  del cfg["evals"]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(cfg))
  fallback = _config(top1=dict(type="top1", every_steps=1))
  step, results = evaluate.evaluate(workdir, fallback)
  assert step == 2 and results["top1"]["top1"] == trained["top1"]
  saved = json.loads(open(os.path.join(workdir, "eval", "2.json")).read())
  assert saved["top1"]["top1"] == results["top1"]["top1"]
  # An eval the run's config lacks is added from --config; the run's own ones stay its own.
  fallback = _config(
    classification=dict(type="top1", no_such_option=1), again=dict(type="top1", every_steps=1)
  )
  step, results = evaluate.evaluate(vit_workdir, fallback, names=["classification", "again"])
  assert results["again"]["top1"] == trained["top1"]
  assert results["classification"]["top1"] == trained["top1"]  # not the fallback's (an error)
  assert jax.process_index() == 0


def test_evaluators_run_on_sharded_params_as_on_replicated_ones(vit_workdir):
  """No gather before an eval: the predict functions take the params as sharded over the
  mesh (here split over fsdp and tensor) and give what replicated params give."""
  out = {}
  for name, mesh_config in [("replicated", {"data": -1}), ("sharded", MESH_2X2X2)]:
    mesh = sharding.make_mesh(mesh_config)
    rules = sharding.rules_from_config(checkpointing.read_config(vit_workdir).sharding_rules)
    config, step, params = restore.ema_params(vit_workdir, mesh=mesh)
    split = [not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(params)]
    assert any(split) == (name == "sharded")  # as restored, and as handed to the evaluators
    task = tasks.get(config)
    fns = task.predict_fns(config, task.build_model(config), mesh, rules)
    c = _config(top1=dict(type="top1"))
    out[name] = evaluators.run(c, fns, params, vit_workdir, step)["top1"]
  assert out["sharded"]["examples"] == out["replicated"]["examples"] == 200
  assert out["sharded"]["top1"] == pytest.approx(out["replicated"]["top1"], abs=1 / 200)
  assert out["sharded"]["loss"] == pytest.approx(out["replicated"]["loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Every generative evaluator in process, on a VideoDiT trained for 2 steps.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("video"))
  train.train_and_evaluate(configs.small(data_dir, total_steps=2), workdir)
  return workdir


def test_steps_table_runs_adherence_per_steps_and_sampler(video_workdir):
  """`vdit.tools.steps_table`: one adherence eval per (sampler, steps) on the checkpoint, with the
  sampler switched in the run's config. One step of `stochastic` is one Euler step (its first
  step adds no noise at t = 0), so those cells are equal; results land in eval/<step>.json."""
  options = dict(num_prompts=2, size=(4, 16, 16))
  step, out = steps_table.table(video_workdir, (1, 2), ("euler", "stochastic"), options=options)
  assert out["euler"][1] == out["stochastic"][1]
  assert all(out[s][n]["count"] == 2 for s in out for n in (1, 2))
  with open(os.path.join(video_workdir, "eval", f"{step}.json")) as f:
    saved = json.load(f)
  assert {"adherence_euler_1", "adherence_stochastic_2"} <= set(saved)
  table = steps_table.markdown(out)
  assert table.splitlines()[0] == "| steps | `euler` | `stochastic` |" and "| 2 | " in table
  with pytest.raises(ValueError, match=r"samplers \['ddim'\] are not samplers"):
    steps_table.table(video_workdir, (1,), ("ddim",), options=options)


@pytest.mark.slow
def test_generative_evaluators_in_process(video_workdir, vit_workdir):
  config = checkpointing.read_config(video_workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  config, step, params = restore.ema_params(video_workdir, config=config, mesh=mesh)
  task = tasks.get(config)
  fns = task.predict_fns(config, task.build_model(config), mesh, rules)
  tiny = dict(steps=2, size=(4, 16, 16))
  config.evals = dict(
    loss=dict(type="loss", num_batches=1, repeats=2),
    loss_again=dict(type="loss", num_batches=1, repeats=2),
    adherence=dict(type="adherence", num_prompts=3, **tiny),
    digits=dict(type="digits", classifier_workdir=vit_workdir, **tiny),
    fd=dict(type="frechet", classifier_workdir=vit_workdir, num_videos=4, **tiny),
    fd_sizes=dict(
      type="frechet",
      classifier_workdir=vit_workdir,
      num_videos=4,
      steps=2,
      sizes=((4, 16, 16), (4, 8, 24), (4, 24, 8)),
    ),
    samples=dict(type="samples", prompts=("a red circle moving right",), sizes=((4, 16, 24),)),
    modes=dict(type="modes", num_videos=2, steps=2, size=(6, 16, 16)),
  )
  writer = _Writer()
  with sharding.activate(mesh, rules):
    out = evaluators.run(config, fns, params, video_workdir, step, writer=writer)
  loss = out["loss"]
  assert loss == out["loss_again"]  # fixed rngs: reproducible
  assert loss["examples"] == sum(loss[f"count_t{i}"] for i in range(5)) > 0
  assert loss["examples"] % 2 == 0  # every example once per repeat
  assert out["adherence"]["count"] == 3 and out["digits"]["num_videos"] == 10
  assert np.isfinite(out["fd"]["fd"]) and out["fd"]["fd"] >= 0.0
  assert out["fd"]["fd_ratio"] == pytest.approx(out["fd"]["fd"] / out["fd"]["fd_real"])
  assert out["fd"]["fd"] > out["fd"]["fd_real"] > 0.0  # 2 training steps: far from real
  # Each real clip and its generated video at the size nearest the clip's aspect.
  assert sum(out["fd_sizes"]["per_size"]) == 4 and out["fd_sizes"]["fd"] > 0.0
  assert out["fd"]["per_size"] == [4]
  # Pixel space: every mode's given frames come back exactly; a GIF per mode.
  assert out["modes"]["count"] == 2, out["modes"]
  for mode in ("i2v", "extend_fwd", "extend_bwd", "interpolate", "loop", "keyframes"):
    assert out["modes"][f"{mode}_given_psnr"] == 99.0, (mode, out["modes"])
  for mode in modes.REGIONS:
    assert out["modes"][f"{mode}_given_psnr"] == 99.0, (mode, out["modes"])
  for mode in (*modes.MODES, "real"):
    assert os.path.exists(os.path.join(video_workdir, "samples", str(step), f"modes_{mode}.gif"))
  (gif,) = [p for p in out["samples"]["files"] if p.endswith(".gif")]
  assert os.path.exists(gif) and "samples" in gif
  assert writer.images[(step, "eval/samples/4x16x24")].shape == (1, 4 * 17, 1 * 25, 3)
  assert writer.videos[(step, "eval/samples/4x16x24")].shape == (1, 4, 16, 24, 3)
  saved = json.loads(open(os.path.join(video_workdir, "eval", f"{step}.json")).read())
  assert set(saved) >= set(config.evals)


def test_samples_and_adherence_guide_as_the_config_samples_unless_told(tmp_path):
  """Both evals pass the config's `sample.guidance` to the sampler (the CLI's default), or their
  own `guidance` when the eval sets one."""
  seen = []

  class Recording:  # the sampler contract: generate(prompts, **options) -> uint8 videos
    def generate(self, prompts, *, num_frames, height, width, guidance, **options):
      seen.append(guidance)
      return np.zeros((len(prompts), num_frames, height, width, 3), np.uint8)

  c = configs.load("tiny")
  c.sample.guidance = 4.5
  fns = {"sampler": lambda params: Recording()}
  ctx = evaluators.Context(c, fns, None, str(tmp_path), 0)
  samples.evaluate(ctx, sizes=((2, 8, 8),))
  adherence.evaluate(ctx, num_prompts=2, size=(2, 8, 8))
  assert seen == [4.5, 4.5]
  samples.evaluate(ctx, sizes=((2, 8, 8),), guidance=2.0)
  adherence.evaluate(ctx, num_prompts=2, size=(2, 8, 8), guidance=7.0)
  assert seen[2:] == [2.0, 7.0]
