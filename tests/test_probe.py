"""`vdit.tools.probe`: the measurements that locate a generation failure (docs/recipe.md)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import configs
from vdit import train
from vdit.datasets import shapes
from vdit.evaluators import shapes_scorer
from vdit.tools import probe


def test_colour_velocity_reads_the_motion_of_every_real_clip():
  combos = probe.combinations(shapes_scorer.Vocabulary.of_dataset("tiny"))
  clips = probe.real_clips(combos)
  for clip, (colour, _, direction) in zip(clips, combos):
    velocity = probe.colour_velocity(clip.astype(np.float32), shapes.COLOURS[colour])
    along = velocity @ np.asarray(probe.DIRECTION_VECTORS[direction])
    across = velocity @ np.asarray(probe.DIRECTION_VECTORS[direction])[::-1]
    assert along > 0.5 and abs(across) < 0.25 * along, (colour, direction, velocity)
  # A clip that does not move has no velocity; its time-reversal moves the other way.
  still = np.repeat(clips[:1, :1], 8, axis=1)[0].astype(np.float32)
  assert np.abs(probe.colour_velocity(still, shapes.COLOURS[combos[0][0]])).max() < 1e-3
  forward = probe.colour_velocity(clips[0].astype(np.float32), shapes.COLOURS[combos[0][0]])
  backward = probe.colour_velocity(clips[0, ::-1].astype(np.float32), shapes.COLOURS[combos[0][0]])
  np.testing.assert_allclose(backward, -forward, atol=1e-4)


def test_real_continuations_score_fully():
  """The extend probe's premise: the 8 frames that follow the first 4 of each real clip keep
  the object, its shape and its motion, by the scorer the probe uses."""
  combos = probe.combinations(shapes_scorer.Vocabulary.of_dataset("tiny"))
  clips = probe.real_clips(combos, size=(12, 32, 32))
  scores = probe._scores([c[4:] for c in clips], [probe.prompt(*c) for c in combos], combos)
  assert scores == dict(colour=1.0, shape=1.0, direction=1.0, all=1.0, temporal=1.0)


def test_swap_word_replaces_one_attribute_by_the_next_word():
  """The words and shape-source probes change exactly one word of every prompt, to the next
  word of that attribute (wrapping round)."""
  combos = probe.combinations(shapes_scorer.Vocabulary.of_dataset("tiny"))
  for i, attribute in enumerate(probe.ATTRIBUTES):
    words = list(dict.fromkeys(c[i] for c in combos))
    for old, new in zip(combos, probe.swap_word(combos, attribute), strict=True):
      assert [j for j in range(3) if old[j] != new[j]] == [i]
      assert words.index(new[i]) == (words.index(old[i]) + 1) % len(words)


def test_object_mask_and_psnr():
  combos = probe.combinations(shapes_scorer.Vocabulary.of_dataset("tiny"))[:4]
  clips = probe.real_clips(combos)
  mask = probe.object_mask(clips)
  share = mask.mean(axis=(2, 3))  # per frame: the object is a few percent of the frame
  assert (share > 0.02).all() and (share < 0.3).all()
  video = clips.astype(np.float32) / 127.5 - 1
  assert probe.psnr(video, video) > 100
  flat = np.where(mask[..., None], video.mean(axis=(1, 2, 3), keepdims=True), video)
  # Erasing the object costs nothing outside it and everything inside it.
  assert probe.psnr(flat, video, ~mask) > 100
  assert probe.psnr(flat, video, mask) < 15


@pytest.mark.slow
def test_probe_cli_on_a_trained_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(configs.small(data_dir, total_steps=2), workdir)
  out = subprocess.run(
    [sys.executable, "-m", "vdit.tools.probe", f"--workdir={workdir}", "--num_prompts=4"],
    capture_output=True,
    text=True,
    cwd=configs.REPO,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "fidelity" in out.stdout and "i2v" in out.stdout
  with open(tmp_path / "run" / "probe" / "2.json") as f:
    result = json.load(f)
  assert result["step"] == 2
  assert [r["t"] for r in result["fidelity"]] == [0.02, 0.1, 0.2, 0.3, 0.5]
  for row in result["fidelity"]:
    # The noisy input x_t / (1 − t) of unit noise has a known PSNR, 10·log10(4 / (t / (1 − t))²)
    # in [-1, 1], where clipping to [-1, 1] hardly helps (low t).
    if row["t"] <= 0.1:
      known = 10 * np.log10(4 / (row["t"] / (1 - row["t"])) ** 2)
      assert known - 0.1 < row["input_psnr"] < known + 1.5, row
    assert np.isfinite(row["x0_psnr"]) and np.isfinite(row["x0_object_psnr"])
    assert 0 <= row["x0_shape"] <= 1 and 0 <= row["input_shape"] <= 1
  assert [r["t"] for r in result["direction"]] == [0.95, 0.8, 0.6]
  assert all(np.isfinite(r["velocity_along_prompt"]) for r in result["direction"])
  assert [r["t"] for r in result["words"]] == [0.95, 0.6, 0.3]
  for row in result["words"]:  # after 2 steps the zero-initialised text paths are still ~shut
    assert all(0 <= row[a] < 1 for a in probe.ATTRIBUTES), row
  assert set(result["i2v"]) == {"colour", "shape", "direction", "all", "temporal"}
  assert set(result["extend"]) == set(result["i2v"])
  assert all(0 <= v <= 1 for v in result["extend"].values())
  assert all(0 <= v <= 1 for v in result["i2v"].values())
  assert [r["strength"] for r in result["edit"]] == list(probe.EDIT_STRENGTHS)
  for row in result["edit"]:
    assert set(row) == {"strength"} | set(result["i2v"])
    assert all(0 <= row[k] <= 1 for k in result["i2v"]), row
  assert "edit real clips" in out.stdout
  assert [r["t"] for r in result["shape_source"]] == [0.5, 0.7, 0.8, 0.9]
  for row in result["shape_source"]:
    # The first 4 prompts are all circles: no other shape to name, so word and clip agree.
    assert 0 <= row["word"] <= 1 and row["word"] == row["clip"], row
  assert [r["t"] for r in result["blurred_shape_source"]] == [0.3, 0.5, 0.7]
  for row in result["blurred_shape_source"]:
    assert 0 <= row["word"] <= 1 and row["word"] == row["clip"], row
  assert f"blurred by σ = {probe.BLUR}" in out.stdout
